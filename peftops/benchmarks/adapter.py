"""Bottleneck adapter benchmark cases: ``peftops.bottleneck_adapter`` vs the eager formula
(``reference.bottleneck_adapter``: Linear, act, Linear, scale, add -- each a pass over
memory), that formula under ``torch.compile`` (``compile``), and the byte floor (bars in
bench/targets.toml: the forward against the HBM floor ``bytes / 3 TB/s``, the forward +
backward against eager). ``peftops[<path>]``: each path of ``peftops.ops.adapter.PATHS``
forced, when the module has that table.

Shapes: T = 8192 tokens, d in {1024, 4096}, m in {64, 256}, bf16 (``small``: T = 33, d = 37,
m in {8, 24} for the CPU parity pass). Forward (inference, no autograd) and forward +
backward (gradients of h, residual, both weights and both biases).

The op is memory-bound (arithmetic intensity 4 m / (3 * elt) FLOP/byte: ~43 at m = 64 in
bf16, below the H100's ~260 ridge), so ``bytes`` is the figure to compare against:
* forward floor: read h and residual once, write out once, read the weights:
  ``elt * (3 T d + 2 m d + m + d)``. The fused kernel moves exactly that (z is not written
  without autograd).
* forward + backward floor: the forward's bytes plus reading dY and h and writing dh once
  (d residual = dY is returned as is), the weights again and their gradients:
  ``elt * (6 T d + 6 m d + 2 m + 2 d)``. The fused kernels move ``T d`` elements more (the
  weight-gradient kernel reads dY a second time) plus z and dz (``[T, m]`` fp32, written
  once, read twice: ~12 T m bytes).
``cublas_base`` is the frozen model without the adapter, ``h + residual``: the same
``3 T d`` elements the forward floor moves, so it is a measured floor (its output is not
compared).
FLOPs: forward 4 T d m (two GEMMs); backward 8 T d m more (dY Wu, dz Wd, dWu, dWd).
"""
from __future__ import annotations

import torch

from .. import reference
from ..ops.adapter import bottleneck_adapter
from .core import Case, add_knob_provider, compiled, generator, randn, warmed

GRAD_NAMES = ("h", "down_weight", "down_bias", "up_weight", "up_bias", "residual")


def _inputs(T, d, m, device, dtype, requires_grad, seed=0):
    g = generator(device, seed)

    def r(*shape, scale=1.0):
        return randn(g, *shape, dtype=dtype, scale=scale).requires_grad_(requires_grad)

    return dict(h=r(T, d), down_weight=r(m, d, scale=d ** -0.5), down_bias=r(m, scale=0.5),
                up_weight=r(d, m, scale=m ** -0.5), up_bias=r(d, scale=0.5), residual=r(T, d))


def _call(fn, a):
    return fn(a["h"], a["down_weight"], a["down_bias"], a["up_weight"], a["up_bias"], residual=a["residual"],
              activation="relu", scaling=1.0)


def _forward(fn, T, d, m, device, dtype):
    def build():
        args = _inputs(T, d, m, device, dtype, False)

        def run():
            with torch.no_grad():
                return _call(fn, args)
        return run
    return build


def _base(T, d, m, device, dtype):
    def build():
        args = _inputs(T, d, m, device, dtype, False)

        def run():
            with torch.no_grad():
                return args["h"] + args["residual"]
        return run
    return build


def _forward_backward(fn, T, d, m, device, dtype):
    def build():
        args = _inputs(T, d, m, device, dtype, True)
        dout = randn(generator(device, 1), T, d, dtype=dtype)
        wrt = [args[n] for n in GRAD_NAMES]

        def run():
            out = _call(fn, args)
            return torch.autograd.grad(out, wrt, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    T, dims = (33, (37,)) if small else (8192, (1024, 4096))
    widths = (8, 24) if small else (64, 256)
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for d in dims:
        for m in widths:
            shape = {"T": T, "d": d, "m": m}
            fwd_bytes = elt * (3 * T * d + 2 * m * d + m + d)
            formula = compiled(reference.bottleneck_adapter)
            fwd = Case(
                op="bottleneck_adapter_fwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward(bottleneck_adapter, T, d, m, device, dtype),
                           "eager": _forward(reference.bottleneck_adapter, T, d, m, device, dtype),
                           "cublas_base": _base(T, d, m, device, dtype),
                           "compile": warmed(_forward(formula, T, d, m, device, dtype))},
                flops=4.0 * T * d * m,
                bytes=fwd_bytes,
                paths_from="peftops.ops.adapter",
            )
            if not small and m <= 64:  # the forward's 64-row tiles vs the 32-row ones they replace
                add_knob_provider(fwd, "rows32", ("adapter", "kernel"), "peftops.kernels.adapter",
                                  {"FWD_TALL_ROWS": 2**62})
            out.append(fwd)
            out.append(Case(
                op="bottleneck_adapter_fwd_bwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward_backward(bottleneck_adapter, T, d, m, device, dtype),
                           "eager": _forward_backward(reference.bottleneck_adapter, T, d, m, device, dtype),
                           "compile": warmed(_forward_backward(formula, T, d, m, device, dtype))},
                flops=12.0 * T * d * m,
                bytes=elt * (6 * T * d + 6 * m * d + 2 * m + 2 * d),
                paths_from="peftops.ops.adapter",
            ))
    return out
