"""Checkpoints of natively injected adapters: ``adapter_config.json`` +
``adapter_model.safetensors`` in a directory, one adapter (or fusion) per directory.

Tensor keys are relative to the transformers base model (``encoder.layer.0.output.adapters
.<name>.adapter_down.0.weight``, ``layers.0.mlp.adapters.<name>...``), so a checkpoint
saved from ``BertModel`` loads into ``BertForSequenceClassification`` and vice versa.
A fusion's checkpoint holds the fusion layers only; load its adapters first.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from . import inject

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _base(model: nn.Module) -> nn.Module:
    return inject._base(model)


def _rename(key: str, old: str, new: str) -> str:
    for kind in ("adapters", "adapter_fusion", "prefixes"):
        key = key.replace(f".{kind}.{old}.", f".{kind}.{new}.")
    return key


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str) -> None:
    from safetensors.torch import save_file

    cfg = inject.adapter_configs(model).get(name)
    if cfg is None:
        raise ValueError(f"unknown adapter {name!r}; have {list(inject.adapter_configs(model))}")
    tensors = {k: p.detach().contiguous() for k, p in inject.adapter_parameters(model, name, relative=True).items()}
    os.makedirs(directory, exist_ok=True)
    meta = {"peftops_type": "native_adapter", "name": name, "model_type": model.config.model_type,
            "config": inject.config_to_dict(cfg)}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=1)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
                 set_active: bool = True, train: bool = False) -> str:
    """Add the saved adapter to ``model`` (under ``name``, default the saved one) and load
    its weights; returns the name."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        meta = json.load(f)
    if meta.get("peftops_type") != "native_adapter":
        raise ValueError(f"{directory}: not a peftops native adapter checkpoint ({CONFIG_NAME} has "
                         f"peftops_type={meta.get('peftops_type')!r})")
    saved = meta["name"]
    name = name or saved
    inject.add_adapter(model, name, inject.config_from_dict(meta["config"]), set_active=set_active, train=train)
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    params = inject.adapter_parameters(model, name, relative=True)
    renamed = {_rename(k, saved, name): v for k, v in tensors.items()}
    if renamed.keys() != params.keys():
        missing, extra = sorted(params.keys() - renamed.keys()), sorted(renamed.keys() - params.keys())
        raise ValueError(f"{directory}: checkpoint does not match the model: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for k, p in params.items():
        if p.shape != renamed[k].shape:
            raise ValueError(f"{directory}: {k} has shape {tuple(renamed[k].shape)}, model expects {tuple(p.shape)}")
        p.data.copy_(renamed[k])
    return name
