"""LoRA bench cases: forward and forward+backward, peftops vs eager vs peft vs the frozen
base layer alone (cuBLAS: the physical floor)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.lora import lora_linear
from .core import Case


def _inputs(T, d, k, r, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, k).requires_grad_(grad)
    w, b = rnd(d, k, scale=k ** -0.5), rnd(d)
    a = rnd(r, k, scale=k ** -0.5).requires_grad_(grad)
    bb = rnd(d, r, scale=r ** -0.5).requires_grad_(grad)  # non-zero B: a real trained state
    dy = rnd(T, d)
    return x, w, b, a, bb, dy


def _peft_layer(w, b, a, bb, r, alpha):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    base.weight.data, base.bias.data = w, b
    base.requires_grad_(False)
    layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
    layer.lora_A["default"].weight.data = a.detach().clone()
    layer.lora_B["default"].weight.data = bb.detach().clone()
    return layer


def _case(op, T, d, k, r, dtype, device):
    alpha, scaling = 2 * r, 2.0
    bwd = op.endswith("fwd_bwd")

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs(T, d, k, r, dtype, device, bwd)
            if provider == "peftops":
                call = lambda: lora_linear(x, w, b, a, bb, scaling)  # noqa: E731
                params = [x, a, bb]
            elif provider == "eager":
                call = lambda: reference.lora_linear(x, w, b, a, bb, scaling)  # noqa: E731
                params = [x, a, bb]
            elif provider == "peft":
                layer = _peft_layer(w, b, a, bb, r, alpha)
                call = lambda: layer(x)  # noqa: E731
                params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            else:  # cublas_base: the frozen layer alone
                call = lambda: F.linear(x, w, b)  # noqa: E731
                params = [x]
            if not bwd:
                def fwd():
                    with torch.no_grad():
                        return call()
                return fwd

            def fwd_bwd():
                y = call()
                return (y, *torch.autograd.grad(y, params, dy))
            return fwd_bwd
        return build

    flops = 2.0 * T * d * k + 2.0 * T * r * (d + k)
    if bwd:
        flops *= 3  # dx GEMM + (dA, dB, dY B, dS A) rank-r work, roughly 2x the forward
    nbytes = dtype.itemsize * (T * k + d * k + T * d) * (2.5 if bwd else 1.0)
    return Case(op=op, shape=dict(T=T, d=d, k=k, r=r), dtype=dtype,
                providers={p: make(p) for p in ("cublas_base", "eager", "peft", "peftops")},
                flops=flops, bytes=nbytes, parity_with="peft", compare=("peftops", "eager"))


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        grid = [(1, 67, 37, 7), (37, 67, 37, 7), (300, 129, 65, 16)]  # T=300: the large-T launch configs
    else:
        grid = [(T, 4096, 4096, r) for T in (16, 512, 8192) for r in (16, 64)]
    return [_case(op, T, d, k, r, dtype, device) for op in ("lora.fwd", "lora.fwd_bwd") for T, d, k, r in grid]
