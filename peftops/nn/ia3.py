"""``IA3Linear``: a drop-in for HF PEFT's (IA)^3 ``Linear`` running the fused IA3 kernels.

Parameter names and state_dict keys follow peft (``base_layer.weight``, ``base_layer.bias``,
``ia3_l.<adapter>`` shaped ``(out, 1)``, or ``(1, in)`` for feed-forward layers), so
checkpoints carry over in both directions.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..ops.ia3 import ia3_linear


class IA3Linear(nn.Module):
    """(IA)^3 around a frozen linear layer.

    ``is_feedforward=False`` (keys / values): ``y = l * base(x)``; ``True`` (feed-forward
    down projections): ``y = base(x * l)``. ``base_layer`` is kept as given (its weight
    object is not copied). ``fan_in_fan_out`` is for GPT-2's ``Conv1D`` (weight stored
    ``[in, out]``). Several active adapters multiply their vectors, as in peft.
    """

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", is_feedforward: bool = False, *,
                 fan_in_fan_out: bool = False, init_ia3_weights: bool = True):
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"base_layer must have a 2-D weight (nn.Linear or Conv1D), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.is_feedforward = bool(is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.ia3_l = nn.ParameterDict({})
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, init_ia3_weights=init_ia3_weights)

    @classmethod
    def from_peft(cls, layer: nn.Module) -> "IA3Linear":
        """The equivalent of a peft ``IA3`` ``Linear``, sharing its base layer and its
        ``ia3_l`` parameters (not copies), active adapters and merge state."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.base_layer = layer.base_layer
        new.is_feedforward = bool(layer.is_feedforward)
        new.fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.ia3_l = layer.ia3_l
        new.merged_adapters = list(layer.merged_adapters)
        new._disable_adapters = bool(layer.disable_adapters)
        new._active_adapters = list(layer.active_adapters)
        return new

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add (or replace) adapter ``adapter_name``: ones (peft's init) or, with
        ``init_ia3_weights=False``, standard normal; in the base weight's dtype and device."""
        w = self.base_layer.weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        value = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(value.to(device=w.device, dtype=dtype))
        self.set_adapter(self.active_adapters)

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters active (trainable unless ``inference_mode``); the others are
        frozen, as in peft."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name, p in self.ia3_l.items():
            p.requires_grad_(name in names and not inference_mode)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """peft's switch: disabling freezes every ``ia3_l`` and runs the base layer alone."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for p in self.ia3_l.values():
                p.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            del self.ia3_l[adapter_name]
        if adapter_name in self._active_adapters:
            rest = [a for a in self._active_adapters if a != adapter_name]
            self.set_adapter(rest or ([next(iter(self.ia3_l))] if len(self.ia3_l) else []))

    # ------------------------------------------------------------------ merge
    def _scale_for_weight(self, name: str) -> torch.Tensor:
        """The adapter's vector shaped to multiply the stored weight."""
        l = self.ia3_l[name].data
        return l.t() if self.fan_in_fan_out else l

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base layer: ``W * l`` (and ``b * l``
        for output scaling), as peft does."""
        base = self.base_layer
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            w = torch.mul(base.weight.data, self._scale_for_weight(name))
            b = None
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                b = torch.mul(base.bias.data, self.ia3_l[name].data.reshape(base.bias.shape))
            if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.weight.data = w.to(base.weight.dtype)
            if b is not None:
                base.bias.data = b.to(base.bias.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` by dividing by ``l + 1e-8`` (peft's tolerance), newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.ia3_l:
                continue
            base.weight.data = torch.div(base.weight.data, self._scale_for_weight(name) + 1e-8).to(base.weight.dtype)
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                l = self.ia3_l[name].data.reshape(base.bias.shape)
                base.bias.data = torch.div(base.bias.data, l + 1e-8).to(base.bias.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.ia3_l]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"IA3Linear.forward takes only x; got extra arguments {args} {list(kwargs)}")
        l = self.ia3_l[active[0]].reshape(-1)
        for a in active[1:]:
            l = l * self.ia3_l[a].reshape(-1)
        if l.dtype not in (x.dtype, torch.float32):
            l = l.to(x.dtype)
        w = self.base_layer.weight
        w = w.t() if self.fan_in_fan_out else w
        bias = getattr(self.base_layer, "bias", None)
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            # as the base nn.Linear would run under autocast: x, W, b in the autocast dtype
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
            bias = None if bias is None else bias.to(dt)
            with torch.autocast(x.device.type, enabled=False):
                return ia3_linear(x, w, bias, l if l.dtype in (dt, torch.float32) else l.to(dt),
                                  feedforward=self.is_feedforward)
        if w.dtype != x.dtype:  # outside autocast nn.Linear (and so peft) refuses this too
            raise TypeError(f"x has dtype {x.dtype} but the base layer's weight has dtype {w.dtype}")
        return ia3_linear(x, w, bias, l, feedforward=self.is_feedforward)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"is_feedforward={self.is_feedforward}, adapters={list(self.ia3_l)}, active={self.active_adapters}")
