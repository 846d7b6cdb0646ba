"""(IA)^3 benchmark cases: ``peftops.ia3_linear`` vs the frozen base GEMM alone
(``cublas_base``, the physical floor; bars in bench/targets.toml), the eager formula
(``reference.ia3_linear``), that formula under ``torch.compile`` (``compile``), HF PEFT's
own IA3 ``Linear`` layer (``peft``), and peftops with each path of ``peftops.ops.ia3``'s
``PATHS`` forced (``peftops[<path>]``, when the module has the table).

Shapes: T in {16, 8192} tokens, in = out = 4096 (``small``: T in {1, 37}, in 45, out 67 for
the CPU parity pass), output scaling (k / v) and input scaling (feed-forward). Forward runs
without autograd; forward + backward trains l only (the base frozen, x requires grad), so
the peftops / eager / peft providers return (dx, dl) and ``cublas_base`` returns dx of
the plain linear layer (its floor: one GEMM forward, one backward).

FLOPs: the GEMMs, 2 T in out forward and as much again backward (dl is a column sum,
T * n). Bytes, the floor: x, W, y once forward (+ l); backward adds dy, dx and W again
(+ y for output scaling, x again for input scaling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.ia3 import ia3_linear
from .core import Case, compiled, generator, randn, warmed


def _inputs(T, n_in, n_out, ff, device, dtype, requires_grad, seed=0):
    g = generator(device, seed)

    def r(*shape, scale=1.0, shift=0.0):
        return randn(g, *shape, dtype=dtype, scale=scale, shift=shift)

    x = r(T, n_in).requires_grad_(requires_grad)
    weight = r(n_out, n_in, scale=n_in ** -0.5)
    bias = r(n_out, scale=0.1)
    l = r(n_in if ff else n_out, scale=0.2, shift=1.0).requires_grad_(requires_grad)  # not peft's ones
    return x, weight, bias, l


def _peft_layer(weight, bias, l, ff):
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear as PeftIA3

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    base.requires_grad_(False)
    cfg = IA3Config(target_modules=["lin"], feedforward_modules=["lin"] if ff else [])
    layer = PeftIA3(base, "default", cfg, is_feedforward=ff)
    with torch.no_grad():
        layer.ia3_l["default"].copy_(l.detach().view_as(layer.ia3_l["default"]))
    return layer


def _provider(name, T, n_in, n_out, ff, device, dtype, backward):
    formula = compiled(reference.ia3_linear) if name == "compile" else reference.ia3_linear

    def build():
        x, weight, bias, l = _inputs(T, n_in, n_out, ff, device, dtype, backward)
        if name == "peftops":
            def fn():
                return ia3_linear(x, weight, bias, l, feedforward=ff)
            wrt = [x, l]
        elif name in ("eager", "compile"):
            def fn():
                return formula(x, weight, bias, l, feedforward=ff)
            wrt = [x, l]
        elif name == "peft":
            layer = _peft_layer(weight, bias, l, ff)
            if not backward:
                layer.requires_grad_(False)

            def fn():
                return layer(x)
            wrt = [x, layer.ia3_l["default"]]
        else:  # cublas_base: the frozen layer alone
            def fn():
                return F.linear(x, weight, bias)
            wrt = [x]
        if not backward:
            def run():
                with torch.no_grad():
                    return fn()
            return run
        dy = randn(generator(device, 1), T, n_out, dtype=dtype)

        def run():
            grads = torch.autograd.grad(fn(), wrt, dy)
            # (dx, dl) with dl flat: peft's l is stored (out, 1) / (1, in)
            return tuple(g if i == 0 else g.reshape(-1) for i, g in enumerate(grads))
        return run
    return warmed(build) if name == "compile" else build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    sizes = [(1, 45, 67), (37, 45, 67)] if small else [(16, 4096, 4096), (8192, 4096, 4096)]
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for T, n_in, n_out in sizes:
        for ff in (False, True):
            shape = {"T": T, "in": n_in, "out": n_out, "scaling": "input" if ff else "output"}
            n = n_in if ff else n_out
            gemm = 2.0 * T * n_in * n_out
            fwd_bytes = elt * (T * n_in + n_in * n_out + T * n_out + n_out + n)
            bwd_bytes = elt * (T * n_out + n_in * n_out + T * n_in + (T * n_in if ff else T * n_out) + n)
            names = ("peftops", "eager", "peft", "cublas_base", "compile")
            for backward in (False, True):
                out.append(Case(
                    op="ia3_fwd_bwd" if backward else "ia3_fwd", shape=shape, dtype=dtype,
                    providers={p: _provider(p, T, n_in, n_out, ff, device, dtype, backward) for p in names},
                    flops=gemm * (2 if backward else 1) + (2.0 * T * n if backward else T * n_out),
                    bytes=fwd_bytes + (bwd_bytes if backward else 0),
                    parity_with="eager",
                    compare=("peftops", "peft"),
                    paths_from="peftops.ops.ia3",
                ))
    return out
