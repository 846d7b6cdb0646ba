"""The device's own floors, measured in the same run as every case (``floor.*`` records):

* ``floor.hbm_copy``: one large device-to-device copy (``dst.copy_(src)``), ``bytes`` = read
  + write; its ``gb_per_s`` is the HBM bandwidth every "% of HBM floor" uses
  (``bench --check``, ``report``, ``peftops.benchmarks.check.floors``);
* ``floor.gemm``: the vendor dense GEMM (``torch.mm``, cuBLAS on a GPU) in the run's dtype at
  the bench's GEMM shapes (LoRA / IA3 d = k = 4096 at T = 8192 tokens; UniPELT's FFN, 11008
  wide, both ways); its ``tflops`` is the GEMM rate floor ratios use.

Provider ``torch``; no parity (the copy and the GEMM are the vendor's). ``small``: an 8 MiB
copy and a 64-cube GEMM (the CPU rehearsal of bench/gpu_session.sh times them the same way,
recorded with device "cpu": a CPU's numbers, not a GPU's).
"""
from __future__ import annotations

import torch

from .core import Case, generator, randn

HBM_OP, GEMM_OP = "floor.hbm_copy", "floor.gemm"


def _copy(nbytes: int, device, dtype):
    def build():
        n = nbytes // dtype.itemsize
        src = torch.empty(n, device=device, dtype=dtype).fill_(1)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return build


def _gemm(M, N, K, device, dtype):
    def build():
        g = generator(device, 0)
        a, b = randn(g, M, K, dtype=dtype), randn(g, K, N, dtype=dtype, scale=K ** -0.5)
        out = torch.empty(M, N, device=device, dtype=dtype)
        return lambda: torch.mm(a, b, out=out)
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    mib = 8 if small else 2048
    gemms = [(64, 64, 64)] if small else [(8192, 4096, 4096), (8192, 11008, 4096), (8192, 4096, 11008)]
    out = [Case(op=HBM_OP, shape={"MiB": mib}, dtype=dtype, providers={"torch": _copy(mib * 2**20, device, dtype)},
                bytes=2.0 * mib * 2**20, compare=())]
    out += [Case(op=GEMM_OP, shape={"M": M, "N": N, "K": K}, dtype=dtype,
                 providers={"torch": _gemm(M, N, K, device, dtype)}, flops=2.0 * M * N * K,
                 bytes=dtype.itemsize * (M * K + K * N + M * N), compare=())
            for M, N, K in gemms]
    return out
