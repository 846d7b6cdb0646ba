"""Command line: ``python -m peftops {demo,bench,report,paths,compile-check}``.

Without a GPU, the Triton kernels run in Triton's CPU interpreter; the interpreter must
be switched on before triton is imported, so the CLI re-executes itself with
``TRITON_INTERPRET=1`` when it is missing. ``bench --check`` and ``report`` only read
results files and run no kernel; ``paths`` reads one too.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ensure_interpreter(argv: list[str]) -> None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("PEFTOPS_BACKEND", "triton")
    os.execve(sys.executable, [sys.executable, "-m", "peftops", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compile-check"]:
        from . import compile_check

        return compile_check.main(argv[1:])
    from .benchmarks import METHODS

    parser = argparse.ArgumentParser(prog="python -m peftops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("demo", "the main job: fused vs eager on the default shapes, then the tiny-Llama side-by-side"),
                       ("bench", "kernel benchmarks (GPU) or a parity pass (no GPU); --check: a results file "
                                 "against bench/targets.toml")):
        p = sub.add_parser(name, help=text, description=text)
        # demo runs the tiny Llama itself and has no use for the device floors; adapterhub needs its own
        # environment (benchmarks/adapterhub.py)
        default = [m for m in METHODS if name == "bench" or m not in ("e2e", "floors", "adapterhub")]
        p.add_argument("--methods", default=",".join(default), help=f"comma-separated, from {sorted(METHODS)}")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype for GPU timing (default bf16)")
        p.add_argument("--small", action="store_true", help="small shapes on a GPU too")
        p.add_argument("--out", default="bench/results",
                       help="directory for the JSON results, merged into <gpu>-<yyyymmdd>.json there, or a .json "
                            "path ('' to skip)")
        if name == "bench":
            p.add_argument("--budget-s", type=float, default=None,
                           help="start no provider after this many seconds (compiling providers run last)")
            p.add_argument("--skip-providers", default="", help="comma-separated provider names not to time")
            p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                           help="time on this device (default: cuda when there is one, else a parity pass); "
                                "cpu = the rehearsal of bench/gpu_session.sh: the same timing loop and records, "
                                "Triton's interpreter, time.perf_counter medians, CUDA-only providers skipped")
            p.add_argument("--smallest", action="store_true",
                           help="with --small: only the smallest shape of each case (the rehearsal's set)")
            p.add_argument("--resume", action="store_true",
                           help="skip (case, provider) pairs the --out file already has a time for")
            p.add_argument("--check", nargs="+", metavar="FILE",
                           help="run nothing: check results file(s) against the targets; exit status 1 = a case "
                                "slower than the best of eager / compile / peft, 2 = a bar missed, 4 = a bar not "
                                "measured (or-ed)")
            p.add_argument("--targets", default=None, help="targets file (default bench/targets.toml)")
    p = sub.add_parser("report", help="README performance table and PNG chart from a results file",
                       description="Write the README's performance table (between <!-- perf:begin --> and "
                                   "<!-- perf:end -->) and a PNG chart from a results file.")
    p.add_argument("file", nargs="+", help="results JSON file(s) (later ones override same case + provider)")
    p.add_argument("--readme", default=None, help="README to rewrite between the markers (else: print the markdown)")
    p.add_argument("--png", default=None, help="write the chart here")
    p.add_argument("--targets", default=None, help="targets file (default bench/targets.toml)")
    p = sub.add_parser("paths", help="which implementation path / knob a results file says wins, per PATHS row",
                       description="From a results file: the fastest peftops[<path>] per op and shape, and for "
                                   "every PATHS row and kernel knob whether the file confirms it, contradicts it "
                                   "or leaves it unmeasured, with the row to write.")
    p.add_argument("file", nargs="+", help="results JSON file(s) (later ones override same case + provider)")
    args = parser.parse_args(argv)
    if args.cmd == "paths":
        from .benchmarks import paths

        return paths.main(args.file)
    if args.cmd == "report":
        from .benchmarks import report

        return report.main(args.file, readme=args.readme, png=args.png, targets=args.targets)
    if args.cmd == "bench" and args.check:
        from .benchmarks import check

        return check.check(args.check, args.targets)
    _ensure_interpreter(argv)
    os.environ.setdefault("PEFTOPS_BACKEND", "auto")

    from .benchmarks import run

    methods = [m for m in args.methods.split(",") if m]
    want = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else None)
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench --device cuda: no CUDA device here")
    if want:
        device = torch.device(want)
        where = torch.cuda.get_device_name() if want == "cuda" else "CPU (rehearsal: Triton interpreter, perf_counter)"
        print(f"{'GPU' if want == 'cuda' else 'device'}: {where} -- timing {', '.join(methods)} in {args.dtype}")
        unavailable: list = []
        cases = run.load_cases(methods, device, DTYPES[args.dtype], args.small or args.smallest, unavailable)
        if getattr(args, "smallest", False):
            cases = run.smallest_cases(cases)
        run.run_timing(cases, device, args.out or None, budget_s=getattr(args, "budget_s", None),
                       skip=tuple(p for p in getattr(args, "skip_providers", "").split(",") if p),
                       resume=getattr(args, "resume", False),
                       extra=run.skip_records(unavailable, DTYPES[args.dtype], device))
        ok = True
    else:
        print("No GPU found: running a parity pass instead of timing (Triton kernels in the CPU "
              "interpreter, small shapes, fp32). Speed is measured on a GPU only.")
        ok = run.run_parity(run.load_cases(methods, torch.device("cpu"), torch.float32, small=True))
    if args.cmd == "demo":
        ok &= _tiny_model_demo()
    return 0 if ok else 1


def _tiny_model_demo() -> bool:
    """peft vs peft + peftops.accelerate on a tiny Llama (parity; step time and memory on a GPU)."""
    from .benchmarks.core import table
    from .benchmarks.run import PARITY_BOUND
    from .integrations import demo

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("\ntiny Llama: peft vs peft + peftops.accelerate")
    rows = demo.run(device)
    for r in rows:
        if "max_rel_err" in r:
            r["status"] = "ok" if r["max_rel_err"] <= PARITY_BOUND else "FAIL"  # NaN fails
    print(table(rows, [(k, k) for k in dict.fromkeys(k for r in rows for k in r)]))
    return all(r.get("status", "ok") == "ok" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
