"""Benchmark runner core: cases, timing, parity, the JSON schema, the table.

A method's bench module (``peftops/benchmarks/<m>.py``) defines

    def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]

``small=True`` asks for tiny shapes (CPU parity pass under the Triton interpreter).
Each provider builder allocates its inputs and returns a zero-argument function; calling
that function runs the op once and returns what it computed (the output, or the tuple of
gradients for a forward+backward case), so the same case serves timing on a GPU and
parity on a CPU. Provider names: ``peftops``, ``eager`` (the reference formula in eager
PyTorch), ``compile`` (that formula under ``torch.compile``, compiled and warmed up inside
its builder, so timing excludes compilation), ``peft`` (HF PEFT's own layer),
``cublas_base`` (the frozen layer alone), op-specific ones (``sdpa_no_prefix``,
``sdpa_concat``, ``peftops_compile``), and ``peftops[<path>]``: peftops with one of its
implementation paths forced (added by ``add_path_providers`` for every path the op's
``PATHS`` table lists, when its ops module has one).

``bench --device cpu`` (the rehearsal of bench/gpu_session.sh) runs the same loop on a CPU:
``time_fn`` takes its ``time_cpu`` path, and the providers ``cpu_skip_reason`` names (the
compiling ones, and any a case lists in ``Case.cuda_only`` with its reason) are recorded as
``skipped``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
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
    paths_from: str | None = None  # ops module whose ``PATHS`` table gives ``peftops[<path>]`` providers
    rep_ms: float = 100.0  # do_bench's timing window
    iters: int | None = None  # long calls (a training step): this many timed calls instead of do_bench
    forced: dict = dataclasses.field(default_factory=dict)  # provider -> (PathTable op, path)
    knobs: dict = dataclasses.field(default_factory=dict)  # provider -> (module, {attribute: value})
    cuda_only: dict = dataclasses.field(default_factory=dict)  # provider -> why it cannot run on a CPU
    method: str = ""  # the METHODS entry that made it (set by run.load_cases)

    def context(self, provider: str):
        """What a provider runs under: its forced path and its knobs (module attributes such
        as ``peftops.kernels.lora.TMA_FUSE_S`` set for it, then restored), if any; set around
        build and timing, so the timed calls pay nothing for them."""
        stack = contextlib.ExitStack()
        if provider in self.forced:
            from .._dispatch import force_path

            stack.enter_context(force_path(*self.forced[provider]))
        if provider in self.knobs:
            stack.enter_context(_set_attrs(*self.knobs[provider]))
        return stack


@contextlib.contextmanager
def _set_attrs(module: str, values: dict):
    mod = importlib.import_module(module)
    before = {k: getattr(mod, k) for k in values}  # AttributeError for a knob that does not exist
    try:
        for k, v in values.items():
            setattr(mod, k, v)
        yield
    finally:
        for k, v in before.items():
            setattr(mod, k, v)


def add_knob_provider(case: Case, name: str, path: tuple[str, str], module: str, values: dict) -> None:
    """``peftops[<path>:<name>]``: peftops on a forced path with module knobs changed (a
    variant a GPU run decides, e.g. S fused into the TMA GEMM or not); compared like the
    path providers."""
    provider = f"peftops[{path[1]}:{name}]"
    case.providers[provider] = case.providers["peftops"]
    case.forced[provider] = path
    case.knobs[provider] = (module, values)
    if "peftops" in case.compare:
        case.compare = (*case.compare, provider)


def is_late(provider: str) -> bool:
    """Providers that compile (``compile``, ``*_compile``): timed after all the others, so a
    time budget that runs out loses those, not the peftops numbers."""
    return provider == "compile" or provider.endswith("_compile")


CPU_COMPILE_SKIP = ("needs CUDA here: torch.compile's inductor builds Triton kernels on a GPU, but C++ ones "
                    "on a CPU (a C++ toolchain and minutes per graph on 2 cores): timed on the GPU run only")


def cpu_skip_reason(case: Case, provider: str) -> str | None:
    """Why ``provider`` of ``case`` is not timed on a CPU device (the rehearsal), or None:
    the case's own ``cuda_only`` entry, or a compiling provider (``is_late``)."""
    if provider in case.cuda_only:
        return case.cuda_only[provider]
    return CPU_COMPILE_SKIP if is_late(provider) else None


def add_path_providers(case: Case) -> None:
    """``peftops[<path>]`` for each path of the op's ``PATHS`` (a ``PathTable``), when the ops
    module named by ``case.paths_from`` defines one; nothing otherwise."""
    if not case.paths_from or "peftops" not in case.providers:
        return
    try:
        module = importlib.import_module(case.paths_from)
    except ImportError:
        return
    table = getattr(module, "PATHS", None)
    paths, op = getattr(table, "paths", None), getattr(table, "op", None)
    if not paths or not op:
        return
    for path in paths:
        name = f"peftops[{path}]"
        case.providers[name] = case.providers["peftops"]
        case.forced[name] = (op, path)
        if "peftops" in case.compare and name not in case.compare:
            case.compare = (*case.compare, name)


