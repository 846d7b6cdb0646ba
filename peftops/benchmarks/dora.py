"""DoRA bench cases: forward and forward+backward of ``peftops.dora_linear`` vs the eager
formula (``reference.dora_linear``: the direct norm, an [out, in] tensor) vs its
``torch.compile`` vs peft's own DoRA layer, beside our LoRA (``peftops_lora``: the bar is
DoRA fwd+bwd <= 1.15x it at T = 8192), peft's LoRA (``peft_lora``) and the frozen layer
alone (``cublas_base``), and peftops with each path of ``peftops.ops.dora.PATHS`` forced
(``peftops[kernel]``, ``peftops[cublas]``). The forward also has ``peftops_cached``: the
norm kept from an earlier call (eval / decode with unchanged A, B: the module's cache).

Shapes: d = k = 4096, r = 16, bf16, T in {16, 512, 8192}, magnitude and B non-zero (a
trained state). ``small``: tiny shapes for the CPU parity pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.dora import DoraNormCache, dora_linear
from ..ops.lora import lora_linear
from .core import Case, add_knob_provider, compiled, generator, randn, warmed
from .lora import _inputs, _peft_layer, _runner


def _peft_dora_layer(w, b, a, bb, m, r, alpha):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    base.weight.data, base.bias.data = w, b
    base.requires_grad_(False)
    layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha, use_dora=True), r=r, lora_alpha=alpha,
                       use_dora=True)
    layer.lora_A["default"].weight.data = a.detach().clone()
    layer.lora_B["default"].weight.data = bb.detach().clone()
    layer.lora_magnitude_vector["default"].weight.data = m.detach().clone()
    return layer


def _case(op, T, d, k, r, dtype, device):
    alpha, scaling = 2 * r, 2.0
    bwd = op.endswith("fwd_bwd")
    compiled_formula = compiled(reference.dora_linear)

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs((T,), d, k, r, dtype, device, bwd)
            g = generator(device, 2)
            n = reference.dora_weight_norm(w, a, bb, scaling)
            m = (n * (1 + 0.1 * randn(g, d, dtype=torch.float32))).to(dtype).requires_grad_(bwd)
            if provider in ("peftops", "peftops_cached"):
                cache = DoraNormCache() if provider == "peftops_cached" else None
                call = lambda: dora_linear(x, w, b, a, bb, m, scaling, norm_cache=cache)  # noqa: E731
                if cache is not None:
                    with torch.no_grad():
                        call()
                params = [x, a, bb, m]
            elif provider in ("eager", "compile"):
                fn = reference.dora_linear if provider == "eager" else compiled_formula
                call = lambda: fn(x, w, b, a, bb, m, scaling)  # noqa: E731
                params = [x, a, bb, m]
            elif provider == "peft":
                layer = _peft_dora_layer(w, b, a, bb, m, r, alpha)
                call = lambda: layer(x)  # noqa: E731
                params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                          layer.lora_magnitude_vector["default"].weight]
            elif provider == "peftops_lora":
                call = lambda: lora_linear(x, w, b, a, bb, scaling)  # noqa: E731
                params = [x, a, bb]
            elif provider == "peft_lora":
                layer = _peft_layer(w, b, a, bb, r, alpha, 0.0)
                call = lambda: layer(x)  # noqa: E731
                params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            else:  # cublas_base: the frozen layer alone
                call = lambda: F.linear(x, w, b)  # noqa: E731
                params = [x]
            return _runner(call, params, dy, bwd)
        return warmed(build) if provider == "compile" else build

    # bench/MODEL.md "DoRA": LoRA's work plus one read of W (the norm pass: 2 d k r FLOPs) and,
    # in backward, one pass over dY and y writing c dY.
    flops = 2.0 * T * d * k + 2.0 * T * r * (d + k) + 2.0 * d * k * r
    if bwd:
        flops = 3 * (2.0 * T * d * k + 2.0 * T * r * (d + k)) + 2.0 * d * k * r
    nbytes = dtype.itemsize * ((T * k + d * k + T * d) * (2.5 if bwd else 1.0) + d * k + (3 * T * d if bwd else 0))
    providers = ["cublas_base", "eager", "peft", "peftops", "compile", "peftops_lora", "peft_lora"]
    if not bwd:
        providers.append("peftops_cached")
    case = Case(op=op, shape=dict(T=T, d=d, k=k, r=r), dtype=dtype, providers={p: make(p) for p in providers},
                flops=flops, bytes=nbytes, parity_with="peft",
                compare=("peftops", "eager") + (("peftops_cached",) if not bwd else ()),
                paths_from="peftops.ops.dora")
    if T >= 257:  # m / n in the TMA GEMM's epilogue at 128x256 (248 regs) vs 128x128 tiles
        add_knob_provider(case, "colscale_128", ("dora", "kernel"), "peftops.kernels.lora", {"TMA_COLSCALE_WIDE": False})
    return case


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        grid = [(1, 67, 37, 7), (37, 67, 37, 7), (300, 129, 65, 16)]  # T = 300: the large-T launch configs
    else:
        grid = [(T, 4096, 4096, 16) for T in (16, 512, 8192)]
    return [_case("dora.fwd", *s, dtype, device) for s in grid] + [_case("dora.fwd_bwd", *s, dtype, device)
                                                                  for s in grid]
