"""Mixed-adapter LoRA bench cases (``peftops.lora_linear_multi``; peft's ``adapter_names=``).

Providers: ``peftops`` (and ``peftops[sgmv]`` / ``peftops[bgmv]``, the ``PATHS`` of
``peftops.ops.lora_multi``), ``peft`` (peft's LoRA ``Linear`` holding the n adapters, called
with ``adapter_names=``: its per-adapter gather / scatter loop), ``lora_loop`` (what a user
writes with ``peftops.lora_linear``: one call per adapter on its rows, the row lists made
beforehand), and ``cublas_base`` (the frozen layer alone: the floor).

Shapes (bf16, d = k = 4096, r = 16, n in {1, 4, 16, 64} adapters in the stack):
``lora_multi.fwd`` at prefill (16 sequences x 512 tokens, sequence i on adapter i mod n, so
at most 16 adapters are present) and decode (64 sequences x 1 token, a fixed shuffle of
sequence -> adapter i mod n); ``lora_multi.fwd_bwd`` at prefill with 4 and 16 adapters
(every adapter's dA, dB and dx). ``small``: tiny shapes for the CPU parity pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.lora import lora_linear
from ..ops.lora_multi import lora_linear_multi
from .core import Case, generator, randn


def _inputs(B, L, d, k, r, n, dtype, device, grad):
    g = generator(device, 0)
    x = randn(g, B, L, k, dtype=dtype).requires_grad_(grad)
    w, b = randn(g, d, k, dtype=dtype, scale=k ** -0.5), randn(g, d, dtype=dtype)
    a = randn(g, n, r, k, dtype=dtype, scale=k ** -0.5).requires_grad_(grad)
    bb = randn(g, n, d, r, dtype=dtype, scale=r ** -0.5).requires_grad_(grad)
    seq_adapter = _seq_adapters(B, L, n)
    scal = [1.0 + 0.25 * (i % 4) for i in range(n)]
    dy = randn(g, B, L, d, dtype=dtype)
    return x, w, b, a, bb, seq_adapter, scal, dy


def _peft_layer(w, b, a, bb, scal, r):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    base.weight.data, base.bias.data = w, b
    base.requires_grad_(False)
    layer = PeftLinear(base, "a0", LoraConfig(r=r, lora_alpha=scal[0] * r), r=r, lora_alpha=scal[0] * r)
    for i in range(1, a.shape[0]):
        layer.update_layer(f"a{i}", r, scal[i] * r, config=LoraConfig(r=r, lora_alpha=scal[i] * r))
    for i in range(a.shape[0]):
        layer.lora_A[f"a{i}"].weight.data = a[i].detach().clone()
        layer.lora_B[f"a{i}"].weight.data = bb[i].detach().clone()
        layer.lora_A[f"a{i}"].weight.requires_grad_(a.requires_grad)  # every adapter trained (peft: the active one)
        layer.lora_B[f"a{i}"].weight.requires_grad_(bb.requires_grad)
    layer.eval()
    return layer


def _case(op, B, L, d, k, r, n, dtype, device):
    bwd = op.endswith("fwd_bwd")

    def make(provider):
        def build():
            x, w, b, a, bb, seq_adapter, scal, dy = _inputs(B, L, d, k, r, n, dtype, device, bwd)
            if provider == "peftops":
                idx = torch.tensor(seq_adapter, dtype=torch.int32, device=device)
                sc = torch.tensor(scal, device=device)
                call = lambda: lora_linear_multi(x, w, b, a, bb, sc, idx)  # noqa: E731
                params = [x, a, bb]
            elif provider == "peft":
                layer = _peft_layer(w, b, a, bb, scal, r)
                names = [f"a{i}" for i in seq_adapter]
                call = lambda: layer(x, adapter_names=names)  # noqa: E731
                params = [x] + [layer.lora_A[f"a{i}"].weight for i in range(n)] + \
                    [layer.lora_B[f"a{i}"].weight for i in range(n)]
            elif provider == "lora_loop":
                groups = [(i, torch.tensor([s for s, j in enumerate(seq_adapter) if j == i], device=device))
                          for i in range(n) if i in seq_adapter]
                x2 = x

                def call():
                    out = torch.empty(B, L, d, dtype=dtype, device=device)
                    for i, rows in groups:
                        out[rows] = lora_linear(x2[rows], w, b, a[i], bb[i], scal[i])
                    return out
                params = [x, a, bb]
            else:  # cublas_base
                call = lambda: F.linear(x, w, b)  # noqa: E731
                params = [x]
            if not bwd:
                def fwd():
                    with torch.no_grad():
                        return call()
                return fwd
            if provider == "peft":  # per-adapter parameters: stack its grads like ours
                def fwd_bwd():
                    y = call()
                    gs = torch.autograd.grad(y, params, dy)
                    return y, gs[0], torch.stack(gs[1:1 + n]), torch.stack(gs[1 + n:])
                return fwd_bwd

            def fwd_bwd():
                y = call()
                return (y, *torch.autograd.grad(y, params, dy, allow_unused=provider == "cublas_base"))
            return fwd_bwd
        return build

    T = B * L
    present = len(set(_seq_adapters(B, L, n)))
    flops = 2.0 * T * d * k + 2.0 * T * r * (d + k)
    # bytes: x, W, y once; each adapter present: its A and B once
    nbytes = dtype.itemsize * (T * k + d * k + T * d + present * r * (d + k))
    if bwd:
        flops *= 3
        nbytes *= 2.5
    providers = ("cublas_base", "peft", "lora_loop", "peftops")
    return Case(op=op, shape=dict(B=B, L=L, d=d, k=k, r=r, n=n), dtype=dtype,
                providers={p: make(p) for p in providers}, flops=flops, bytes=nbytes, parity_with="peft",
                compare=("peftops", "lora_loop"), paths_from="peftops.ops.lora_multi")


def _seq_adapters(B, L, n):
    """Adapter of each sequence: i mod n, sequences shuffled (fixed seed) at decode."""
    order = torch.randperm(B, generator=torch.Generator().manual_seed(1)) if L == 1 else torch.arange(B)
    return (order % n).tolist()


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        fwd = [(4, 9, 37, 67, 7, n) for n in (1, 3)] + [(8, 1, 37, 67, 7, n) for n in (1, 8)]
        fwd_bwd = [(4, 9, 37, 67, 7, 3)]
    else:
        fwd = [(16, 512, 4096, 4096, 16, n) for n in (1, 4, 16, 64)]
        fwd += [(64, 1, 4096, 4096, 16, n) for n in (1, 4, 16, 64)]
        fwd_bwd = [(16, 512, 4096, 4096, 16, n) for n in (4, 16)]
    out = [_case("lora_multi.fwd", *s, dtype, device) for s in fwd]
    out += [_case("lora_multi.fwd_bwd", *s, dtype, device) for s in fwd_bwd]
    return out
