"""``QLoraLinear``: LoRA around a frozen bitsandbytes 4-bit layer, on ``peftops.qlora_linear``.

The base layer is kept as it is (a ``bitsandbytes.nn.Linear4bit``: its ``Params4bit`` weight
and ``quant_state`` are read in place, never repacked or copied). Everything else is
``LoraLinear``'s (adapter state, peft's parameter names, several adapters, dropout); only
the fused call differs: the 4-bit op instead of the dense one. Merging into a 4-bit weight
(dequantise, add, requantise) is not done here: peft owns it for peft models.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.dequant import Quant4bit
from ..ops.qlora import qdora_linear, qlora_linear
from .lora import LoraLinear

__all__ = ["QLoraLinear", "quant_weight", "compute_dtype"]


def quant_weight(base_layer: nn.Module) -> Quant4bit:
    """The ``Quant4bit`` view of a bitsandbytes 4-bit layer's weight (no copy)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or getattr(weight, "quant_state", None) is None:
        raise TypeError(f"base_layer must be a bitsandbytes 4-bit layer (weight with a quant_state), got "
                        f"{type(base_layer).__name__}")
    return Quant4bit.from_bnb(weight)


def compute_dtype(base_layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' ``Linear4bit`` computes in for input ``x`` (its
    ``set_compute_type`` rule: x's dtype for fp32 / bf16 inputs when unset)."""
    dt = getattr(base_layer, "compute_dtype", None)
    if not getattr(base_layer, "compute_type_is_set", True) and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    return x.dtype if dt is None else dt


class QLoraLinear(LoraLinear):
    """LoRA over a frozen 4-bit base: ``y = x W^T + b + sum_a s_a B_a A_a drop_a(x)`` with W
    dequantised from bitsandbytes' storage (bit for bit bitsandbytes' values). x runs in its
    own dtype (the compute dtype: fp32 / bf16 / fp16); adapters in x's dtype or fp32."""

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, *, use_rslora: bool = False, lora_bias: bool = False,
                 init_lora_weights: bool | str = True):
        super().__init__(base_layer, adapter_name, r, lora_alpha, lora_dropout, use_rslora=use_rslora,
                         lora_bias=lora_bias, init_lora_weights=init_lora_weights)

    @staticmethod
    def _features(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out is not defined for a 4-bit base layer")
        return quant_weight(base_layer).shape

    def _fused_linear(self, x, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return qlora_linear(x, quant_weight(self.base_layer), bias, lora_A, lora_B, scaling, dropout_p=dropout_p)

    def _fused_dora_linear(self, x, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float,
                           norm_cache) -> torch.Tensor:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return qdora_linear(x, quant_weight(self.base_layer), bias, lora_A, lora_B, magnitude, scaling,
                            dropout_p=dropout_p, norm_cache=norm_cache)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("QLoraLinear does not merge into a 4-bit weight (dequantise, add, requantise "
                                  "is peft's Linear4bit.merge)")

    def unmerge(self) -> None:
        raise NotImplementedError("QLoraLinear never merges, so there is nothing to unmerge")
