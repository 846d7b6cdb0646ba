"""QLoRA bench cases: LoRA over a 4-bit (nf4, blocksize 64, double quantisation) base,
forward and forward + backward.

Providers: ``peftops`` (``peftops.qlora_linear``) and ``peftops[<path>]`` for each path of
``peftops.ops.qlora.PATHS`` (``gemv``: the fused dequantise-GEMV, T <= 64 only, larger T
runs ``dequant``; ``dequant``: dequantise into the workspace + our LoRA); ``eager``: the
formula bitsandbytes runs (dequantise to bf16, then the LoRA matmuls), here in plain
PyTorch (``peftops.reference.qlora_linear``), so it runs where bitsandbytes does not; ``peft``:
peft's ``lora.bnb.Linear4bit`` over bitsandbytes' ``Linear4bit`` (recorded as failed, with the
reason, where bitsandbytes is not installed: the GPU image lacks it); ``lora_bf16``: our
LoRA on the dense bf16 W (the bar: QLoRA fwd+bwd <= 1.25x it); ``cublas_base``: the dense
bf16 base GEMM alone (the bar for 4-bit decode at T <= 16: faster than it).

The 4-bit W comes from ``peftops.quantize_4bit`` (bitsandbytes' format, no bitsandbytes
needed); the ``peft`` provider quantises the same W with bitsandbytes (same bytes).
Shapes: d = k = 4096, r = 16, T in {16, 512, 8192}, bf16; ``small``: tiny shapes for the
CPU parity pass (both paths). QDoRA (``qdora.fwd_bwd``, the same shapes): ``peftops.qdora_linear``
vs the eager formula (dequantise, then DoRA) and our DoRA on the dense bf16 W (``dora_bf16``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.dequant import quantize_4bit
from ..ops.lora import lora_linear
from ..ops.qlora import qlora_linear
from .core import Case, generator, randn

BLOCKSIZE, QUANT_TYPE, DOUBLE_QUANT = 64, "nf4", True


def _inputs(T, d, k, r, dtype, device, grad):
    g = generator(device, 0)
    x = randn(g, T, k, dtype=dtype).requires_grad_(grad)
    w, b = randn(g, d, k, dtype=dtype, scale=k ** -0.5), randn(g, d, dtype=dtype)
    a = randn(g, r, k, dtype=dtype, scale=k ** -0.5).requires_grad_(grad)
    bb = randn(g, d, r, dtype=dtype, scale=r ** -0.5).requires_grad_(grad)  # non-zero B: a trained state
    dy = randn(g, T, d, dtype=dtype)
    return x, w, b, a, bb, dy


def _peft_layer(w, b, a, bb, r, alpha, dtype):
    """peft's lora.bnb.Linear4bit over bitsandbytes' Linear4bit holding ``w`` in nf4."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError as e:
        raise RuntimeError(f"peft + bitsandbytes provider skipped: bitsandbytes is not installed ({e})") from None
    d, k = w.shape
    base = bnb.nn.Linear4bit(k, d, bias=True, compute_dtype=dtype, compress_statistics=DOUBLE_QUANT,
                             quant_type=QUANT_TYPE)
    base.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type=QUANT_TYPE,
                                    compress_statistics=DOUBLE_QUANT, blocksize=BLOCKSIZE)
    base.bias = torch.nn.Parameter(b.detach().cpu(), requires_grad=False)
    base = base.to(w.device)
    layer = Linear4bit(base, "default", LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)
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


def _case(op, T, d, k, r, dtype, device):
    alpha, scaling = 2 * r, 2.0
    bwd = op.endswith("fwd_bwd")

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs(T, d, k, r, dtype, device, bwd)
            if provider in ("peftops", "eager"):
                q = quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=DOUBLE_QUANT)
                fn = qlora_linear if provider == "peftops" else reference.qlora_linear
                call = lambda: fn(x, q, b, a, bb, scaling)  # noqa: E731
                params = [x, a, bb]
            elif provider == "peft":
                layer = _peft_layer(w, b, a, bb, r, alpha, dtype)
                call = lambda: layer(x)  # noqa: E731
                params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            elif provider == "lora_bf16":
                call = lambda: lora_linear(x, w, b, a, bb, scaling)  # noqa: E731
                params = [x, a, bb]
            else:  # cublas_base: the dense frozen layer alone
                call = lambda: F.linear(x, w, b)  # noqa: E731
                params = [x]
            return _runner(call, params, dy, bwd)
        return build

    flops = 2.0 * T * d * k + 2.0 * T * r * (d + k)
    # bytes: 4-bit W (0.5 B/elem + 1 B absmax per 64 with double quant) read once; x, y
    w_bytes = d * k * (0.5 + 1.0 / BLOCKSIZE)
    nbytes = w_bytes + dtype.itemsize * (T * k + T * d)
    if bwd:
        flops *= 3
        nbytes = 2 * nbytes + dtype.itemsize * (T * d + T * k)
    return Case(op=op, shape=dict(T=T, d=d, k=k, r=r, quant=f"{QUANT_TYPE}-bs{BLOCKSIZE}-dq"), dtype=dtype,
                providers={p: make(p) for p in ("cublas_base", "lora_bf16", "eager", "peft", "peftops")},
                flops=flops, bytes=nbytes, parity_with="eager", compare=("peftops",), paths_from="peftops.ops.qlora")


def _qdora_case(T, d, k, r, dtype, device):
    """QDoRA fwd+bwd: ``peftops.qdora_linear`` vs the eager formula (dequantise, then DoRA)
    and our DoRA on the dense bf16 W (``dora_bf16``)."""
    from ..ops.dora import dora_linear
    from ..ops.qlora import qdora_linear

    scaling = 2.0

    def make(provider):
        def build():
            x, w, b, a, bb, dy = _inputs(T, d, k, r, dtype, device, True)
            m = (randn(generator(device, 2), d, dtype=torch.float32, scale=0.1, shift=1.0)).requires_grad_(True)
            q = quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, double_quant=DOUBLE_QUANT)
            if provider == "dora_bf16":
                call = lambda: dora_linear(x, w, b, a, bb, m, scaling)  # noqa: E731
            else:
                fn = qdora_linear if provider == "peftops" else reference.qdora_linear
                call = lambda: fn(x, q, b, a, bb, m, scaling)  # noqa: E731
            return _runner(call, [x, a, bb, m], dy, True)
        return build

    flops = 3 * (2.0 * T * d * k + 2.0 * T * r * (d + k)) + 2.0 * d * k * r
    return Case(op="qdora.fwd_bwd", shape=dict(T=T, d=d, k=k, r=r, quant=f"{QUANT_TYPE}-bs{BLOCKSIZE}-dq"),
                dtype=dtype, providers={p: make(p) for p in ("dora_bf16", "eager", "peftops")}, flops=flops,
                parity_with="eager", compare=("peftops",))


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        grid = [(5, 48, 128, 7), (80, 48, 128, 7)]  # gemv and dequant paths
    else:
        grid = [(T, 4096, 4096, 16) for T in (16, 512, 8192)]
    out = [_case(op, *s, dtype, device) for op in ("qlora.fwd", "qlora.fwd_bwd") for s in grid]
    return out + [_qdora_case(*s, dtype, device) for s in grid]
