"""Argument checks shared by every op: errors name the argument and the shapes."""
from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, optional: bool = False):
    """``t`` must be a floating-point tensor (or None when optional) of the given rank."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    return t


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def finite_scalar(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def probability(name: str, p) -> float:
    p = finite_scalar(name, p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def gate(name: str, g, out_shape: Sequence[int], like: torch.Tensor):
    """A gate broadcastable to ``out_shape`` (``y[..., :1]``): per token ``[..., 1]`` or per
    sample ``[B, 1, 1]``. Returns it unchanged (None stays None)."""
    if g is None:
        return None
    tensor(name, g)
    same_device("x", like, **{name: g})
    target = tuple(out_shape)
    try:
        shape = torch.broadcast_shapes(tuple(g.shape), target)
    except RuntimeError:
        shape = None
    if shape != target:
        raise ValueError(f"{name} with shape {tuple(g.shape)} does not broadcast to {target} (y[..., :1])")
    return g
