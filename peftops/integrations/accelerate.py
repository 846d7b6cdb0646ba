"""``peftops.accelerate(model)``: run an HF PEFT model's tuner layers on the peftops kernels.

Design (why a class swap): peft's model-level methods (``set_adapter``, ``disable_adapter``,
``merge_and_unload``, ``delete_adapter``, ``load_adapter`` -> ``update_layer``, saving)
walk the modules and act on every ``BaseTunerLayer`` / ``LoraLayer`` through peft's own
attribute protocol (``_active_adapter``, ``_disable_adapters``, ``lora_variant``,
``get_base_layer`` ...). Re-implementing that protocol in a separate module would be a
second copy of peft. Instead each supported layer keeps its identity -- the same Python
object at the same module path, with the same Parameters, buffers, hooks and state -- and
only its class changes (``layer.__class__ = PeftopsLoraLinear``) to a subclass of *both*
peft's layer class and the peftops module:

    class PeftopsLoraLinear(peft.tuners.lora.layer.Linear, peftops.LoraLinear)

* peft's class comes first in the MRO, and every name the peftops module also defines
  (``set_adapter``, ``merge``, ``update_layer``, ``active_adapters`` ...) is re-bound to
  peft's definition, so the layer's state and model-level behaviour are exactly peft's;
* ``forward`` is the peftops module's fused forward (``peftops.LoraLinear.forward``, which
  reads only peft-named attributes); peft's ``adapter_names=`` mixed batches run on
  ``peftops.lora_linear_multi`` (``_lora_multi.py``); cases it does not take at run time
  (LoRA variants such as DoRA added after acceleration, an input dtype other than the base
  weight's, autocast; for mixed batches also dropout in training mode, ``lora_bias``) go to
  peft's own forward, counted in ``dispatch_counts()["accelerate.<kind>.peft_forward"]``;
* ``isinstance(layer, peftops.LoraLinear)`` and ``isinstance(layer, BaseTunerLayer)`` both
  hold; nothing is re-initialised, so state_dict keys, optimizer state and
  ``requires_grad`` flags are untouched, and ``deaccelerate(model)`` undoes the swap.

DoRA adapters (``DoraLinearVariant``) run on ``peftops.dora_linear``; peft's 4-bit
``lora.bnb.Linear4bit`` (QLoRA, QDoRA) on ``peftops.qlora_linear`` / ``qdora_linear``
(``_qlora.py``). Layers without a peftops kernel (other LoRA variants, conv / embedding
LoRA, 8-bit or other quantised / wrapped bases, other tuners) stay peft's own; ``accelerate`` returns /
attaches a summary naming what it swapped and what it left, with the reason, and logs it.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging

import torch
import torch.nn as nn

from .. import _dispatch
from . import _summary
from ..nn.lora import LoraLinear

log = logging.getLogger("peftops")

__all__ = ["accelerate", "deaccelerate", "AccelerateSummary", "PeftopsLoraLinear", "accelerated_classes"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


def _count(key: str) -> None:
    _dispatch._bump(key)  # (not while torch.compile traces)


def _bind_peft_names(cls: type, peft_cls: type, ours: type) -> type:
    """Make peft's definitions win for every name both classes define (except ``forward``),
    so the swapped layer keeps peft's state protocol; peftops-only helpers stay visible.

    The layer also prints as peft's (``lora.Linear(``, ``Linear(``): ``nn.Module.__repr__``
    names a module by ``_get_name()``, which returns peft's class name here, while
    ``type(layer).__name__`` stays ours (the summary, tracebacks and pickling name it)."""
    cls._get_name = lambda self: peft_cls.__name__
    for name in vars(ours):
        if name.startswith("__") or name == "forward" or name in vars(cls):
            continue
        try:
            setattr(cls, name, inspect.getattr_static(peft_cls, name))
        except AttributeError:
            pass  # a peftops-only helper (e.g. ``_base_weight``)
    return cls


# ---------------------------------------------------------------------------- LoRA
from peft.tuners.lora.layer import Linear as _PeftLoraLinear  # noqa: E402


class PeftopsLoraLinear(_PeftLoraLinear, LoraLinear):
    """peft's LoRA ``Linear`` whose forward runs ``peftops.lora_linear`` (see module doc)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:  # peft's mixed batches: peftops.lora_linear_multi
            from ._lora_multi import mixed_batch_forward  # (integrations/_lora_multi.py; None: peft's forward)
            y = mixed_batch_forward(self, x, args, kwargs)
            if y is not None:
                return y
        reason = self._peftops_unsupported(x, args, kwargs)
        if reason is not None:
            _count("accelerate.lora.peft_forward")
            return _PeftLoraLinear.forward(self, x, *args, **kwargs)
        return LoraLinear.forward(self, x)

    def _peftops_unsupported(self, x, args, kwargs) -> str | None:
        if args or kwargs:
            return "extra forward arguments (e.g. adapter_names)"
        if self.disable_adapters or self.merged:
            return None  # LoraLinear.forward runs the base layer alone (unmerging first)
        if any(a in self.lora_variant and not _is_dora_variant(self.lora_variant[a]) for a in self.active_adapters):
            return "LoRA variant other than DoRA"
        if x.dtype != self.base_layer.weight.dtype:
            return "input dtype differs from the base weight's"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast"
        return None


    # peft's merge / unmerge, then the cached DoRA norms go (merge writes W through .data)
    def merge(self, *args, **kwargs) -> None:
        self.dora_cache_clear()
        _PeftLoraLinear.merge(self, *args, **kwargs)
        self.dora_cache_clear()

    def unmerge(self, *args, **kwargs) -> None:
        self.dora_cache_clear()
        _PeftLoraLinear.unmerge(self, *args, **kwargs)
        self.dora_cache_clear()


