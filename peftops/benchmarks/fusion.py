"""AdapterFusion benchmark cases: ``peftops.adapter_fusion`` vs the eager formula
(``reference.adapter_fusion``: N separate key and value projections, 2N + 1 GEMMs) and vs
that formula under ``torch.compile`` (``compile``: the bar's denominator, bench/targets.toml);
``peftops[<path>]`` for each path of ``peftops.ops.fusion.PATHS`` when the module has one.

Shapes: T = 8192 tokens, d in {1024, 4096}, N in {2, 3, 8, 16} adapters (the largest, d = 4096
N = 16 forward + backward, holds ~10 GB in eager: fits 80 GB) (``small``: T = 33, d = 37,
N in {2, 3} for the CPU parity pass). Forward (inference, no autograd) and forward + backward (every
gradient but key_bias, whose true value is 0 and which eager returns as rounding noise).

FLOPs are the fused algorithm's: forward 3 GEMMs (Q, qk = Q Wk, m Wv^T) = 6 T d^2 plus the
score / mix pass (4 T N d); backward 6 more GEMMs (dm, dWv, dQ, dWk, dq, dWq) = 12 T d^2
plus ~8 T N d. Bytes are the floor: every tensor read or written once (forward: q, u, r, the
three weights in, out out; backward adds dout, u again, du, dq, dr and the weight grads).
"""
from __future__ import annotations

import math

import torch

from .. import reference
from ..ops.fusion import adapter_fusion
from .core import Case, compiled, generator, randn, warmed

NAMES = ("query", "adapter_outputs", "residual", "query_weight", "query_bias", "key_weight", "key_bias",
         "value_weight")
GRAD_NAMES = ("query", "adapter_outputs", "residual", "query_weight", "query_bias", "key_weight", "value_weight")


def _inputs(T, N, d, device, dtype, requires_grad, seed=0):
    g = generator(device, seed)

    def r(*shape, scale=1.0):
        return randn(g, *shape, dtype=dtype, scale=scale).requires_grad_(requires_grad)

    return dict(
        query=r(T, d), adapter_outputs=r(T, N, d), residual=r(T, d),
        query_weight=r(d, d, scale=1 / math.sqrt(d)), query_bias=r(d, scale=0.5),
        key_weight=r(d, d, scale=1.0 / d), key_bias=r(d, scale=0.5),
        value_weight=r(d, d, scale=1 / math.sqrt(d)),
    )


def _forward(fn, T, N, d, device, dtype):
    def build():
        args = _inputs(T, N, d, device, dtype, False)

        def run():
            with torch.no_grad():
                return fn(**args)
        return run
    return build


def _forward_backward(fn, T, N, d, device, dtype):
    def build():
        args = _inputs(T, N, d, device, dtype, True)
        dout = randn(generator(device, 1), T, d, dtype=dtype)
        wrt = [args[n] for n in GRAD_NAMES]

        def run():
            out = fn(**args)
            return torch.autograd.grad(out, wrt, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    T, dims, widths = (33, (37,), (2, 3)) if small else (8192, (1024, 4096), (2, 3, 8, 16))
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for d in dims:
        for N in widths:
            shape = {"T": T, "N": N, "d": d}
            gemm = 2.0 * T * d * d
            fwd_bytes = elt * (T * d * (N + 3) + 3 * d * d + 2 * d)
            formula = compiled(reference.adapter_fusion)
            out.append(Case(
                op="adapter_fusion_fwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward(adapter_fusion, T, N, d, device, dtype),
                           "eager": _forward(reference.adapter_fusion, T, N, d, device, dtype),
                           "compile": warmed(_forward(formula, T, N, d, device, dtype))},
                flops=3 * gemm + 4.0 * T * N * d,
                bytes=fwd_bytes,
                paths_from="peftops.ops.fusion",
            ))
            out.append(Case(
                op="adapter_fusion_fwd_bwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward_backward(adapter_fusion, T, N, d, device, dtype),
                           "eager": _forward_backward(reference.adapter_fusion, T, N, d, device, dtype),
                           "compile": warmed(_forward_backward(formula, T, N, d, device, dtype))},
                flops=9 * gemm + 12.0 * T * N * d,
                bytes=fwd_bytes + elt * (T * d * (2 * N + 3) + 6 * d * d + 2 * d),
                paths_from="peftops.ops.fusion",
            ))
    return out
