"""UniPELT benchmark cases: one post-LN attention + FFN block (grouped-query attention) with
UniPELT's three gated submodules (gated LoRA r = 8 on q and v, gated prefix of length 10,
gated SeqBn adapter with reduction 16 after the FFN) vs the same block without PEFT.

Providers: ``peftops`` (the UniPELT block on the fused kernels), ``eager`` (the same UniPELT
block on the plain-PyTorch reference: ``PEFTOPS_BACKEND=reference`` during the call),
``compile`` (that reference block under ``torch.compile``, compiled and warmed in the
build), ``cublas_base`` (the frozen block alone: torch linears + SDPA, no PEFT; the floor
and the bar's denominator, bench/targets.toml).
Forward (no autograd) and forward + backward (gradients of the input and of every trainable
parameter; for the base block, of the input only). Shapes: hidden 4096, Hq = 32, Hkv = 8,
head_dim 128, FFN 11008, B = 4, T = 2048 (``small``: hidden 48, 4 / 2 heads of 12, FFN 64,
B = 2, T = 13 for the CPU parity pass, peftops vs eager).

FLOPs: the base block's (projections 2 T (d (Hq + 2 Hkv) D + Hq D d) + FFN 4 T d f,
attention 4 B Hq T^2 D) plus UniPELT's (LoRA 2 x 2 T r (d + out), prefix 4 B Hq T L D,
adapter 4 T d m, gates); backward counted as 2x forward. Bytes: not given (compute bound).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.unipelt import UniPELTConfig, UniPELTLayer
from .core import Case, raise_recompile_limits, warmed


class _Block(nn.Module):
    def __init__(self, hid, heads, kv_heads, head_dim, ffn):
        super().__init__()
        self.dims = (hid, heads, kv_heads, head_dim)
        self.q_proj = nn.Linear(hid, heads * head_dim)
        self.k_proj = nn.Linear(hid, kv_heads * head_dim)
        self.v_proj = nn.Linear(hid, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hid)
        self.ln1 = nn.LayerNorm(hid)
        self.up = nn.Linear(hid, ffn)
        self.down = nn.Linear(ffn, hid)
        self.ln2 = nn.LayerNorm(hid)
        self.pelt = None

    def forward(self, x):
        B, T, _ = x.shape
        _, H, Hkv, D = self.dims
        p = self.pelt
        q = (p.q_proj if p else self.q_proj)(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = (p.v_proj if p else self.v_proj)(x).view(B, T, Hkv, D).transpose(1, 2)
        if p:
            a = p.attention(q, k, v, x, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        x1 = self.ln1(self.o_proj(a.transpose(1, 2).reshape(B, T, -1)) + x)
        f = self.down(F.gelu(self.up(x1)))
        return p.adapter(f, x1, self.ln2) if p else self.ln2(f + x1)


@contextlib.contextmanager
def _backend(name):
    prev = os.environ.get("PEFTOPS_BACKEND")
    os.environ["PEFTOPS_BACKEND"] = name
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("PEFTOPS_BACKEND", None)
        else:
            os.environ["PEFTOPS_BACKEND"] = prev


def _build(dims, B, T, device, dtype, *, pelt, backward, backend=None, compile_=False):
    def build():
        torch.manual_seed(0)
        blk = _Block(*dims)
        if pelt:
            blk.pelt = UniPELTLayer(UniPELTConfig(), q_proj=blk.q_proj, v_proj=blk.v_proj, hidden_size=dims[0],
                                    num_kv_heads=dims[2], head_dim=dims[3])
            with torch.no_grad():  # non-zero LoRA B so the branch is real work and parity sees it
                for n, p in blk.named_parameters():
                    if n.endswith("lora_B"):
                        p.normal_(0.0, 0.02)
        for n, p in blk.named_parameters():
            p.requires_grad_(n.startswith("pelt."))
        blk = blk.to(device=device, dtype=dtype)
        if compile_:
            raise_recompile_limits()
            blk = torch.compile(blk, dynamic=False)
        x = torch.randn(B, T, dims[0], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        dout = torch.randn(B, T, dims[0], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        wrt = [x.requires_grad_(backward)] + [p for p in blk.parameters() if p.requires_grad]

        def run():
            with _backend(backend) if backend else contextlib.nullcontext():
                if not backward:
                    with torch.no_grad():
                        return blk(x)
                return torch.autograd.grad(blk(x), wrt, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        hid, H, Hkv, D, ffn, B, T = 48, 4, 2, 12, 64, 2, 13
    else:
        hid, H, Hkv, D, ffn, B, T = 4096, 32, 8, 128, 11008, 4, 2048
    dims = (hid, H, Hkv, D, ffn)
    cfg = UniPELTConfig()
    N = B * T
    base = 2.0 * N * (hid * (H + 2 * Hkv) * D + H * D * hid) + 4.0 * N * hid * ffn + 4.0 * B * H * T * T * D / 2
    m = hid // int(cfg.reduction_factor)
    extra = (4.0 * N * cfg.r * (2 * hid + H * D + Hkv * D) + 4.0 * B * H * T * cfg.prefix_length * D
             + 4.0 * N * hid * m + 2.0 * N * hid * 4)
    shape = {"B": B, "T": T, "hidden": hid, "Hq": H, "Hkv": Hkv, "D": D, "ffn": ffn, "r": cfg.r,
             "L": cfg.prefix_length, "m": m}
    out = []
    for backward, op in ((False, "unipelt_block_fwd"), (True, "unipelt_block_fwd_bwd")):
        mult = 3.0 if backward else 1.0
        out.append(Case(
            op=op, shape=shape, dtype=dtype,
            providers={
                "peftops": _build(dims, B, T, device, dtype, pelt=True, backward=backward),
                "eager": _build(dims, B, T, device, dtype, pelt=True, backward=backward, backend="reference"),
                "compile": warmed(_build(dims, B, T, device, dtype, pelt=True, backward=backward, backend="reference",
                                         compile_=True)),
                "cublas_base": _build(dims, B, T, device, dtype, pelt=False, backward=backward),
            },
            flops=mult * (base + extra),
            compare=("peftops",),
        ))
    return out
