"""The one dispatch rule (DESIGN.md, "Dispatch").

``PEFTOPS_BACKEND``:
  * ``auto`` (default): CUDA tensors -> Triton; anything else -> the reference.
  * ``triton``: always Triton. CPU tensors need ``TRITON_INTERPRET=1`` set before triton is
    imported (that is how the CPU tests run the real kernels).
  * ``reference``: always the plain-PyTorch reference.

A case a kernel does not support falls back to the reference *visibly*: a debug log line
and a counter (``dispatch_counts()``) that tests read. Kernel launches are counted too, so
a test can prove the kernels ran.
"""
from __future__ import annotations

import collections
import logging
import os

import torch

log = logging.getLogger("peftops")

BACKENDS = ("auto", "triton", "reference")

_counts: collections.Counter = collections.Counter()


def _bump(key: str) -> None:
    # Not while torch.compile traces: dynamo would replay its traced copy of the counter
    # after the graph and wipe the launches counted at run time inside the custom ops.
    if not torch.compiler.is_compiling():
        _counts[key] += 1


def backend() -> str:
    """The backend named by ``PEFTOPS_BACKEND`` (read on every call, so tests can switch)."""
    name = os.environ.get("PEFTOPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PEFTOPS_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(op: str, *tensors: torch.Tensor | None, unsupported: str | None = None) -> bool:
    """Decide whether ``op`` runs its Triton kernels for these tensors.

    ``unsupported`` is the reason the kernel cannot take this case (None if it can); such a
    case is logged and counted as ``"<op>.fallback"`` and runs on the reference.
    """
    choice = backend()
    present = [t for t in tensors if t is not None]
    if choice == "reference":
        _bump(f"{op}.reference")
        return False
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice == "auto" and not on_cuda:
        _bump(f"{op}.reference")
        return False
    if not on_cuda:
        devices = sorted({str(t.device) for t in present})
        if any(t.is_cuda for t in present):
            raise ValueError(f"{op}: tensors are on different devices {devices}")
        if not interpreting():
            raise RuntimeError(
                f"{op}: PEFTOPS_BACKEND=triton with tensors on {devices} needs TRITON_INTERPRET=1 "
                "set before triton is imported (or use PEFTOPS_BACKEND=auto / reference)"
            )
    if unsupported is not None:
        log.debug("peftops %s: falling back to the reference: %s", op, unsupported)
        _bump(f"{op}.fallback")
        _bump(f"{op}.fallback:{unsupported}")
        return False
    _bump(f"{op}.triton")
    return True


def record_launch(kernel: str) -> None:
    _bump(f"launch.{kernel}")


def dispatch_counts() -> dict[str, int]:
    """A copy of the counters: ``"<op>.triton"``, ``"<op>.reference"``, ``"<op>.fallback"``
    (plus ``"<op>.fallback:<reason>"``) and ``"launch.<kernel>"``."""
    return dict(_counts)


def reset_dispatch_counts() -> None:
    _counts.clear()
