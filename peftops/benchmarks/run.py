"""``python -m peftops bench``: time every case on a GPU (JSON + table), or, without a GPU,
run each case once at small shapes and compare providers (a parity pass)."""
from __future__ import annotations

import gc
import importlib
import os
import time

import torch

from . import METHODS
from .core import (Case, add_path_providers, cpu_skip_reason, dtype_name, dump, environment, is_late, load_records,
                   merge, progress, record_key, rel_err, results_path, table, time_fn)

PARITY_BOUND = 1e-4  # fp32 on the parity pass: providers agree to this relative error


def load_cases(methods: list[str], device, dtype, small: bool, unavailable: list | None = None) -> list[Case]:
    """Every case of ``methods``. A method whose module or cases cannot be built for want of
    a dependency (``ImportError``: bitsandbytes, AdapterHub's ``adapters`` ...) is left out
    and appended to ``unavailable`` as ``(method, reason)`` (``skip_records`` turns those into
    records), not fatal."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    out = []
    for m in methods:
        try:
            made = importlib.import_module(METHODS[m]).cases(device, dtype, small)
        except ImportError as exc:
            reason = f"missing dependency: {type(exc).__name__}: {exc}"
            progress(f"method {m}: not benchmarked here ({reason})")
            if unavailable is not None:
                unavailable.append((m, reason))
            continue
        for case in made:
            case.method = case.method or m
        out.extend(made)
    for case in out:
        add_path_providers(case)
    return out


def smallest_cases(cases: list[Case]) -> list[Case]:
    """The smallest shape of every bench case: per op and kind of case (its shape's keys and its
    non-integer values: flags, modes, dropout), the one with the fewest elements (product of its
    integer sizes). The rehearsal of bench/gpu_session.sh times these (``bench --smallest``)."""
    def kind(c):
        return c.op, tuple(sorted((k, v if isinstance(v, (bool, str, float)) else None)
                                  for k, v in c.shape.items()))

    def size(c):
        n = 1
        for v in c.shape.values():
            if isinstance(v, int) and not isinstance(v, bool):
                n *= max(v, 1)
        return n

    best: dict = {}
    for c in cases:
        k = kind(c)
        if k not in best or size(c) < size(best[k]):
            best[k] = c
    keep = {id(c) for c in best.values()}
    return [c for c in cases if id(c) in keep]


def skip_records(unavailable: list, dtype, device=None) -> list[dict]:
    """One record per method that could not be benchmarked: ``op`` = the method, provider
    ``*``, no time, ``skipped`` = why."""
    env = environment(device)
    return [{"op": m, "method": m, "shape": {}, "dtype": dtype_name(dtype), "provider": "*", "median_ms": None,
             "skipped": reason, **{k: env[k] for k in ("device", "gpu_name", "torch", "triton", "commit")}}
            for m, reason in unavailable]


def _shape_str(case: Case) -> str:
    return ",".join(f"{k}={v}" for k, v in case.shape.items())


def run_timing(cases: list[Case], device, out: str | None, *, budget_s: float | None = None,
               skip: tuple[str, ...] = (), resume: bool = False, extra: list[dict] = ()) -> list[dict]:
    """Time every (case, provider); compiling providers (``is_late``) after all the others.

    ``out``: a directory (the file is ``<gpu>-<yyyymmdd>.json`` in it) or a ``.json`` path.
    An existing file is merged into: records of the same (op, shape, dtype, provider) are
    replaced, the others kept. The file is rewritten after every provider, so a run stopped
    by a time limit keeps what it measured. ``budget_s``: start no provider after that many
    seconds (the ones left are listed, and ``--check`` reports their cases as not measured).
    ``resume``: skip the (case, provider) pairs the file already has a time for (a second
    device call finishing a first one's file; those pairs then come from two processes).
    ``extra``: records written as they are (``skip_records`` of methods not available here).

    On a CPU device (the rehearsal) the same loop times through ``time_fn``'s CPU path; the
    providers ``cpu_skip_reason`` names are recorded with ``skipped`` = the reason. A provider
    whose build needs a missing module (``ImportError``) is recorded ``skipped`` too; any other
    failure is an ``error``. Each record names the device, and in ``dispatch`` the path / table
    row / fallback counters its calls bumped (``<op>.path:<p>``, ``<op>.row:<i>``).
    """
    from .._dispatch import dispatch_counts

    env = environment(device)
    on_cpu = torch.device(device).type != "cuda"
    path = None
    existing: list[dict] = []
    if out:
        path = out if out.endswith(".json") else results_path(out, env["gpu_name"])
        if os.path.exists(path):
            existing = load_records(path)
    start = time.monotonic()
    done = {record_key(r) for r in existing if r.get("median_ms")} if resume else set()
    order = [(case, provider) for late in (False, True) for case in cases for provider in case.providers
             if is_late(provider) == late and provider not in skip
             and record_key({"op": case.op, "shape": case.shape, "dtype": dtype_name(case.dtype),
                             "provider": provider}) not in done]
    if done:
        progress(f"resuming {path}: {len(done)} timed records kept, {len(order)} (case, provider) pairs to time")
    records, skipped = list(extra), []
    for n, (case, provider) in enumerate(order, 1):
        shape = _shape_str(case)
        if budget_s is not None and time.monotonic() - start > budget_s:
            skipped.append(f"{case.op} {shape} {provider}")
            continue
        progress(f"[{n}/{len(order)} {time.monotonic() - start:.0f}s] {case.op} {shape} {provider} ...")
        t0 = time.perf_counter()
        build_s = None
        before = dispatch_counts()
        reason = cpu_skip_reason(case, provider) if on_cpu else None
        if reason:
            stats = {"median_ms": None, "p20": None, "p80": None, "peak_mem_bytes": None, "skipped": reason}
        else:
            try:
                with case.context(provider):
                    fn = case.providers[provider]()
                    build_s = time.perf_counter() - t0
                    stats = time_fn(fn, device, case.rep_ms, case.iters)
            except ImportError as exc:  # a provider whose library is not installed here
                progress(f"    {provider} skipped: {type(exc).__name__}: {exc}")
                stats = {"median_ms": None, "p20": None, "p80": None, "peak_mem_bytes": None,
                         "skipped": f"missing dependency: {type(exc).__name__}: {str(exc)[:500]}"}
            except Exception as exc:  # a provider that cannot run this case (OOM, compile error): recorded, not fatal
                progress(f"    {provider} failed: {type(exc).__name__}: {str(exc)[:500]}")
                stats = {"median_ms": None, "p20": None, "p80": None, "peak_mem_bytes": None,
                         "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        fn = None
        if not reason:
            gc.collect()
            if is_late(provider):
                import torch._dynamo as dynamo

                dynamo.reset()  # drop the compiled graphs (and what they hold) before the next build
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        after = dispatch_counts()
        taken = {k: v - before.get(k, 0) for k, v in sorted(after.items())
                 if v != before.get(k, 0) and (".path:" in k or ".row:" in k or ".fallback" in k)}
        rec = {"op": case.op, "shape": case.shape, "dtype": dtype_name(case.dtype), "provider": provider,
               **stats, **{k: env[k] for k in ("device", "gpu_name", "torch", "triton", "commit")}}
        if case.method:
            rec["method"] = case.method
        if taken:
            rec["dispatch"] = taken
        if provider in case.knobs:
            module, values = case.knobs[provider]
            rec["knob"] = {"module": module, "set": values}
        if build_s is not None:
            rec["build_s"] = build_s
        if case.flops:
            rec["flops"] = case.flops
        if case.bytes:
            rec["bytes"] = case.bytes
        if stats["median_ms"] and case.flops:
            rec["tflops"] = case.flops / stats["median_ms"] / 1e9
        if stats["median_ms"] and case.bytes:
            rec["gb_per_s"] = case.bytes / stats["median_ms"] / 1e6
        records.append(rec)
        if path:
            _add_ratios(records)
            dump(merge(existing, records), path)
    _add_ratios(records)
    if path:
        dump(merge(existing, records), path)
    print(table(records, [("op", "op"), ("shape", "shape"), ("provider", "provider"), ("median ms", "median_ms"),
                          ("p20", "p20"), ("p80", "p80"), ("x base", "vs_cublas_base"), ("eager/this", "speedup_vs_eager"),
                          ("compile/this", "speedup_vs_compile"), ("peft/this", "speedup_vs_peft"),
                          ("TFLOP/s", "tflops"), ("GB/s", "gb_per_s"), ("peak MiB", "peak_mib"), ("build s", "build_s")]))
    if skipped:
        print(f"\nout of time budget ({budget_s:g} s): {len(skipped)} provider(s) not run:")
        for s in skipped:
            print(f"  {s}")
    if path:
        print(f"\nwrote {path} ({len(records)} records this run, {env['gpu_name'] or env['device']})")
    return records


def _add_ratios(records: list[dict]) -> None:
    """Ratios whose two sides ran in this process: time / base time, other time / time."""
    by_case: dict = {}
    for r in records:
        by_case.setdefault((r["op"], str(r["shape"]), r["dtype"]), {})[r["provider"]] = r
    for group in by_case.values():
        for r in group.values():
            ms = r.get("median_ms")
            if r.get("peak_mem_bytes") is not None:
                r["peak_mib"] = r["peak_mem_bytes"] / 2**20
            if not ms:
                continue
            for other, key, flip in (("cublas_base", "vs_cublas_base", False), ("eager", "speedup_vs_eager", True),
                                     ("compile", "speedup_vs_compile", True), ("peft", "speedup_vs_peft", True)):
                o = group.get(other, {}).get("median_ms")
                if o and other != r["provider"]:
                    r[key] = o / ms if flip else ms / o


def run_parity(cases: list[Case]) -> bool:
    rows, ok = [], True
    for i, case in enumerate(cases, 1):
        shape = _shape_str(case)
        if not case.compare:
            progress(f"[{i}/{len(cases)}] {case.op} {shape}: no parity (timing only)")
            continue
        progress(f"[{i}/{len(cases)}] {case.op} {shape}")
        t0 = time.perf_counter()
        with case.context(case.parity_with):
            expect = case.providers[case.parity_with]()()
        for provider in case.compare:
            with case.context(provider):
                got = case.providers[provider]()()
            err = rel_err(got, expect)
            good = err <= PARITY_BOUND  # NaN compares False: never passes
            ok &= good
            rows.append({"op": case.op, "shape": shape, "provider": provider, "vs": case.parity_with,
                         "rel_err": err, "status": "ok" if good else "FAIL"})
        progress(f"    {time.perf_counter() - t0:.1f}s")
    print(table(rows, [("op", "op"), ("shape", "shape"), ("provider", "provider"), ("compared with", "vs"),
                       ("max rel err", "rel_err"), ("", "status")]))
    print(f"\nparity: {'all ok' if ok else 'FAILURES'} (bound {PARITY_BOUND:g}, fp32)")
    return ok
