"""LoRA bench cases: forward and forward+backward, peftops vs eager vs ``torch.compile`` of
the eager formula vs peft vs the frozen base layer alone (cuBLAS: the physical floor), and
peftops with each of its paths forced (``peftops[kernel]``, ``peftops[cublas]``: the
``PATHS`` table of ``peftops.ops.lora``), and the kernel path with one of its unmeasured
choices switched off (``peftops[kernel:no_fuse_s]`` at T >= 257 without dropout: S by its
own pass instead of the TMA GEMM's main loop; ``peftops[kernel:no_split_k]`` at T <= 64:
one program per column tile), so one GPU run decides those knobs too.

Shapes (d = k = 4096, r in {16, 64}, bf16): forward at T in {16, 64, 512, 8192} tokens,
forward + backward at T in {16, 512, 8192}; at T = 8192 also forward + backward with LoRA
dropout 0.1 (``dropout`` in the shape; no CPU parity, the masks are random) and UniPELT's
gated LoRA (``gated_lora.fwd_bwd``, ``peftops.gated_lora_linear``, B = 4 x T = 2048, gate
per sequence; its paths from ``peftops.ops.unipelt``). ``small``: a few tiny shapes for the
CPU parity pass (T = 300 takes the large-T launch configs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.lora import lora_linear
from .core import Case, add_knob_provider, compiled, generator, randn, warmed


def _inputs(lead, d, k, r, dtype, device, grad):
    g = generator(device, 0)
    x = randn(g, *lead, k, dtype=dtype).requires_grad_(grad)
    w, b = randn(g, d, k, dtype=dtype, scale=k ** -0.5), randn(g, d, dtype=dtype)
    a = randn(g, r, k, dtype=dtype, scale=k ** -0.5).requires_grad_(grad)
    bb = randn(g, d, r, dtype=dtype, scale=r ** -0.5).requires_grad_(grad)  # non-zero B: a real trained state
    dy = randn(g, *lead, d, dtype=dtype)
    return x, w, b, a, bb, dy


def _peft_layer(w, b, a, bb, r, alpha, dropout):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    base.weight.data, base.bias.data = w, b
    base.requires_grad_(False)
    layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout), r=r, lora_alpha=alpha)
    layer.lora_A["default"].weight.data = a.detach().clone()
    layer.lora_B["default"].weight.data = bb.detach().clone()
    return layer


def _runner(call, params, dy, bwd):
    if not bwd:
        def fwd():
            with torch.no_grad():
                return call()
        return fwd

    def fwd_bwd():
        y = call()
        return (y, *torch.autograd.grad(y, params, dy))
    return fwd_bwd


def _case(op, T, d, k, r, dtype, device, dropout=0.0):
    alpha, scaling = 2 * r, 2.0
    bwd = op.endswith("fwd_bwd")
    compiled_formula = compiled(reference.lora_linear)

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs((T,), d, k, r, dtype, device, bwd)
            if provider == "peftops":
                call = lambda: lora_linear(x, w, b, a, bb, scaling, dropout_p=dropout)  # noqa: E731
                params = [x, a, bb]
            elif provider in ("eager", "compile"):
                fn = reference.lora_linear if provider == "eager" else compiled_formula
                call = lambda: fn(x, w, b, a, bb, scaling, dropout_p=dropout)  # noqa: E731
                params = [x, a, bb]
            elif provider == "peft":
                layer = _peft_layer(w, b, a, bb, r, alpha, dropout)
                call = lambda: layer(x)  # noqa: E731
                params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            else:  # cublas_base: the frozen layer alone
                call = lambda: F.linear(x, w, b)  # noqa: E731
                params = [x]
            return _runner(call, params, dy, bwd)
        return warmed(build) if provider == "compile" else build

    flops = 2.0 * T * d * k + 2.0 * T * r * (d + k)
    if bwd:
        flops *= 3  # dx GEMM + (dA, dB, dY B, dS A) rank-r work, roughly 2x the forward
    nbytes = dtype.itemsize * (T * k + d * k + T * d) * (2.5 if bwd else 1.0)
    shape = dict(T=T, d=d, k=k, r=r)
    if dropout:
        shape["dropout"] = dropout
    case = Case(op=op, shape=shape, dtype=dtype,
                providers={p: make(p) for p in ("cublas_base", "eager", "peft", "peftops", "compile")},
                flops=flops, bytes=nbytes, parity_with="peft",
                compare=() if dropout else ("peftops", "eager"), paths_from="peftops.ops.lora")
    # The kernel path's two unmeasured choices, each timed against its alternative in the same run:
    # S fused into the TMA GEMM's main loop (many rows, no dropout) vs its own pass; decode split-K
    # vs one program per column tile.
    knobs = "peftops.kernels.lora"
    if not dropout and T >= 257:
        add_knob_provider(case, "no_fuse_s", ("lora", "kernel"), knobs, {"TMA_FUSE_S": False})
    if T <= 64:
        add_knob_provider(case, "no_split_k", ("lora", "kernel"), knobs, {"DECODE_SPLIT_K": False})
    return case


def _gated_case(B, T, d, k, r, dtype, device, gate_mode="sequence"):
    """UniPELT's gated LoRA (scaling 1), forward + backward: grads of x, A, B and the gate."""
    from ..ops.unipelt import gated_lora_linear

    compiled_formula = compiled(reference.gated_lora_linear)

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs((B, T), d, k, r, dtype, device, True)
            g = generator(device, 1)
            gw = randn(g, 1, k, dtype=dtype, scale=k ** -0.5).requires_grad_(True)
            gb = randn(g, 1, dtype=dtype, scale=0.5).requires_grad_(True)
            if provider == "cublas_base":
                return _runner(lambda: F.linear(x, w, b), [x], dy, True)
            fn = {"peftops": gated_lora_linear, "eager": reference.gated_lora_linear,
                  "compile": compiled_formula}[provider]
            call = lambda: fn(x, w, b, a, bb, gw, gb, scaling=1.0, gate_mode=gate_mode)[0]  # noqa: E731
            return _runner(call, [x, a, bb, gw, gb], dy, True)
        return warmed(build) if provider == "compile" else build

    N = B * T
    flops = 3 * (2.0 * N * d * k + 2.0 * N * r * (d + k) + 2.0 * N * k)
    return Case(op="gated_lora.fwd_bwd", shape=dict(B=B, T=T, d=d, k=k, r=r, gate_mode=gate_mode), dtype=dtype,
                providers={p: make(p) for p in ("cublas_base", "eager", "peftops", "compile")},
                flops=flops, bytes=dtype.itemsize * (N * k + d * k + N * d) * 2.5, parity_with="eager",
                compare=("peftops",), paths_from="peftops.ops.unipelt")


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        grid = [(1, 67, 37, 7), (37, 67, 37, 7), (300, 129, 65, 16)]  # T=300: the large-T launch configs
        fwd, fwd_bwd = grid, grid
        dropout = [(37, 67, 37, 7)]
        gated = [(2, 13, 67, 37, 7)]
    else:
        fwd = [(T, 4096, 4096, r) for T in (16, 64, 512, 8192) for r in (16, 64)]
        fwd += [(16, 1024, 4096, 16)]  # decode through a narrow output (Llama-8B's k / v): split-K x 5
        fwd_bwd = [(T, 4096, 4096, r) for T in (16, 512, 8192) for r in (16, 64)]
        dropout = [(8192, 4096, 4096, r) for r in (16, 64)]
        gated = [(4, 2048, 4096, 4096, r) for r in (16, 64)]
    out = [_case("lora.fwd", *s, dtype, device) for s in fwd]
    out += [_case("lora.fwd_bwd", *s, dtype, device) for s in fwd_bwd]
    out += [_case("lora.fwd_bwd", *s, dtype, device, dropout=0.1) for s in dropout]
    out += [_gated_case(*s, dtype, device) for s in gated]
    return out
