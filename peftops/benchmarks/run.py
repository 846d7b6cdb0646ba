"""``python -m peftops bench``: time every case on a GPU (JSON + table), or, without a GPU,
run each case once at small shapes and compare providers (a parity pass)."""
from __future__ import annotations

import importlib
import time

import torch

from . import METHODS
from .core import Case, dtype_name, dump, environment, progress, rel_err, results_path, table, time_fn

PARITY_BOUND = 1e-4  # fp32 on the parity pass: providers agree to this relative error


def load_cases(methods: list[str], device, dtype, small: bool) -> list[Case]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    out = []
    for m in methods:
        out.extend(importlib.import_module(METHODS[m]).cases(device, dtype, small))
    return out


def run_timing(cases: list[Case], device, out_dir: str | None) -> list[dict]:
    env = environment()
    records = []
    for i, case in enumerate(cases, 1):
        shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
        for provider, build in case.providers.items():
            progress(f"[{i}/{len(cases)}] {case.op} {shape} {provider} ...")
            try:
                stats = time_fn(build(), device)
            except Exception as exc:  # a provider that cannot run this case (e.g. OOM): recorded, not fatal
                progress(f"    {provider} failed: {type(exc).__name__}: {exc}")
                stats = {"median_ms": None, "p20": None, "p80": None, "peak_mem_bytes": None, "error": str(exc)}
            torch.cuda.empty_cache()
            rec = {"op": case.op, "shape": case.shape, "dtype": dtype_name(case.dtype), "provider": provider,
                   **stats, **{k: env[k] for k in ("gpu_name", "torch", "triton", "commit")}}
            if stats["median_ms"] and case.flops:
                rec["tflops"] = case.flops / stats["median_ms"] / 1e9
            if stats["median_ms"] and case.bytes:
                rec["gb_per_s"] = case.bytes / stats["median_ms"] / 1e6
            records.append(rec)
    _add_ratios(records)
    print(table(records, [("op", "op"), ("shape", "shape"), ("provider", "provider"), ("median ms", "median_ms"),
                          ("p20", "p20"), ("p80", "p80"), ("x base", "vs_cublas_base"), ("eager/this", "speedup_vs_eager"),
                          ("peft/this", "speedup_vs_peft"), ("TFLOP/s", "tflops"), ("GB/s", "gb_per_s"),
                          ("peak MiB", "peak_mib")]))
    if out_dir:
        path = results_path(out_dir, env["gpu_name"])
        dump(records, path)
        print(f"\nwrote {path} ({len(records)} records, {env['gpu_name']})")
    return records


def _add_ratios(records: list[dict]) -> None:
    """Ratios whose two sides ran in this process: time / base time, eager time / time."""
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
                                     ("peft", "speedup_vs_peft", True)):
                o = group.get(other, {}).get("median_ms")
                if o and other != r["provider"]:
                    r[key] = o / ms if flip else ms / o


def run_parity(cases: list[Case]) -> bool:
    rows, ok = [], True
    for i, case in enumerate(cases, 1):
        shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
        progress(f"[{i}/{len(cases)}] {case.op} {shape}")
        t0 = time.perf_counter()
        expect = case.providers[case.parity_with]()()
        for provider in case.compare:
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
