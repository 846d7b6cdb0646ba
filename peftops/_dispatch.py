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
    if choice == "reference":
        _bump(f"{op}.reference")
        return False
    # Plain loops over the arguments, no truth value of a list: dynamo (torch 2.11) cannot
    # trace ``bool(list_of_tensors)`` and breaks the graph there.
    n_present = n_cuda = 0
    for t in tensors:
        if t is not None:
            n_present += 1
            n_cuda += int(t.is_cuda)
    on_cuda = n_present > 0 and n_cuda == n_present
    if choice == "auto" and not on_cuda:
        _bump(f"{op}.reference")
        return False
    if not on_cuda:
        devices = sorted({str(t.device) for t in tensors if t is not None})
        if n_cuda > 0:
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


class PathTable:
    """Which implementation of an op runs, by shape: one readable table per op.

    On CUDA the first row whose rule holds for the call's shape wins; each row names the
    measurement behind it (DESIGN.md, Dispatch: our own kernel only where it beats the best
    composition of vendor kernels). In Triton's CPU interpreter the default is ``default``
    (normally the op's own kernel, the thing the interpreter is there to prove). Tests and
    benches force a path with ``PEFTOPS_PATH_<OP>=<path>`` (e.g. ``PEFTOPS_PATH_LORA=cublas``)
    or ``force_path``. The choice is counted as ``"<op>.path:<path>"``.

    A rule is a function of the shape keywords the op passes to ``pick``; shapes are plain
    ints, so the choice traces under torch.compile (it becomes a guard, not a graph break).
    """

    def __init__(self, op: str, paths: tuple[str, ...], default: str, rows: list[tuple]):
        self.op, self.paths, self.default = op, paths, default
        for rule, path, _evidence in rows:
            if path not in paths:
                raise ValueError(f"{op}: table row picks unknown path {path!r} (paths: {paths})")
        if default not in paths:
            raise ValueError(f"{op}: default path {default!r} not in {paths}")
        self.rows = rows

    def forced(self) -> str | None:
        name = os.environ.get(f"PEFTOPS_PATH_{self.op.upper()}", "").strip().lower()
        if name and name not in self.paths:
            raise ValueError(f"PEFTOPS_PATH_{self.op.upper()}={name!r}: expected one of {self.paths}")
        return name or None

    def choose(self, on_cuda: bool, **shape) -> tuple[str, int | None]:
        """(path, index of the row that chose it); the index is None when the path was
        forced or is the default (off CUDA)."""
        path = self.forced()
        if path is not None:
            return path, None
        if on_cuda:
            for i, (rule, row_path, _evidence) in enumerate(self.rows):
                if rule(**shape):
                    return row_path, i
        return self.default, None

    def peek(self, on_cuda: bool, **shape) -> str:
        """The path ``pick`` would choose, not counted (to ask beforehand, e.g. whether a
        shape the kernel cannot hold would reach it)."""
        return self.choose(on_cuda, **shape)[0]

    def pick(self, on_cuda: bool, **shape) -> str:
        """The path for this shape, counted as ``"<op>.path:<path>"`` and, when a table row
        chose it, ``"<op>.row:<index>"`` (the bench records both: ``python -m peftops paths``
        reads which row a measured shape reached)."""
        path, row = self.choose(on_cuda, **shape)
        _bump(f"{self.op}.path:{path}")
        if row is not None:
            _bump(f"{self.op}.row:{row}")
        return path


class force_path:
    """``with force_path("lora", "kernel"): ...`` runs ``lora`` on that path (tests, bench)."""

    def __init__(self, op: str, path: str):
        self.key, self.path, self.prev = f"PEFTOPS_PATH_{op.upper()}", path, None

    def __enter__(self):
        self.prev = os.environ.get(self.key)
        os.environ[self.key] = self.path
        return self

    def __exit__(self, *exc):
        if self.prev is None:
            os.environ.pop(self.key, None)
        else:
            os.environ[self.key] = self.prev


def record_launch(kernel: str, variant: str | None = None) -> None:
    """Count one launch of ``kernel``; ``variant`` (e.g. ``"split_k"``) also counts
    ``"variant.<kernel>:<variant>"``, which is not a launch of its own."""
    _bump(f"launch.{kernel}")
    if variant:
        _bump(f"variant.{kernel}:{variant}")


def dispatch_counts() -> dict[str, int]:
    """A copy of the counters: ``"<op>.triton"``, ``"<op>.reference"``, ``"<op>.fallback"``
    (plus ``"<op>.fallback:<reason>"``), ``"launch.<kernel>"`` and ``"variant.<kernel>:<name>"``."""
    return dict(_counts)


def reset_dispatch_counts() -> None:
    _counts.clear()
