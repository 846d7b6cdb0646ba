"""``LoraLinear``: a drop-in for HF PEFT's LoRA ``Linear`` running the fused LoRA kernels.

Parameter names and state_dict keys follow peft (``base_layer.weight``,
``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``, for DoRA adapters
``lora_magnitude_vector.<adapter>.weight``), so checkpoints carry over.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.dora import DoraNormCache, dora_linear, dora_weight_norm
from ..ops.lora import lora_linear


class LoraLinear(nn.Module):
    """LoRA around a frozen linear layer: ``y = base(x) + sum_a s_a * B_a A_a drop_a(x)``.

    ``base_layer`` is kept as given (its weight object is not copied). ``fan_in_fan_out``
    is for GPT-2's ``Conv1D``, whose weight is stored ``[in, out]``. Several active
    adapters are summed; with dropout active in training, the first adapter runs fused
    and the others in eager PyTorch (each adapter keeps its own dropout draw, as in peft).

    Adapter weights in fp32 over a half-precision input (peft keeps them so by default) go
    to the fused op as they are: the kernels read fp32 A / B and return fp32 gradients.
    Other dtype mismatches are cast to the input dtype.

    DoRA (``use_dora=True``, peft's ``LoraConfig(use_dora=True)``): the adapter's output is
    ``(m / ||W + s B A||_row) * (x W^T + s (x A^T) B^T) + b`` (``peftops.dora_linear``), with
    ``m`` the trainable ``lora_magnitude_vector.<adapter>.weight``. Several active adapters
    are applied in order on the running result, as peft does: a DoRA adapter scales what
    the adapters before it added (minus the bias) by its m / n. The first active adapter
    runs fused; later ones in eager PyTorch with the fused norm (no [out, in] tensor).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, *, use_rslora: bool = False, lora_bias: bool = False,
                 fan_in_fan_out: bool = False, init_lora_weights: bool | str = True, use_dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = self._features(base_layer, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora=use_rslora,
                          lora_bias=lora_bias, init_lora_weights=init_lora_weights, use_dora=use_dora)

    @staticmethod
    def _features(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
        """(out, in) of the frozen layer (a subclass over another base, e.g. 4-bit, says its own)."""
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"base_layer must have a 2-D weight (nn.Linear or Conv1D), got {type(base_layer).__name__}")
        return tuple(weight.shape[::-1] if fan_in_fan_out else weight.shape)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                     use_rslora: bool = False, lora_bias: bool = False, init_lora_weights: bool | str = True,
                     use_dora: bool = False) -> None:
        """Add (or replace) adapter ``adapter_name`` with peft's initialisation (DoRA: the
        magnitude starts at the row norms of ``W + s B A``)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if use_dora and lora_bias:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as in peft)")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        weight = self.base_layer.weight
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        kw = dict(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **kw)
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = _Magnitude(self._dora_norm(adapter_name).to(
                self.lora_A[adapter_name].weight.dtype))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        """peft's init: A kaiming-uniform (a = sqrt(5)), B = 0 (``True``); A ~ N(0, 1/r)
        with B = 0 (``"gaussian"``); both nn.Linear's random init (``False``)."""
        if init_lora_weights is False:
            return
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a.weight, std=1 / self.r[adapter_name])
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters active (trainable); the others are frozen, as in peft."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"unknown adapter {name!r}; have {list(self.lora_A)}")
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name in names)
            self.lora_B[name].requires_grad_(name in names)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(name in names)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    # ------------------------------------------------------------------ merge
    def _base_weight(self) -> torch.Tensor:
        """The frozen weight as ``[out, in]`` (a view for ``fan_in_fan_out``)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B A`` in fp32, ``[out, in]``."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight: ``W += s B A`` (fp32)."""
        self.dora_cache_clear()
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            w = self._base_weight()
            merged = w.float() + self.get_delta_weight(name)
            if name in self.lora_magnitude_vector:
                # DoRA: W' = (m / n) (W + s B A), n from the unmerged W (kept for unmerge)
                n = self._dora_norm(name, self._unmerged_weight())
                self._dora_merged_norm[name] = n
                merged = (self.lora_magnitude_vector[name].weight.float() / n)[:, None] * merged
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            w.copy_(merged.to(w.dtype))
            if self.lora_bias[name] and getattr(self.base_layer, "bias", None) is not None:
                bias = self.base_layer.bias
                bias.copy_((bias.float() + self.lora_B[name].bias.float() * self.scaling[name]).to(bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: ``W -= s B A`` for every merged adapter, newest first."""
        self.dora_cache_clear()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self._base_weight()
            wf = w.float()
            if name in self.lora_magnitude_vector:
                c = self.lora_magnitude_vector[name].weight.float() / self._dora_merged_norm.pop(name)
                wf = wf / c[:, None]
            w.copy_((wf - self.get_delta_weight(name)).to(w.dtype))
            if self.lora_bias[name] and getattr(self.base_layer, "bias", None) is not None:
                bias = self.base_layer.bias
                bias.copy_((bias.float() - self.lora_B[name].bias.float() * self.scaling[name]).to(bias.dtype))

    # ------------------------------------------------------------------ DoRA helpers
    @property
    def _dora_merged_norm(self) -> dict:
        d = self.__dict__.get("_peftops_dora_merged_norm")
        if d is None:
            d = self.__dict__["_peftops_dora_merged_norm"] = {}
        return d

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight [out, in] fp32 without the adapters merged so far (their merge is
        undone in order, newest first, on a copy)."""
        wf = self._base_weight().float().clone()
        for name in reversed(self.merged_adapters):
            if name in self.lora_magnitude_vector:
                wf = wf / (self.lora_magnitude_vector[name].weight.float() / self._dora_merged_norm[name])[:, None]
            wf = wf - self.get_delta_weight(name)
        return wf

    def dora_norm_cache(self) -> DoraNormCache:
        """This layer's cache of ``||W_i||^2`` and of each DoRA adapter's n (ops/dora.py)."""
        cache = self.__dict__.get("_peftops_dora_cache")
        if cache is None:
            cache = self.__dict__["_peftops_dora_cache"] = DoraNormCache()
        return cache

    def dora_cache_clear(self) -> None:
        """Drop the cached norms (called on merge / unmerge; call it after writing the base
        weight through ``.data`` in place, which no version counter sees)."""
        self.dora_norm_cache().clear()

    def _dora_norm(self, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """n = ||W + s B A||_row ([out] fp32, no gradient), by the fused identity."""
        with torch.no_grad():
            w = self._base_weight() if weight is None else weight
            a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            if a.dtype != w.dtype and not (a.dtype == torch.float32 and w.dtype in (torch.float16, torch.bfloat16)):
                a, b = a.to(w.dtype), b.to(w.dtype)
            return dora_weight_norm(w, a, b, self.scaling[adapter_name])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"LoraLinear.forward takes only x; got extra arguments {args} {list(kwargs)}")
        if any(a in self.lora_magnitude_vector for a in active):
            return self._forward_with_dora(x, active)
        dt = x.dtype
        bias = getattr(self.base_layer, "bias", None)
        p = {a: self._dropout_p(a) for a in active}
        # Adapters sharing one fused call: all of them when no dropout is active (their
        # A's stacked along r, scaling folded into B: the same math), else the first.
        fused = active if all(v == 0.0 for v in p.values()) else active[:1]
        if len(fused) == 1:
            # One adapter: its weights as they are (no per-call copy); fp32 adapters over a
            # half x are read by the kernels in fp32 (peft's autocast_adapter_dtype default).
            a_cat, b_cat = self.lora_A[fused[0]].weight, self.lora_B[fused[0]].weight
            if a_cat.dtype != dt and not (a_cat.dtype == torch.float32 and dt in (torch.float16, torch.bfloat16)):
                a_cat, b_cat = a_cat.to(dt), b_cat.to(dt)
            scaling = self.scaling[fused[0]]
        else:
            a_cat = torch.cat([self.lora_A[a].weight.to(dt) for a in fused])
            b_cat = torch.cat([self.lora_B[a].weight.to(dt) * self.scaling[a] for a in fused], dim=1)
            scaling = 1.0
        for a in fused:
            if self.lora_bias[a]:
                extra = self.lora_B[a].bias.to(dt) * self.scaling[a]
                bias = extra if bias is None else bias + extra
        y = self._fused_linear(x, bias, a_cat, b_cat, scaling, p[fused[0]])
        for a in active[len(fused):]:
            y = y + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x.to(self.lora_A[a].weight.dtype)))).to(dt) \
                * self.scaling[a]
        return y

    def _fused_linear(self, x, bias, lora_A, lora_B, scaling: float, dropout_p: float) -> torch.Tensor:
        """The one fused call of ``forward`` (the frozen layer + the fused adapters' term);
        a subclass over another kind of base layer (4-bit: ``QLoraLinear``) runs its own op."""
        return lora_linear(x, self._base_weight(), bias, lora_A, lora_B, scaling, dropout_p=dropout_p)

    def _fused_dora_linear(self, x, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float,
                           norm_cache) -> torch.Tensor:
        """The first DoRA adapter's fused call (a 4-bit base: ``QLoraLinear`` runs its own op)."""
        return dora_linear(x, self._base_weight(), bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p,
                           norm_cache=norm_cache)

    def _adapter_weights(self, name: str, dt: torch.dtype):
        """(A, B, as given) for the kernels: fp32 adapters over a half x as they are, other
        mismatches cast to x's dtype (a cast copy is not the parameter: ``as_given`` False)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype != dt and not (a.dtype == torch.float32 and dt in (torch.float16, torch.bfloat16)):
            return a.to(dt), b.to(dt), False
        return a, b, True

    def _forward_with_dora(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """peft's order: each adapter acts on the running result. LoRA adds s B A drop(x);
        DoRA (c = m / n) without dropout maps y -> c (y - b) + c s B A x + b, with dropout
        y -> y + (c - 1) drop(x) W^T + c s B A drop(x). The first adapter runs fused."""
        dt = x.dtype
        w = self._base_weight()
        bias = getattr(self.base_layer, "bias", None)
        cache = self.dora_norm_cache()
        y = None
        for name in active:
            a, b, as_given = self._adapter_weights(name, dt)
            s, p = self.scaling[name], self._dropout_p(name)
            mag = self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None
            if y is None:
                if mag is not None:
                    y = self._fused_dora_linear(x, bias, a, b, mag, s, p, cache if as_given else None)
                else:
                    lb = self.lora_B[name].bias.to(dt) * s if self.lora_bias[name] else None
                    bb = bias if lb is None else (lb if bias is None else bias + lb)
                    y = lora_linear(x, w, bb, a, b, s, dropout_p=p)
                continue
            xa = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))
            low = self.lora_B[name](self.lora_A[name](xa)) * s
            if mag is None:
                y = y + low.to(dt)
                continue
            n = dora_weight_norm(w, a, b, s, norm_cache=cache if as_given else None)
            c = (mag.float() / n).to(low.dtype)
            if p > 0.0:
                base = torch.nn.functional.linear(xa.to(w.dtype), w).to(low.dtype)
            else:
                base = (y if bias is None else y - bias).to(low.dtype)
            y = (y + ((c - 1) * base + c * low)).to(dt)
        return y

    def _dropout_p(self, adapter_name: str) -> float:
        drop = self.lora_dropout[adapter_name]
        return float(drop.p) if isinstance(drop, nn.Dropout) and self.training else 0.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={ {a: self.r[a] for a in self.lora_A} }, active={self.active_adapters}")


class _Magnitude(nn.Module):
    """Holds a DoRA adapter's magnitude as ``weight`` (peft's key: ``lora_magnitude_vector.<a>.weight``)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())
