"""Compile facts of every peftops kernel variant a run compiled, read from Triton's cache.

    python -m peftops.benchmarks.kernel_facts [--cache-dir DIR] [--out kernel_facts.json] [--all]
    python -m peftops.benchmarks.kernel_facts --compile-check build/compile_check.json [--launches DIR] [--out F]

Triton writes each compiled variant to its cache directory (``TRITON_CACHE_DIR``, default
``~/.triton/cache``): ``<hash>/<kernel>.json`` (metadata: warps, stages, shared memory,
target) next to ``<kernel>.cubin`` and ``<kernel>.ptx``. Walking that directory after the
test suite and the bench ran (``bench/gpu_session.sh`` gives them one fresh cache) finds
every variant any process compiled. For each variant of a peftops kernel (the names of the
``@triton.jit`` functions in ``peftops.kernels``; ``--all``: every kernel) this records
* ``n_regs`` / ``n_spills``: what the CUDA driver reports when it loads the cubin (the same
  call Triton's ``CompiledKernel`` makes at first launch, so the same numbers it holds;
  ``n_spills`` is the spill memory per thread in bytes). Only with a GPU;
* ``REG`` / ``STACK`` / ``SHARED`` / ``LOCAL`` from ``cuobjdump -res-usage`` (the binary ships
  with Triton; no GPU needed; STACK > 0 means spills);
* ``wgmma``: whether the PTX uses Hopper's warp-group MMA.

Without a GPU (the rehearsal of bench/gpu_session.sh), ``--compile-check FILE`` takes the same
facts (``REG`` / ``STACK`` / ``SHARED`` / ``wgmma``, no driver numbers) from the JSON
``python -m peftops compile-check`` wrote, and, where that file does not exist,
``--launches DIR`` lists the variants a test run's launch record holds (kernel, warps,
stages, tiles: what a GPU would compile, no register figures). ``source`` in the output says
which of the three the facts came from.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys

RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def default_cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def peftops_kernel_names() -> set[str]:
    """Names of the ``@triton.jit`` functions in ``peftops.kernels`` (autotuned / heuristics
    wrappers unwrapped)."""
    from triton.runtime.jit import JITFunction

    import peftops.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            for _ in range(4):  # Autotuner / Heuristics -> .fn -> ... -> JITFunction
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, JITFunction):
                names.add(obj.__name__)
    return names


def _cuobjdump() -> str | None:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:  # pragma: no cover
        return None
    return path if os.access(path, os.X_OK) else None


def res_usage(cubin: str, tool: str | None) -> dict:
    """REG / STACK / SHARED / LOCAL of a cubin's kernel (cuobjdump -res-usage)."""
    if not tool:
        return {}
    try:
        out = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    m = RES_USAGE.search(out)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()))) if m else {}


def driver_facts(name: str, cubin: bytes, shared: int) -> dict:
    """n_regs / n_spills as the GPU's driver reports them on loading the cubin (Triton's own call)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        from triton.runtime.driver import driver

        device = driver.active.get_current_device()
        loaded = driver.active.utils.load_binary(name, cubin, shared, device)
        facts = {"n_regs": int(loaded[2]), "n_spills": int(loaded[3])}
        if len(loaded) > 4:
            facts["n_max_threads"] = int(loaded[4])
        return facts
    except Exception as exc:  # a variant that does not load here (another arch, too much shared memory)
        return {"load_error": f"{type(exc).__name__}: {exc}"[:300]}


def collect(cache_dir: str, names: set[str] | None) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    tool = _cuobjdump()
    facts, cubins = [], []
    if not os.path.isdir(cache_dir):
        return facts
    for entry in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, entry)
        if not os.path.isdir(d):
            continue
        for fname in sorted(os.listdir(d)):
            if not fname.endswith(".json") or fname.startswith("__grp__"):
                continue
            try:
                with open(os.path.join(d, fname)) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            name = meta.get("name") if isinstance(meta, dict) else None
            if not name or (names is not None and name not in names):
                continue
            cubin = os.path.join(d, f"{name}.cubin")
            if not os.path.exists(cubin):
                continue
            target = meta.get("target") or {}
            rec = {"name": name, "hash": entry, "arch": target.get("arch", meta.get("arch")),
                   "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
                   "shared": meta.get("shared"), "triton": meta.get("triton_version")}
            ptx = os.path.join(d, f"{name}.ptx")
            if os.path.exists(ptx):
                with open(ptx) as f:
                    rec["wgmma"] = "wgmma" in f.read()
            with open(cubin, "rb") as f:
                rec.update(driver_facts(name, f.read(), int(meta.get("shared") or 0)))
            facts.append(rec)
            cubins.append(cubin)
    with ThreadPoolExecutor(max_workers=8) as pool:  # cuobjdump: one process per cubin
        for rec, usage in zip(facts, pool.map(lambda c: res_usage(c, tool), cubins)):
            rec.update(usage)
    return facts


def from_compile_check(path: str, names: set[str] | None) -> list[dict]:
    """The facts of ``python -m peftops compile-check``'s JSON (every compiled variant)."""
    with open(path) as f:
        data = json.load(f)
    facts = []
    for v in data.get("variants", []):
        if names is not None and v.get("kernel") not in names:
            continue
        rec = {"name": v.get("kernel"), "arch": v.get("arch"), "num_warps": (v.get("options") or {}).get("num_warps"),
               "num_stages": (v.get("options") or {}).get("num_stages"), "shared": v.get("shared"),
               "dtypes": v.get("dtypes"), "REG": v.get("regs"), "STACK": v.get("stack"), "wgmma": v.get("wgmma")}
        if not v.get("ok", True):
            rec["compile_error"] = (v.get("error") or "")[-300:]
        facts.append(rec)
    return facts


