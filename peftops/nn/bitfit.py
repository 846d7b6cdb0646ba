"""BitFit (Ben Zaken et al.): train only the bias terms.

No kernel: a helper that sets ``requires_grad`` so that only biases (attention, FFN and
LayerNorm biases, and any other ``bias`` parameter) stay trainable.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["bitfit", "is_bias"]


def is_bias(name: str) -> bool:
    """A parameter is a bias term when the last component of its qualified name is
    ``bias`` or ends with ``_bias`` (``in_proj_bias``, ``bias_k`` excluded: those are
    learned key/value tokens, not bias terms)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")


def bitfit(model: nn.Module) -> int:
    """Freeze every parameter of ``model`` except its bias terms (in place) and return how
    many parameter elements stay trainable.

    Biases are recognised by name (``is_bias``): ``*.bias`` of Linear / LayerNorm / conv
    layers (BERT's attention ``query/key/value/output.dense.bias``, FFN
    ``intermediate.dense.bias`` / ``output.dense.bias``, every ``LayerNorm.bias``) and
    ``*_bias`` such as ``nn.MultiheadAttention.in_proj_bias``. Shared (tied) parameters are
    counted once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = 0
    for name, p in model.named_parameters():  # named_parameters() yields each tensor once
        keep = is_bias(name)
        p.requires_grad_(keep)
        if keep:
            trainable += p.numel()
    return trainable
