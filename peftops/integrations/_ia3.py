"""IA3 half of ``peftops.accelerate`` (same class-swap design as LoRA: see ``accelerate.py``).

``PeftopsIA3Linear`` is peft's IA3 ``Linear`` (state, merge, adapter switching: peft's)
whose forward is ``peftops.IA3Linear.forward`` (``peftops.ia3_linear``: scale on the
A-tile load for feed-forward layers, in the GEMM epilogue otherwise).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.ia3.layer import Linear as PeftIA3Linear

from ..nn.ia3 import IA3Linear
from .accelerate import _FLOAT, _bind_peft_names, _conv1d_type, _count


class PeftopsIA3Linear(PeftIA3Linear, IA3Linear):
    """peft's IA3 ``Linear`` whose forward runs ``peftops.ia3_linear``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or x.dtype != self.base_layer.weight.dtype or torch.is_autocast_enabled(x.device.type):
            _count("accelerate.ia3.peft_forward")
            return PeftIA3Linear.forward(self, x, *args, **kwargs)
        return IA3Linear.forward(self, x)


_bind_peft_names(PeftopsIA3Linear, PeftIA3Linear, IA3Linear)


def ia3_reason(layer) -> str | None:
    base = layer.base_layer
    if type(base) is not nn.Linear and not isinstance(base, _conv1d_type()):
        return f"base layer is {type(base).__name__} (quantised or wrapped), not nn.Linear/Conv1D"
    w = base.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT:
        return f"base weight dtype {getattr(w, 'dtype', None)} is not a float type"
    if type(w) not in (torch.Tensor, nn.Parameter):
        return f"base weight is a {type(w).__name__} tensor subclass"
    return None