_bind_peft_names(PeftopsLoraLinear, _PeftLoraLinear, LoraLinear)


def _is_dora_variant(variant) -> bool:
    """peft's DoRA on a dense Linear (``DoraLinearVariant``): taken by peftops.dora_linear."""
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # pragma: no cover
        return False
    return isinstance(variant, DoraLinearVariant) or variant is DoraLinearVariant


def _lora_reason(layer) -> str | None:
    """Why this peft LoRA ``Linear`` cannot be accelerated (None if it can)."""
    base = layer.base_layer
    if type(base) is not nn.Linear and not isinstance(base, _conv1d_type()):
        return f"base layer is {type(base).__name__} (quantised or wrapped), not nn.Linear/Conv1D"
    w = base.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT:
        return f"base weight dtype {getattr(w, 'dtype', None)} is not a float type"
    if type(w) not in (torch.Tensor, nn.Parameter):
        return f"base weight is a {type(w).__name__} tensor subclass"
    other = {a: v for a, v in layer.lora_variant.items() if not _is_dora_variant(v)}
    if other:
        kinds = sorted({type(v).__name__ for v in other.values()})
        return f"LoRA variant {', '.join(kinds)} (adapters {sorted(layer.lora_variant)})"
    for name, drop in layer.lora_dropout.items():
        if not isinstance(drop, (nn.Dropout, nn.Identity)) or type(drop) not in (nn.Dropout, nn.Identity):
            return f"adapter {name!r} uses dropout module {type(drop).__name__}"
    return None


# ---------------------------------------------------------------------------- registry
# peft layer class -> (peftops class, reason function, kind)
_REGISTRY: dict[type, tuple[type, object, str]] = {
    _PeftLoraLinear: (PeftopsLoraLinear, _lora_reason, "lora"),
}


def _register_ia3() -> None:
    """IA3 support, when ``peftops.nn.ia3`` exists (see ``_ia3.py``)."""
    try:
        from . import _ia3
    except ImportError as e:  # the IA3 slice has not landed (or failed to import)
        log.debug("peftops.accelerate: IA3 not available: %s", e)
        return
    _REGISTRY[_ia3.PeftIA3Linear] = (_ia3.PeftopsIA3Linear, _ia3.ia3_reason, "ia3")


_register_ia3()


def _register_qlora() -> None:
    """QLoRA (peft's ``lora.bnb.Linear4bit``), when peft's bitsandbytes layer exists (see ``_qlora.py``)."""
    try:
        from . import _qlora
    except ImportError as e:  # bitsandbytes not installed: peft defines no 4-bit LoRA layer
        log.debug("peftops.accelerate: QLoRA not available: %s", e)
        return
    _REGISTRY[_qlora.PeftLoraLinear4bit] = (_qlora.PeftopsLoraLinear4bit, _qlora.qlora_reason, "qlora")


_register_qlora()


def accelerated_classes() -> dict[type, type]:
    """peft layer class -> the peftops class ``accelerate`` swaps it to."""
    return {k: v[0] for k, v in _REGISTRY.items()}


@dataclasses.dataclass
class AccelerateSummary:
    swapped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> peftops class
    left: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> reason

    def __str__(self) -> str:
        lines = [f"peftops.accelerate: swapped {len(self.swapped)} layer(s), left {len(self.left)} as peft's own"]
        kinds: dict[str, int] = {}
        for cls in self.swapped.values():
            kinds[cls] = kinds.get(cls, 0) + 1
        lines += [f"  swapped {n} x {cls}" for cls, n in sorted(kinds.items())]
        lines += [f"  left {path}: {reason}" for path, reason in self.left.items()]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, return_summary: bool = False):
    """Swap every supported peft tuner layer of ``model`` to its peftops class, in place.

    Returns ``model`` (with ``model.peftops_summary`` set), or ``(model, summary)`` when
    ``return_summary``. Idempotent. Works on a ``PeftModel`` or any module tree holding
    peft tuner layers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a peft model), got {type(model).__name__}")
    summary = AccelerateSummary()
    ours = {v[0] for v in _REGISTRY.values()}
    for path, module in model.named_modules():
        if type(module).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
            summary.left[path] = f"{type(module).__name__} (a trained copy of a plain module): no adapter kernel"
            continue
        if not isinstance(module, BaseTunerLayer):
            continue
        cls = type(module)
        if cls in ours:
            summary.swapped[path] = cls.__name__
            continue
        entry = _REGISTRY.get(cls)
        if entry is None:
            summary.left[path] = f"no peftops kernel for peft layer {cls.__module__}.{cls.__qualname__}"
            continue
        target, why, _ = entry
        reason = why(module)
        if reason is not None:
            summary.left[path] = reason
            continue
        module.__class__ = target
        summary.swapped[path] = target.__name__
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        summary.left["prompt_encoder"] = (f"{cfg.peft_type} is prompt learning (virtual tokens, no tuner layers): "
                                          "peft's own; see peftops.prefix_attention / PrefixEncoder")
    return _summary.attach(model, summary, "peft tuner layers", return_summary)


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every swapped layer gets peft's class back (in place)."""
    back = {v[0]: k for k, v in _REGISTRY.items()}
    for module in model.modules():
        cls = back.get(type(module))
        if cls is not None:
            module.__class__ = cls
    return model
