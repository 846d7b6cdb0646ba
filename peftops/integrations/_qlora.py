"""QLoRA half of ``peftops.accelerate``: peft's ``lora.bnb.Linear4bit`` (LoRA over a
bitsandbytes 4-bit base) on ``peftops.qlora_linear``. Same class-swap design as LoRA (see
``accelerate.py``): the layer keeps its identity and peft's state protocol (``merge`` /
``unmerge`` dequantise-add-requantise, ``set_adapter``, saving: all peft's); only
``forward`` is ``peftops.QLoraLinear``'s, reading the 4-bit weight in place.

Imported only when peft's bitsandbytes layer exists (bitsandbytes installed).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

from ..nn.lora import LoraLinear
from ..nn.qlora import QLoraLinear, compute_dtype
from ..ops.dequant import Quant4bit
from .accelerate import _bind_peft_names, _count, _is_dora_variant


class PeftopsLoraLinear4bit(PeftLoraLinear4bit, QLoraLinear):
    """peft's LoRA ``Linear4bit`` whose forward runs ``peftops.qlora_linear``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        reason = self._peftops_unsupported(x, args, kwargs)
        if reason is not None:
            _count("accelerate.qlora.peft_forward")
            _count(f"accelerate.qlora.peft_forward:{reason}")
            return PeftLoraLinear4bit.forward(self, x, *args, **kwargs)
        return QLoraLinear.forward(self, x)

    def _peftops_unsupported(self, x, args, kwargs) -> str | None:
        if args or kwargs:
            return "extra forward arguments (e.g. adapter_names)"
        if self.disable_adapters or self.merged:
            return None  # QLoraLinear.forward runs the base layer alone (unmerging first)
        variants = [a for a in self.active_adapters if a in self.lora_variant]
        if any(not _is_dora_variant(self.lora_variant[a]) for a in variants):
            return "LoRA variant other than DoRA"
        if variants and len(self.active_adapters) > 1:
            return "DoRA over a 4-bit base with several active adapters"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast"
        if x.dtype != compute_dtype(self.base_layer, x):
            return "input dtype differs from the 4-bit layer's compute dtype"
        return _weight_reason(self.base_layer)

    # peft's merge / unmerge (dequantise, add, requantise: a new 4-bit weight), then the
    # cached DoRA norms go
    def merge(self, *args, **kwargs) -> None:
        self.dora_cache_clear()
        PeftLoraLinear4bit.merge(self, *args, **kwargs)
        self.dora_cache_clear()

    def unmerge(self, *args, **kwargs) -> None:
        self.dora_cache_clear()
        PeftLoraLinear4bit.unmerge(self, *args, **kwargs)
        self.dora_cache_clear()

    def _get_name(self) -> str:  # repr as peft's own layer: "lora.Linear4bit(...)"
        return PeftLoraLinear4bit.__name__


# peft's definitions win for every name peftops' module (QLoraLinear and the LoraLinear it
# extends) also defines, except forward (the MRO puts LoraLinear before peft's LoraLayer)
_bind_peft_names(PeftopsLoraLinear4bit, PeftLoraLinear4bit, QLoraLinear)
_bind_peft_names(PeftopsLoraLinear4bit, PeftLoraLinear4bit, LoraLinear)


def _weight_reason(base) -> str | None:
    try:
        Quant4bit.from_bnb(base.weight)
    except (TypeError, ValueError) as e:
        return f"4-bit weight not readable by the peftops dequantiser: {e}"
    return None


def qlora_reason(layer) -> str | None:
    """Why this peft ``Linear4bit`` cannot be accelerated (None if it can)."""
    base = layer.base_layer
    if getattr(getattr(base, "weight", None), "quant_state", None) is None:
        return f"base layer {type(base).__name__} has no 4-bit quant_state (not yet quantised?)"
    reason = _weight_reason(base)
    if reason is not None:
        return reason
    other = {a: v for a, v in layer.lora_variant.items() if not _is_dora_variant(v)}
    if other:
        kinds = sorted({type(v).__name__ for v in other.values()})
        return f"LoRA variant {', '.join(kinds)} over a 4-bit base (adapters {sorted(other)})"
    for name, drop in layer.lora_dropout.items():
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"adapter {name!r} uses dropout module {type(drop).__name__}"
    return None
