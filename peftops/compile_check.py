"""``python -m peftops compile-check``: compile every kernel variant the ops launch, at their
GPU launch configs, for a Hopper GPU (sm_90) -- without a GPU.

Triton's CPU interpreter is laxer than its GPU compiler (tl.dot shapes, block shapes,
shared memory), so a kernel that passes the CPU tests can still fail to compile on an H100.
This check closes that gap on a CPU machine:

1. record: run every bench case at small shapes in the interpreter with
   ``PEFTOPS_GPU_CONFIGS=1`` (launchers pick their GPU block sizes), recording each launch:
   kernel, argument types, constexprs, num_warps, num_stages;
2. compile: in a fresh process without the interpreter, ``triton.compile`` each distinct
   variant for ``GPUTarget("cuda", arch, 32)`` down to a cubin with Triton's own ptxas.

It proves the kernels *compile* for Hopper (and reports their shared memory); it says
nothing about their speed or about run-time faults.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
          "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def record(methods: list[str], dtypes: list[str]) -> list[dict]:
    """Run the bench cases in the interpreter at GPU configs; return the distinct launches."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PEFTOPS_GPU_CONFIGS") == "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from .benchmarks.run import load_cases

    seen: dict[str, dict] = {}
    original = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params]
        const = {p.name for p in params if "constexpr" in str(p.annotation)}
        defaults = {p.name: p.default for p in params}
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        sig, constexprs = {}, {}
        for i, name in enumerate(names):
            if name in const:
                value = bound.get(name, defaults[name])
                constexprs[name] = getattr(value, "value", value)
                sig[name] = "constexpr"
            else:
                value = bound[name]
                if value is None:
                    sig[name] = "constexpr"
                    constexprs[name] = None
                else:
                    sig[name] = _arg_type(value)
        if "UPCAST" in constexprs:  # the interpreter's bf16 workaround; a GPU runs real bf16 dots
            constexprs["UPCAST"] = False
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        rec = {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": constexprs,
               "options": opts}
        seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = spy
    try:
        for dt in dtypes:
            dtype = getattr(torch, dt)
            for case in load_cases(methods, torch.device("cpu"), dtype, small=True):
                for build in case.providers.values():
                    try:
                        build()()
                    except Exception as exc:  # a provider that fails at small shapes is reported by the tests
                        print(f"  ({case.op} {dt}: {type(exc).__name__}: {exc})", file=sys.stderr)
    finally:
        InterpretedFunction.run = original
    return list(seen.values())


def compile_one(rec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    names = list(rec["signature"])
    constexprs = {(names.index(k),): v for k, v in rec["constexprs"].items()}
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, rec["signature"], constexprs), target=GPUTarget("cuda", arch, 32),
                                options=rec["options"])
        return {**rec, "ok": True, "shared": kernel.metadata.shared, "seconds": time.perf_counter() - t0}
    except Exception as exc:
        return {**rec, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}",
                "seconds": time.perf_counter() - t0}


def _describe(rec: dict) -> str:
    blocks = {k: v for k, v in rec["constexprs"].items() if k.isupper() and isinstance(v, (int, bool, str))}
    ptrs = sorted({t for t in rec["signature"].values() if t.startswith("*")})
    return f"{rec['name']} {','.join(ptrs)} {blocks} {rec['options']}"


def main(argv: list[str] | None = None) -> int:
    from .benchmarks import METHODS

    parser = argparse.ArgumentParser(prog="python -m peftops compile-check", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90 = H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--_record", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]

    if args._record:  # child 1: the interpreter process
        recs = record(methods, [d for d in args.dtypes.split(",") if d])
        with open(args._record, "w") as f:
            json.dump(recs, f, default=str)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PEFTOPS_GPU_CONFIGS="1", PEFTOPS_BACKEND="triton")
        print(f"recording launches ({', '.join(methods)}; {args.dtypes}) in the interpreter at GPU configs ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "peftops", "compile-check", "--methods", args.methods,
                        "--dtypes", args.dtypes, "--_record", path], env=env, check=True)
        with open(path) as f:
            recs = json.load(f)
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules and any(m.startswith("peftops.kernels") for m in sys.modules):
        raise SystemExit("compile-check must start in a process that has not loaded the kernels interpreted")
    print(f"compiling {len(recs)} kernel variants for sm_{args.arch} with {args.jobs} processes ...", flush=True)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(compile_one, r, args.arch) for r in recs]
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            res = fut.result()
            status = f"ok  shared={res['shared']}B" if res["ok"] else "FAIL"
            print(f"[{i}/{len(recs)}] {status} {res['seconds']:.0f}s  {_describe(res)}", flush=True)
            if not res["ok"]:
                failures += 1
                print("    " + res["error"].replace("\n", "\n    "), flush=True)
    print(f"\ncompile-check: {len(recs) - failures}/{len(recs)} variants compile for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
