"""Benchmark runner core: cases, timing, parity, the JSON schema, the table.

A method's bench module (``peftops/benchmarks/<m>.py``) defines

    def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]

``small=True`` asks for tiny shapes (CPU parity pass under the Triton interpreter).
Each provider builder allocates its inputs and returns a zero-argument function; calling
that function runs the op once and returns what it computed (the output, or the tuple of
gradients for a forward+backward case), so the same case serves timing on a GPU and
parity on a CPU. Provider names: ``peftops``, ``eager`` (the reference formula in eager
PyTorch), ``peft`` (HF PEFT's own layer), ``cublas_base`` (the frozen layer alone).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Callable

import torch


@dataclasses.dataclass
class Case:
    op: str
    shape: dict
    dtype: torch.dtype
    providers: dict[str, Callable[[], Callable[[], object]]]
    flops: float = 0.0  # useful FLOPs of one call (for TFLOP/s)
    bytes: float = 0.0  # bytes one call must move at least (for GB/s vs the HBM floor)
    parity_with: str = "eager"  # which provider the others are compared with on CPU
    compare: tuple = ("peftops",)  # providers compared (and with what) on the parity pass


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)] if isinstance(out, (tuple, list)) else []


def rel_err(a, b) -> float:
    """Worst ``||a - b|| / ||b||`` over the tensors two providers returned."""
    worst = 0.0
    for x, y in zip(_flatten(a), _flatten(b), strict=True):
        x, y = x.detach().double(), y.detach().double()
        if not torch.isfinite(x).all():
            return float("nan")
        denom = y.norm().item() or 1.0
        worst = max(worst, (x - y).norm().item() / denom)
    return worst


def time_fn(fn: Callable[[], object], device: torch.device) -> dict:
    """Median / p20 / p80 milliseconds (``triton.testing.do_bench``: warm-up, L2 flush
    between runs) and the peak memory of one call."""
    import triton.testing

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20": p20, "p80": p80, "peak_mem_bytes": int(peak)}


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=False).stdout.strip() or None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu_name": gpu, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "python": platform.python_version()}


def results_path(directory: str, gpu_name: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in gpu_name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return os.path.join(directory, f"{slug}-{datetime.date.today():%Y%m%d}.json")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[h for h, _ in columns]] + [[_fmt(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def dump(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
