"""``python -m peftops compile-check``: compile every kernel variant the test suite launches,
as a GPU would, for sm_90 (H100/H200) and sm_80 (A100) -- without a GPU -- and read what the
GPU will do from each cubin: registers, spill bytes, shared memory, wgmma.

Triton's CPU interpreter is laxer than its GPU compiler (tl.dot shapes, non-constexpr
globals, shared memory) and says nothing about registers, so a kernel can pass every CPU
test and still fail to compile, or spill and run 7x slower, on an H100 (shared/PERF.md).

1. record: the test suite, run in the interpreter, records each distinct launch (kernel,
   argument kinds and integer values, constexprs, num_warps, num_stages) through the pytest
   plugin ``peftops.launch_log`` (tests/conftest.py loads it) into ``build/launches/``;
   launchers use their GPU launch configs there (tests set ``PEFTOPS_GPU_CONFIGS=1``).
   Without a fresh record of a full, passing run, this command runs the suite itself.
2. specialise: each launch is bound by Triton's own launcher code
   (``create_function_from_signature`` + ``JITFunction._pack_args``) at *real* shapes:
   pointers 16-byte aligned, integers equal to 1 (unit strides, r = 1, one row) stay 1
   and become constexprs, every other integer is taken as a multiple of 16 (the
   ``tt.divisibility`` 16 a launch at 4096-sized shapes gets). Odd test shapes thus stand
   for the real-shape variant of the same code path.
2b. enumerate: every ``*config`` function in kernels/ declares the configs it can return
   (``@kernels.enumerates`` next to it: a generator of ``kernels.variant``); each is applied to
   every recorded flag path (flags, dtypes) of its kernel, at that path's most frequent integer
   pattern, and compiled on sm_90 (``--enum-arch``) unless the record has that specialisation,
   so a config no test shape reaches still meets the GPU compiler here first.
3. compile each distinct specialisation for each arch down to a cubin with Triton's ptxas,
   and read ``cuobjdump -res-usage`` (REG, STACK = spill/stack bytes, SHARED) and whether
   the PTX uses wgmma.

Fails (exit 1) on a compile error, on any stack (spill) bytes in a bf16 / fp16 variant
(fp32 spills are reported, not fatal) and on shared memory over the arch's limit. Writes
one table per kernel and ``build/compile_check.json``. It matched a real H100 on the
spills it was built to catch (PERF.md); it proves nothing about run-time speed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_DIR = os.path.join(REPO, "build", "launches")
# Dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {90: 232448, 80: 166912}
HALF = ("*bf16", "*fp16")
HALF_DTYPES = ("bfloat16", "float16")


# ----------------------------------------------------------------- 1. the recorded launches
def load_record(directory: str = LAUNCH_DIR) -> tuple[list[dict], dict | None]:
    """The launches a test run recorded, deduplicated, and that run's manifest."""
    manifest = None
    path = os.path.join(directory, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    seen: dict[str, dict] = {}
    for part in sorted(glob.glob(os.path.join(directory, "launches-*.json"))):
        with open(part) as f:
            for rec in json.load(f):
                seen.setdefault(json.dumps(rec, sort_keys=True), rec)
    return list(seen.values()), manifest


def record_is_fresh(manifest: dict | None) -> str | None:
    """None if the record stands for the current code and a full passing run, else why not."""
    if manifest is None:
        return "no recorded test run"
    if not manifest.get("full"):
        return f"the recorded run was partial (pytest args {manifest.get('args')})"
    if manifest.get("exitstatus") != 0:
        return f"the recorded run did not pass (exit {manifest.get('exitstatus')})"
    if not manifest.get("gpu_configs"):
        return "the recorded run used the interpreter launch configs, not the GPU ones"
    newest = max((os.path.getmtime(p) for d in ("kernels", "peftops", "tests")
                  for p in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)), default=0.0)
    if newest > manifest.get("finished", 0.0):
        return "code changed after the recorded run"
    return None