def from_launches(directory: str, names: set[str] | None) -> list[dict]:
    """The distinct (kernel, warps, stages, tiles) a launch record holds (no compile facts)."""
    from ..compile_check import load_record

    recs, _ = load_record(directory)
    seen: dict = {}
    for r in recs:
        if names is not None and r.get("name") not in names:
            continue
        opts = r.get("options") or {}
        tiles = {k: v for k, v in sorted((r.get("constexprs") or {}).items()) if str(k).startswith("BLOCK")}
        rec = {"name": r.get("name"), "num_warps": opts.get("num_warps"), "num_stages": opts.get("num_stages"),
               "tiles": tiles}
        seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
    return list(seen.values())


def summary(facts: list[dict]) -> dict:
    def spills(f):
        return (f.get("n_spills") or 0) > 0 or (f.get("STACK") or 0) > 0

    return {"variants": len(facts), "kernels": len({f["name"] for f in facts}),
            "spilling_variants": sum(1 for f in facts if spills(f)),
            "spilling_kernels": sorted({f["name"] for f in facts if spills(f)}),
            "max_regs": max((f.get("n_regs") or f.get("REG") or 0 for f in facts), default=0),
            "with_wgmma": sum(1 for f in facts if f.get("wgmma")),
            "compile_errors": sum(1 for f in facts if f.get("compile_error"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftops.benchmarks.kernel_facts", description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=default_cache_dir())
    ap.add_argument("--out", default=None, help="write the facts as JSON here")
    ap.add_argument("--all", action="store_true", help="every kernel in the cache, not only peftops'")
    ap.add_argument("--compile-check", default=None, metavar="JSON",
                    help="no GPU: the facts of compile-check's JSON instead of a Triton cache (if it exists)")
    ap.add_argument("--launches", default=None, metavar="DIR",
                    help="no GPU and no compile-check JSON: the variants of this launch record (no registers)")
    args = ap.parse_args(argv)
    # compile-check's JSON and the launch record hold peftops' kernels only (and under the
    # interpreter the jit functions are not JITFunctions: no name filter for those sources)
    names = None if args.all or args.compile_check or args.launches else peftops_kernel_names()
    if args.compile_check and os.path.exists(args.compile_check):
        source = f"compile-check JSON {args.compile_check}"
        facts = from_compile_check(args.compile_check, names)
    elif args.compile_check or args.launches:
        if not args.launches:
            raise SystemExit(f"{args.compile_check}: not found (and no --launches)")
        source = f"launch record {args.launches} (no {args.compile_check or 'compile-check JSON'})"
        facts = from_launches(args.launches, names)
    else:
        source = f"triton cache {args.cache_dir}"
        facts = collect(args.cache_dir, names)
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        pass
    result = {"gpu_name": gpu, "source": source, "cache_dir": args.cache_dir, "summary": summary(facts),
              "kernels": facts}
    from .core import table

    print(table(facts, [(k, k) for k in ("name", "arch", "num_warps", "num_stages", "shared", "n_regs", "n_spills",
                                         "REG", "STACK", "wgmma")]))
    print(f"source: {source}")
    print(json.dumps(result["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out} ({len(facts)} variants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