def generator(device, seed: int) -> torch.Generator:
    """A generator on the inputs' device: GPU inputs are drawn on the GPU (a CPU draw of the
    large shapes costs seconds per build), CPU inputs exactly as before."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(g: torch.Generator, *shape, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Normal draws on ``g``'s device, scaled and shifted in fp32, then cast to ``dtype``."""
    t = torch.randn(*shape, generator=g, device=g.device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    if shift != 0.0:
        t.add_(shift)
    return t.to(dtype)


def raise_recompile_limits() -> None:
    # One compiled formula serves many shapes (a recompile each, dynamic=False): past
    # dynamo's default limit (8) it would silently run eager. Raise it, and make hitting
    # it an error rather than a quiet eager fallback where this torch has that switch.
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of an eager formula, static shapes (the best compile can do at one
    shape). Nothing is imported or compiled until the first call (the CPU parity pass never
    makes one): use it inside a ``warmed`` builder."""
    holder: list = []

    def call(*args, **kwargs):
        if not holder:
            raise_recompile_limits()
            holder.append(torch.compile(fn, dynamic=False))
        return holder[0](*args, **kwargs)
    return call


def warmed(build: Callable[[], Callable[[], object]], calls: int = 2) -> Callable[[], Callable[[], object]]:
    """A builder that calls what it builds ``calls`` times before handing it over: for the
    ``compile`` providers, compilation (forward and backward graphs) happens in the build,
    not in the timed calls."""
    def b():
        run = build()
        for _ in range(calls):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return run
    return b


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


def time_fn(fn: Callable[[], object], device: torch.device, rep_ms: float = 100.0, iters: int | None = None) -> dict:
    """Median / p20 / p80 milliseconds and the memory of one call: ``peak_mem_bytes`` above
    what was allocated before it (the call's own working memory), ``peak_total_bytes`` the
    device's peak during it (model, inputs and all). Timing: ``triton.testing.do_bench``
    (warm-up, L2 flush between runs) over ``rep_ms``; or, for calls of a second or so (``iters``
    set), that many calls timed one by one with CUDA events after the memory call (do_bench
    would spend 5 calls estimating first). On a CPU device (``bench --device cpu``, the
    rehearsal of bench/gpu_session.sh): ``time_cpu``, no memory figures."""
    if torch.device(device).type != "cuda":
        return time_cpu(fn, rep_ms, iters)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    total = torch.cuda.max_memory_allocated(device)
    if iters:
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        med, p20, p80 = quantiles(times)
    else:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20": p20, "p80": p80, "peak_mem_bytes": int(total - base),
            "peak_total_bytes": int(total)}


CPU_MAX_CALLS = 5  # a CPU timing (the rehearsal: Triton's interpreter) stops after this many calls


def time_cpu(fn: Callable[[], object], rep_ms: float = 100.0, iters: int | None = None) -> dict:
    """The CPU path of ``time_fn`` (the rehearsal of bench/gpu_session.sh): calls timed one by
    one with ``time.perf_counter`` until ``rep_ms`` is spent (at least 1, at most ``iters`` or
    ``CPU_MAX_CALLS``; no warm-up: an interpreted kernel call takes 0.1-2 s on a CPU, and these
    numbers time the interpreter, not a GPU); median / p20 / p80 of those. No memory figures."""
    import time

    times: list[float] = []
    limit = min(iters or CPU_MAX_CALLS, CPU_MAX_CALLS)
    while not times or (len(times) < limit and sum(times) < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = quantiles(times)
    return {"median_ms": med, "p20": p20, "p80": p80, "peak_mem_bytes": None, "peak_total_bytes": None,
            "calls": len(times)}


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


def environment(device=None) -> dict:
    """What every record carries: ``device`` (``cuda`` / ``cpu``: where it was timed),
    ``gpu_name`` (None on a CPU), torch, triton, commit, python."""
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
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if kind == "cuda" and torch.cuda.is_available() else None
    return {"device": kind, "gpu_name": gpu, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "python": platform.python_version()}


def device_label(device=None) -> str:
    """The results file's name stem: the GPU's name, or ``cpu-rehearsal`` on a CPU."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name() if kind == "cuda" else "cpu-rehearsal"


def results_path(directory: str, gpu_name: str | None) -> str:
    gpu_name = gpu_name or "cpu-rehearsal"
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
    """Write atomically (a run cut off by a time limit leaves the last complete file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def record_key(r: dict) -> tuple:
    return r["op"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["provider"]


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every record of the same (op, shape, dtype, provider) replaced by ``new``'s."""
    fresh = {record_key(r) for r in new}
    return [r for r in old if record_key(r) not in fresh] + list(new)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