def run_suite_recording(jobs: int) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTOPS_BACKEND="triton", PEFTOPS_GPU_CONFIGS="1",
               PEFTOPS_TEST_DEVICE="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    if jobs > 1:
        cmd[3:3] = ["-n", str(jobs)]
    print("recording launches: " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


# ----------------------------------------------------------------- 1b. the configs the launchers can pick
def config_functions(module) -> dict:
    """A kernel module's launch-config functions: its own callables named ``*config``."""
    return {name: fn for name, fn in vars(module).items()
            if name.endswith("config") and callable(fn) and getattr(fn, "__module__", None) == module.__name__}


def kernel_modules() -> list:
    import pkgutil

    from . import kernels

    return [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]


def declared_variants() -> list[tuple[str, str, dict]]:
    """(kernel module, config function, variant) for every config each launch-config function in
    kernels/ declares it can return (``kernels.enumerates``), deduplicated."""
    out: dict[str, tuple[str, str, dict]] = {}
    for module in kernel_modules():
        for name, fn in config_functions(module).items():
            for v in getattr(fn, "variants", lambda: ())():
                key = json.dumps([module.__name__, {k: x for k, x in v.items() if k != "descs"}], sort_keys=True)
                out.setdefault(key, (module.__name__, name, v))
    return list(out.values())


def _first_dtype(rec: dict) -> str | None:
    return next((d for d in map(_arg_dtype, rec["args"]) if d), None)


def _flag_path(rec: dict, replaced: set) -> str:
    """A launch's code path less what a config replaces (its block constexprs, warps, stages,
    descriptor boxes) and its integer values: the flags and dtypes a config is applied to."""
    kinds = [["tensordesc", a[1]["dtype"]] if a[0] == "tensordesc" else ["int"] if a[0] == "int" else a
             for a in rec["args"] if a[0] not in ("float", "bool", "constexpr")]
    return json.dumps([rec["module"], rec["name"], {k: v for k, v in rec["options"].items() if k not in replaced},
                       {k: v for k, v in rec["constexprs"].items() if k not in replaced}, kinds], sort_keys=True)


def _apply(template: dict, module: str, fn_name: str, v: dict) -> dict:
    """``template`` (a recorded launch) with variant ``v``'s constexprs, options, descriptor boxes."""
    names = getattr(importlib.import_module(module), v["kernel"]).arg_names
    rec = json.loads(json.dumps(template))
    unknown = set(v["constexprs"]) - set(rec["constexprs"])
    if unknown:
        raise ValueError(f"{module}.{fn_name}: variant sets {sorted(unknown)}, not constexprs of {v['kernel']}")
    rec["constexprs"].update(v["constexprs"])
    rec["options"].update(v["options"])
    boxes = v["descs"](rec["constexprs"]) if v["descs"] else {}
    for i, name in enumerate(names):
        if name in v["constexprs"]:
            rec["args"][i] = ["constexpr", v["constexprs"][name]]
        if name in boxes:
            rec["args"][i][1]["block_shape"] = list(boxes[name])
    rec["enumerated"] = fn_name
    return rec


def _maximal(groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The flag paths no other one contains: among paths of the same dtypes and non-boolean
    constexprs (activation, precisions), those whose set of true boolean flags is not a strict
    subset of another's (every optional feature on: the most registers live)."""
    def parts(path):
        module, name, options, cx, kinds = json.loads(path)
        flags = frozenset(k for k, v in cx.items() if v is True)
        rest = json.dumps([options, {k: v for k, v in cx.items() if not isinstance(v, bool)}, kinds], sort_keys=True)
        return rest, flags
    split = {p: parts(p) for p in groups}
    return {p: g for p, g in groups.items()
            if not any(r == split[p][0] and split[p][1] < f for q, (r, f) in split.items() if q != p)}


def enumerated_launches(recs: list[dict], lean: bool = True) -> tuple[list[dict], list[str]]:
    """Every declared config applied to each distinct flag path (flags, dtypes) of the recorded
    launches it applies to (one launch per path: its most frequent integer pattern, the
    contiguous case), and the declared configs no recorded launch takes (a test should reach
    its flags), for kernels the record has at all."""
    by_kernel: dict[tuple, list[dict]] = {}
    for rec in recs:
        by_kernel.setdefault((rec["module"], rec["name"]), []).append(rec)
    out: dict[str, dict] = {}
    unreached = []
    for module, fn_name, v in declared_variants():
        launches = by_kernel.get((module, v["kernel"]))
        if not launches:
            continue
        replaced = set(v["constexprs"]) | set(v["options"])
        groups: dict[str, list[dict]] = {}
        for rec in launches:
            if v["dtypes"] and _first_dtype(rec) not in v["dtypes"]:
                continue
            if any(rec["constexprs"].get(k) != x for k, x in v["where"].items()):
                continue
            groups.setdefault(_flag_path(rec, replaced), []).append(rec)
        if lean:  # half precision: every flag path (register allocation is not monotone in the flags:
            # fewer features can mean a lower register target and a spill); fp32 (spills reported,
            # not fatal): the maximal ones, for compile errors and shared memory
            full_ = {p: g for p, g in groups.items() if _first_dtype(g[0]) in HALF_DTYPES}
            groups = {**_maximal({p: g for p, g in groups.items() if p not in full_}), **full_}
        if not groups:
            unreached.append(f"{module}.{fn_name} -> {v['kernel']} {v['constexprs']} {v['options']} "
                             f"dtypes={v['dtypes']} where={v['where']}")
        for group in groups.values():
            counts: dict[tuple, int] = {}
            for rec in group:
                counts[_int_pattern(rec)] = counts.get(_int_pattern(rec), 0) + 1
            best = max(counts, key=lambda p: (counts[p], sum(p)))  # the most frequent (the contiguous case)
            new = _apply(next(r for r in group if _int_pattern(r) == best), module, fn_name, v)
            out.setdefault(json.dumps(new, sort_keys=True), new)
    return list(out.values()), unreached


# ----------------------------------------------------------------- 2. specialisation
def _real_shape_int(v: int) -> int:
    """An integer as a launch at real (multiple-of-16) shapes sees it: 1 stays 1 (Triton
    makes it a constexpr), anything else becomes a multiple of 16 of the same magnitude."""
    if v == 1 or v % 16 == 0:
        return v
    up = v + 16 - v % 16
    return up if up < 2**31 or v >= 2**31 else v - v % 16


def specialise(rec: dict, arch: int):
    """(fn, signature, constexprs, attrs, options) exactly as Triton's launcher would build
    them for this launch at real shapes on ``arch``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = []
    for kind, value in rec["args"]:
        if kind == "tensor":
            args.append(MockTensor(getattr(torch, value)))  # data_ptr 0: 16-byte aligned
        elif kind == "tensordesc":  # a TMA descriptor over such a tensor, its sizes as at real shapes
            from triton.tools.tensor_descriptor import TensorDescriptor

            args.append(TensorDescriptor(MockTensor(getattr(torch, value["dtype"])),
                                         [_real_shape_int(v) for v in value["shape"]],
                                         [_real_shape_int(v) for v in value["strides"]], value["block_shape"]))
        elif kind == "int":
            args.append(_real_shape_int(value))
        else:  # float, bool, None, constexpr: as launched
            args.append(value)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **rec["options"])
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(rec["options"]), bound, spec, options)
    return fn, signature, constexprs, attrs, options, target


def _arg_dtype(arg: list) -> str | None:
    """The element dtype of a recorded tensor or TMA descriptor argument, else None."""
    if arg[0] == "tensor":
        return arg[1]
    if arg[0] == "tensordesc":
        return arg[1]["dtype"]
    return None


def _code_path(rec: dict) -> str:
    """A launch without its integer values: kernel, dtypes, constexprs, warps / stages (TMA
    descriptors by dtype and box, not by the sizes of their tensors)."""
    def kind(a):
        if a[0] == "int":
            return ["int"]
        if a[0] == "tensordesc":
            return ["tensordesc", a[1]["dtype"], a[1]["block_shape"]]
        return a
    return json.dumps([rec["module"], rec["name"], rec["options"],
                       [kind(a) for a in rec["args"] if a[0] not in ("float", "bool")]], sort_keys=True)


def _int_pattern(rec: dict) -> tuple:
    return tuple(a[1] == 1 for a in rec["args"] if a[0] == "int")


def min_arch(rec: dict) -> int:
    """The oldest arch a kernel is launched on: its module's ``MIN_ARCH`` entry (a TMA
    kernel is dispatched on sm_90+ only), else any."""
    return getattr(importlib.import_module(rec["module"]), "MIN_ARCH", {}).get(rec["name"], 0)


def plan(recs: list[dict], archs: list[int], full_archs: set[int],
         enum_archs: set[int] | None = None) -> list[tuple[dict, int]]:
    """(launch, arch) pairs to compile: every distinct specialisation on ``full_archs``; on the
    other archs one per half-precision code path (its most frequent integer pattern: the
    contiguous case), which is what their check needs (compile errors, shared memory) at a
    quarter of the cost: a cold compile takes ~1.5 s of one core (CPU seconds, triton 3.9,
    measured 2026-12-01; more wall time on a loaded machine). Enumerated launches
    (``enumerated_launches``) only on ``enum_archs`` (None: every arch), after the recorded
    ones, so a specialisation the record has is compiled once, as recorded."""
    jobs: dict[str, tuple[dict, int]] = {}
    for arch in archs:
        eligible = [r for r in recs if arch >= min_arch(r)
                    and (enum_archs is None or arch in enum_archs or "enumerated" not in r)]
        if arch in full_archs:
            for rec in eligible:
                jobs.setdefault(_spec_key(rec, arch), (rec, arch))
            continue
        by_path: dict[str, list[dict]] = {}
        for rec in eligible:
            if any(_arg_dtype(a) in ("bfloat16", "float16") for a in rec["args"]):
                by_path.setdefault(_code_path(rec), []).append(rec)
        for group in by_path.values():
            counts: dict[tuple, int] = {}
            for rec in group:
                counts[_int_pattern(rec)] = counts.get(_int_pattern(rec), 0) + 1
            best = max(counts, key=counts.get)
            rec = next(r for r in group if _int_pattern(r) == best)
            jobs.setdefault(_spec_key(rec, arch), (rec, arch))
    return list(jobs.values())


def _spec_key(rec: dict, arch: int) -> str:
    _, signature, constexprs, attrs, options, _ = specialise(rec, arch)
    return json.dumps([rec["module"], rec["name"], signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((str(k), v) for k, v in attrs.items()), rec["options"], arch], sort_keys=True)


# ----------------------------------------------------------------- 3. compile and read
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_one(rec: dict, arch: int) -> dict:
    import triton
    from triton.compiler import ASTSource

    out = {"kernel": rec["name"], "module": rec["module"], "arch": arch, "options": rec["options"],
           "constexprs": {k: v for k, v in rec["constexprs"].items() if isinstance(v, (int, bool, str, float))},
           "dtypes": sorted({_arg_dtype(a) for a in rec["args"]} - {None})}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        fn, signature, constexprs, attrs, options, target = specialise(rec, arch)
        out["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)
        if m is None:
            raise RuntimeError(f"cannot read cuobjdump -res-usage output: {res[-500:]}")
        out.update(ok=True, regs=int(m.group(1)), stack=int(m.group(2)),
                   shared=max(int(m.group(3)), int(kernel.metadata.shared)),
                   wgmma="wgmma" in kernel.asm["ptx"])
    except Exception as exc:  # reported per variant; the check fails on it
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(_cpu_seconds() - c0, 2)  # this process and its ptxas / cuobjdump: load-independent
    if "enumerated" in rec:
        out["enumerated"] = rec["enumerated"]
    return out


def verdict(res: dict) -> str | None:
    """Why this variant fails the check (None: it passes)."""
    if not res["ok"]:
        return "compile error"
    half = any(t in HALF or t.startswith(("tensordesc<bf16", "tensordesc<fp16")) for t in res.get("signature", {}).values())
    if res["stack"] > 0 and half:
        return f"spills {res['stack']} B in a half-precision variant"
    if res["shared"] > SHARED_LIMIT[res["arch"]]:
        return f"shared memory {res['shared']} B > sm_{res['arch']} limit {SHARED_LIMIT[res['arch']]} B"
    return None


def _blocks(res: dict) -> str:
    keep = {k: v for k, v in res["constexprs"].items() if k.startswith("BLOCK") or k in ("GROUP_M",)}
    return " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in keep.items())


def _flags(res: dict) -> str:
    return " ".join(k for k, v in res["constexprs"].items() if v is True and not k.startswith("BLOCK"))


def print_tables(results: list[dict]) -> None:
    from .benchmarks.core import table

    for name in sorted({r["kernel"] for r in results}):
        rows = []
        for r in sorted((r for r in results if r["kernel"] == name),
                        key=lambda r: (r["arch"], r["dtypes"], _blocks(r), _flags(r))):
            why = verdict(r)
            rows.append({"sm": r["arch"], "dtypes": ",".join(d.replace("float", "f").replace("bf16", "bf16")
                                                             for d in r["dtypes"]),
                         "tiles": _blocks(r), "warps/stages": f"{r['options'].get('num_warps')}/{r['options'].get('num_stages')}",
                         "flags": _flags(r), "regs": r.get("regs"), "spill B": r.get("stack"),
                         "smem KiB": None if r.get("shared") is None else round(r["shared"] / 1024, 1),
                         "wgmma": {True: "yes", False: "no"}.get(r.get("wgmma")),
                         "from": r.get("enumerated", "record"), "status": why or "ok"})
        print(f"\n{name} ({len(rows)} variants)")
        print(table(rows, [(k, k) for k in rows[0]]))


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftops compile-check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--full-arch", default="90",
                        help="archs compiled for every specialisation (the others: one per code path)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--record", default=LAUNCH_DIR, help="directory of a test run's launch record")
    parser.add_argument("--rerecord", action="store_true", help="run the test suite to record, even if fresh")
    parser.add_argument("--allow-partial", action="store_true",
                        help="use the record as it is, even of a partial run (kernel work: record one test file "
                             "with `PEFTOPS_GPU_CONFIGS=1 TRITON_INTERPRET=1 pytest -p peftops.launch_log FILE`)")
    parser.add_argument("--kernels", default="", help="only these kernel names (comma-separated)")
    parser.add_argument("--where", default="",
                        help="only launches with these constexpr / option values, e.g. BLOCK_W=16,ACT=1,num_warps=4")
    parser.add_argument("--enumerated-only", action="store_true", help="only the enumerated configs the record lacks")
    parser.add_argument("--half-only", action="store_true",
                        help="only bf16 / fp16 launches (what a spill fails; the second Triton's pass in CI)")
    parser.add_argument("--sample", type=int, default=0,
                        help="compile only a random N of the planned variants (seeded; to estimate the cold time)")
    parser.add_argument("--enum-all", action="store_true",
                        help="apply each enumerated config to every recorded fp32 flag path too (default: every "
                             "half-precision path, and the fp32 paths no other contains)")
    parser.add_argument("--strict-enum", action="store_true",
                        help="fail on the enumerated configs' failures too (default: listed, not fatal, until the "
                             "spills the enumeration found are fixed: bench/MODEL.md, issue 16)")
    parser.add_argument("--enum-arch", default="90",
                        help="archs the enumerated configs (every config a launch-config function can return, "
                             "not only those the record reached) are compiled for; '' for none")
    parser.add_argument("--json", default=os.path.join(REPO, "build", "compile_check.json"))
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.environ.pop("TRITON_INTERPRET")  # compile as for a GPU (kernels are imported fresh below)
        if any(m.startswith("peftops.kernels") for m in sys.modules):
            raise SystemExit("compile-check must start in a process that has not loaded the kernels interpreted")

    recs, manifest = load_record(args.record)
    stale = "asked to" if args.rerecord else (None if args.allow_partial and recs else record_is_fresh(manifest))
    if stale:
        print(f"launch record not usable ({stale}): running the test suite to record", flush=True)
        run_suite_recording(args.jobs)
        recs, manifest = load_record(args.record)
        if record_is_fresh(manifest):
            print(f"compile-check: the recording run is not usable: {record_is_fresh(manifest)}")
            return 1
    wanted = {k for k in args.kernels.split(",") if k}
    recs = [r for r in recs if not wanted or r["name"] in wanted]

    t0 = time.perf_counter()
    full = {int(a) for a in args.full_arch.split(",") if a}
    enum_archs = {int(a) for a in args.enum_arch.split(",") if a}
    enumerated, unreached = enumerated_launches(recs, lean=not args.enum_all) if enum_archs & set(archs) else ([], [])
    enumerated = [r for r in enumerated if not wanted or r["name"] in wanted]
    where = dict(kv.split("=", 1) for kv in args.where.split(",") if kv)

    def keep(rec):
        if args.half_only and not any(_arg_dtype(a) in HALF_DTYPES for a in rec["args"]):
            return False
        values = {**rec["constexprs"], **rec["options"]}
        return all(str(values.get(k)) == v for k, v in where.items())
    jobs = plan([r for r in recs if keep(r)] + [r for r in enumerated if keep(r)], archs, full, enum_archs)
    if args.enumerated_only:
        jobs = [(r, a) for r, a in jobs if "enumerated" in r]
    planned = len(jobs)
    if args.sample and args.sample < len(jobs):
        import random

        jobs = random.Random(0).sample(jobs, args.sample)
    per_arch = {a: sum(1 for _, b in jobs if b == a) for a in archs}
    print(f"{len(recs)} recorded launches + {len(enumerated)} enumerated configs (each launch-config function's "
          f"configs on the recorded flag paths; {sum('enumerated' in r for r, _ in jobs)} compiled: not in the record) -> " + ", ".join(
        f"sm_{a}: {n} {'specialisations' if a in full else 'half-precision code paths'}" for a, n in per_arch.items())
        + f"; compiling with {args.jobs} processes ...", flush=True)
    for u in unreached:
        print(f"  no recorded launch takes this declared config (no test reaches its flags): {u}")
    results = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(compile_one, rec, arch) for rec, arch in jobs]
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            res = fut.result()
            results.append(res)
            if i % 25 == 0 or not res["ok"]:
                print(f"  [{i}/{len(jobs)}] {res['kernel']} sm_{res['arch']}: "
                      f"{'ok' if res['ok'] else 'FAIL ' + res['error'][:300]}", flush=True)
    print_tables(results)
    failures = [(r, verdict(r)) for r in results if verdict(r)]
    fp32_spills = [r for r in results if r["ok"] and r["stack"] > 0 and not verdict(r)]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"archs": archs, "variants": results, "failures": len(failures), "unreached_configs": unreached,
                   "triton": _triton_version(),
                   "record": manifest, "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1, default=str)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    if len(jobs) < planned:
        print(f"\nsampled {len(jobs)} of {planned} planned variants: {cpu / max(len(results), 1):.2f} CPU s a variant "
              f"-> ~{cpu / max(len(results), 1) * planned / 60:.0f} CPU minutes for all (cold if the Triton cache was)")
    print(f"\ncompile-check (triton {_triton_version()}): {len(results)} specialisations "
          f"({sum('enumerated' in r for r in results)} enumerated configs), {len(failures)} failing, "
          f"{len(fp32_spills)} fp32 variants with spills (reported, not fatal); "
          f"{time.perf_counter() - t0:.0f}s ({cpu:.0f} CPU s: {cpu / max(len(results), 1):.2f} a variant); "
          f"JSON: {os.path.relpath(args.json)}")
    for r, why in failures:
        src = f" (enumerated from {r['enumerated']})" if "enumerated" in r else ""
        print(f"  FAIL {r['kernel']} sm_{r['arch']} {','.join(r['dtypes'])} [{_blocks(r)}] "
              f"{r['options'].get('num_warps')}/{r['options'].get('num_stages')} {_flags(r)}{src}: {why}")
        if not r["ok"]:
            print("       " + r["error"].strip().splitlines()[-1][:400])
    if unreached and not (args.allow_partial or wanted):
        print(f"  FAIL {len(unreached)} declared configs no recorded launch takes: a test must reach their flags")
    fatal = [r for r, _ in failures if args.strict_enum or "enumerated" not in r]
    if len(fatal) < len(failures):
        print(f"  ({len(failures) - len(fatal)} of the failures are enumerated configs no test launches: listed, "
              f"not fatal without --strict-enum)")
    return 1 if fatal or (unreached and not (args.allow_partial or wanted)) else 0


if __name__ == "__main__":
    sys.exit(main())
