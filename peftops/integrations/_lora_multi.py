"""peft's mixed-adapter batches (``model(..., adapter_names=[...])``, ``generate(adapter_names=...)``)
on ``peftops.lora_linear_multi``, for accelerated LoRA layers (``PeftopsLoraLinear``).

peft's model-level hook hands every LoRA layer ``adapter_names=`` (one name per sample,
``"__base__"`` for none; it already refused training mode and unknown names). Here a layer:
* runs peft's own ``_check_forward_args`` first, so peft's errors stay peft's (a length
  mismatch, merged adapters, DoRA in a mixed batch);
* maps the names onto its adapter stack (``"__base__"`` and names this layer lacks -> -1,
  as peft's ``_mixed_batch_forward`` skips them);
* keeps the stack -- A ``[n, r_max, in]``, B ``[n, out, r_max]`` zero-padded, scalings
  ``[n]`` on the device -- built once and rebuilt when any adapter's parameters change
  (identity, storage, ``_version`` -- in-place optimiser steps bump it --, dtype, device,
  rank, scaling, the set of adapters). When autograd needs the adapters' gradients the
  stack is built per call from the parameters (differentiable), not cached.
Cases the op does not take go to peft's forward, counted as ``accelerate.lora.peft_forward``
(with the reason under ``accelerate.lora_multi.peft_forward:<reason>``): dropout in training
mode, a LoRA variant or ``lora_bias`` on an adapter the batch uses, an input dtype other
than the base weight's, autocast, other keyword arguments (aLoRA offsets).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import _dispatch
from ..ops.lora_multi import lora_linear_multi

__all__ = ["mixed_batch_forward"]


def _count(key: str) -> None:
    _dispatch._bump(key)


def mixed_batch_forward(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """The layer's output for a mixed batch, or None when peft's forward must run it."""
    if args or set(kwargs) != {"adapter_names"}:
        return _leave("extra forward arguments")
    adapter_names = kwargs["adapter_names"]
    layer._check_forward_args(x, *args, **kwargs)                                # peft's checks, peft's errors
    if layer.disable_adapters:                                                   # peft: disabling wins, the
        return layer.base_layer(x)                                               # base layer alone (not merged:
                                                                                 # checked above)
    names = list(layer.lora_A.keys())
    used = {a for a in adapter_names if a in layer.lora_A}
    if not used:
        return layer.base_layer(x)
    reason = _unsupported(layer, x, used)
    if reason is not None:
        return _leave(reason)
    a, b, scale = _stack(layer, names, x.dtype, x.device, used, train=torch.is_grad_enabled() and any(
        layer.lora_A[n].weight.requires_grad or layer.lora_B[n].weight.requires_grad for n in used))
    idx = _index(layer, names, adapter_names, x.device)
    bias = getattr(layer.base_layer, "bias", None)
    _count("accelerate.lora_multi.peftops")
    return lora_linear_multi(x, layer._base_weight(), bias, a, b, scale, idx)


def _leave(reason: str):
    _count(f"accelerate.lora_multi.peft_forward:{reason}")
    return None


def _unsupported(layer, x, used) -> str | None:
    if x.dtype != layer.base_layer.weight.dtype:
        return "input dtype differs from the base weight's"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    for name in used:
        if name in layer.lora_variant:
            return "LoRA variant"
        if layer.lora_bias.get(name, False):
            return "lora_bias"
        drop = layer.lora_dropout[name]
        if layer.training and isinstance(drop, nn.Dropout) and drop.p > 0:
            return "dropout in training mode"
    return None


def _param_key(p: torch.Tensor):
    return (id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))


def _stack_dtype(layer, names, x_dtype):
    dts = {layer.lora_A[n].weight.dtype for n in names} | {layer.lora_B[n].weight.dtype for n in names}
    if len(dts) == 1:
        dt = dts.pop()
        if dt == x_dtype or (dt == torch.float32 and x_dtype in (torch.float16, torch.bfloat16)):
            return dt                                   # fp32 adapters over a half base: read as they are
    return x_dtype


def _stack(layer, names, x_dtype, device, used, train: bool):
    """(A [n, r_max, in], B [n, out, r_max], scalings [n] fp32) for the layer's adapters.
    ``train``: built from the parameters of the adapters in ``used`` (the others detached, so
    they get no gradient, as in peft, where rows of no adapter never touch it)."""
    dt = _stack_dtype(layer, names, x_dtype)
    key = (tuple(names), dt, str(device), tuple(float(layer.scaling[n]) for n in names),
           tuple(_param_key(layer.lora_A[n].weight) + _param_key(layer.lora_B[n].weight) for n in names))
    cache = getattr(layer, "_peftops_multi_stack", None)
    if not train and cache is not None and cache[0] == key:
        return cache[1]
    r_max = max(layer.lora_A[n].weight.shape[0] for n in names)

    def w(mod, n):
        return mod[n].weight if n in used else mod[n].weight.detach()

    def build():
        a = torch.stack([nn.functional.pad(w(layer.lora_A, n).to(dt), (0, 0, 0, r_max - layer.lora_A[n].weight.shape[0]))
                         for n in names])
        b = torch.stack([nn.functional.pad(w(layer.lora_B, n).to(dt), (0, r_max - layer.lora_B[n].weight.shape[1]))
                         for n in names])
        return a, b

    if train:                                         # differentiable: grads reach each adapter's parameters
        a, b = build()
    else:
        with torch.no_grad():
            a, b = build()
    scale = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32).to(device)
    if not train:
        layer._peftops_multi_stack = (key, (a, b, scale))
    else:
        layer.__dict__.pop("_peftops_multi_stack", None)
    _count("accelerate.lora_multi.stack_built")
    return a, b, scale


def _index(layer, names, adapter_names, device) -> torch.Tensor:
    """One int32 adapter id per sample (-1: ``"__base__"`` or an adapter this layer lacks),
    on ``device``; kept for the next layer call with the same names (a decode step calls
    every layer with the same list)."""
    key = (tuple(names), tuple(adapter_names), str(device))
    cache = getattr(layer, "_peftops_multi_index", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    pos = {n: i for i, n in enumerate(names)}
    idx = torch.tensor([pos.get(a, -1) for a in adapter_names], dtype=torch.int32).to(device)
    layer._peftops_multi_index = (key, idx)
    return idx
