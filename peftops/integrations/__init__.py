"""Integrations with HF PEFT and transformers (imported lazily: peft / transformers are
optional dependencies).

* ``accelerate(model)``: run a peft model's LoRA / IA3 layers on the peftops kernels, or an
  AdapterHub (``adapters``) model's adapters, Fuse, LoRA and IA3 (``adapterhub.py``).
* ``add_adapter(model, name, config)``: native injection of bottleneck adapters,
  AdapterFusion and UniPELT into transformers' BERT / RoBERTa / Llama families;
  ``save_adapter`` / ``load_adapter``: adapter_config.json + adapter_model.safetensors.
* ``demo.run(device, dtype)``: peft vs peft + accelerate, side by side.
"""
from __future__ import annotations


def _adapterhub(model):
    """``peftops.integrations.adapterhub`` when ``model`` is an AdapterHub model (imported only
    when ``adapters`` already is: an AdapterHub model needs neither peft nor this check's cost
    otherwise), else None."""
    import sys

    if "adapters" not in sys.modules:
        return None
    from . import adapterhub

    return adapterhub if adapterhub.is_adapterhub_model(model) else None


def accelerate(model, *, return_summary: bool = False):
    """See ``peftops.integrations.accelerate.accelerate`` (HF PEFT models) and
    ``peftops.integrations.adapterhub.accelerate`` (AdapterHub models)."""
    ah = _adapterhub(model)
    if ah is not None:
        return ah.accelerate(model, return_summary=return_summary)
    from .accelerate import accelerate as _accelerate

    return _accelerate(model, return_summary=return_summary)


def deaccelerate(model):
    """See ``peftops.integrations.accelerate.deaccelerate`` (and ``adapterhub.deaccelerate``)."""
    ah = _adapterhub(model)
    if ah is not None:
        return ah.deaccelerate(model)
    from .accelerate import deaccelerate as _deaccelerate

    return _deaccelerate(model)


from .checkpoint import load_adapter, save_adapter  # noqa: E402
from .inject import (BottleneckConfig, FusionConfig, UniPELTConfig, add_adapter, delete_adapter,  # noqa: E402
                     remove_injection, set_active_adapters, train_adapter)

__all__ = ["accelerate", "deaccelerate", "add_adapter", "set_active_adapters", "train_adapter", "delete_adapter",
           "remove_injection", "save_adapter", "load_adapter", "BottleneckConfig", "FusionConfig", "UniPELTConfig"]
