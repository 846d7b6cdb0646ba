"""``python -m peftops.benchmarks.check_session OUT_DIR``: what ``bench/gpu_session.sh`` left in
``$OUT`` holds up (CI runs it after ``--rehearse``; after a real run it says what came back).

Checks, each printed ``ok`` / ``FAIL``:

* the device tool's limits: at most 8 files, each under 16 MiB, none deeper than 2 folders;
  ``summary.json``, ``report.md``, ``session.tar.gz`` (readable, with the stage logs) and one
  results JSON among them;
* every record's schema: ``op, shape, dtype, provider``, ``device, torch, triton, commit``, and
  a positive ``median_ms`` or a ``skipped`` reason (an ``error`` fails, unless
  ``--allow-errors``: a real run may meet an OOM);
* a record for every bench case and provider the session's mode builds (``load_cases`` over
  ``METHODS``; in a rehearsal ``smallest_cases`` of the small shapes, as ``bench --smallest``), and cases (not only a "not available here" record)
  for LoRA, IA3, adapter, fusion, prefix attention, UniPELT and e2e, with ``peftops`` timed in
  each; the device floors (``floor.hbm_copy``, ``floor.gemm``) timed;
* ``summary.json``: the test stage ran tests, all passed (no failures, no errors), every stage
  done (``--partial``: a stage cut by its budget is reported, not failed);
* ``python -m peftops bench --check FILE`` prints its tables (exit status a bar mask, 0-7) and
  ``python -m peftops report FILE`` writes its block from the file.

Exit status 0 when every check holds, 1 otherwise. No GPU needed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

from .session import ARCHIVE, MAX_FILES, REPORT, SUMMARY

MAX_DEPTH = 2  # folders below $OUT
REQUIRED = ("lora", "ia3", "adapter", "fusion", "prefix_attention", "unipelt", "e2e")
FLOOR_OPS = ("floor.hbm_copy", "floor.gemm")
SCHEMA = ("op", "shape", "dtype", "provider", "device", "torch", "triton", "commit")
PER_FILE = 16 * 2**20


class Checks:
    def __init__(self, out=sys.stdout):
        self.failed: list[str] = []
        self.out = out

    def __call__(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"{'ok  ' if ok else 'FAIL'}  {what}" + (f": {detail}" if detail else ""), file=self.out)
        if not ok:
            self.failed.append(what)
        return ok


def files_under(out_dir: str) -> list[tuple[str, int, int]]:
    """(relative path, size, folders deep) of every file under ``out_dir``."""
    found = []
    for root, _dirs, files in os.walk(out_dir):
        rel = os.path.relpath(root, out_dir)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for f in files:
            path = os.path.join(root, f)
            found.append((os.path.normpath(os.path.join(rel, f)), os.path.getsize(path), depth))
    return sorted(found)


def record_problem(r: dict, allow_errors: bool) -> str | None:
    missing = [k for k in SCHEMA if k not in r]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(r["shape"], dict):
        return "shape is not an object"
    ms = r.get("median_ms")
    if ms is not None and not (isinstance(ms, (int, float)) and ms > 0):
        return f"median_ms {ms!r}"
    if ms is None and not r.get("skipped"):
        if r.get("error"):
            return None if allow_errors else f"error: {r['error'][:160]}"
        return "neither median_ms nor a skipped reason"
    return None


def expected_pairs(records: list[dict], small: bool) -> tuple[dict, dict]:
    """(op, shape, dtype, provider) -> method for every case the session's mode builds, and the
    methods that could not build here (method -> reason)."""
    import torch

    from . import METHODS
    from .core import record_key
    from .run import load_cases, smallest_cases

    dtypes = {r["dtype"] for r in records if r.get("dtype")}
    dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.bfloat16
    unavailable: list = []
    cases = load_cases(list(METHODS), torch.device("cpu"), dtype, small, unavailable)
    if small:  # the rehearsal: bench --smallest
        cases = smallest_cases(cases)
    want = {record_key({"op": c.op, "shape": c.shape, "dtype": str(c.dtype).replace("torch.", ""), "provider": p}):
            c.method for c in cases for p in c.providers}
    return want, dict(unavailable)


def check_dir(out_dir: str, *, allow_errors: bool = False, partial: bool = False, out=sys.stdout) -> int:
    from . import check, report
    from .core import record_key

    ok = Checks(out)
    files = files_under(out_dir)
    ok(len(files) <= MAX_FILES, f"at most {MAX_FILES} files in {out_dir}", f"{len(files)}: {[f for f, _, _ in files]}")
    big = [f"{f} ({s} B)" for f, s, _ in files if s >= PER_FILE]
    ok(not big, "every file under 16 MiB", ", ".join(big))
    deep = [f for f, _, d in files if d > MAX_DEPTH]
    ok(not deep, f"no file deeper than {MAX_DEPTH} folders", ", ".join(deep))
    names = {f for f, _, _ in files}
    for need in (SUMMARY, REPORT, ARCHIVE):
        ok(need in names, f"{need} present")
    results = sorted(f for f in names if f.endswith(".json") and f != SUMMARY)
    if not ok(len(results) == 1, "one results JSON", ", ".join(results) or "none"):
        return _verdict(ok, out)
    path = os.path.join(out_dir, results[0])

    summary: dict = {}
    if SUMMARY in names:
        with open(os.path.join(out_dir, SUMMARY)) as f:
            summary = json.load(f)
    if ARCHIVE in names:
        try:
            with tarfile.open(os.path.join(out_dir, ARCHIVE)) as tar:
                members = tar.getnames()
            ok(any(m.endswith(".log") for m in members) and "stages.tsv" in members,
               f"{ARCHIVE} holds the logs and stages.tsv", ", ".join(members))
        except (tarfile.TarError, OSError) as exc:
            ok(False, f"{ARCHIVE} readable", str(exc))
    rehearsal = summary.get("mode") == "rehearse"
    ok(bool(summary.get("mode")), "summary.json names its mode", str(summary.get("mode")))

    with open(path) as f:
        records = json.load(f)
    bad = [(r.get("op"), r.get("shape"), r.get("provider"), why) for r in records
           if (why := record_problem(r, allow_errors))]
    ok(not bad, f"every record of {results[0]} has op/shape/dtype/provider/device/torch/triton/commit and a time "
                f"or a skip reason", f"{len(bad)} bad, e.g. {bad[:5]}")
    ok(isinstance(records, list) and records and all(r.get("device") == ("cpu" if rehearsal else "cuda")
                                                     for r in records),
       f"every record on device {'cpu' if rehearsal else 'cuda'}")

    have = {record_key(r) for r in records}
    want, unavailable = expected_pairs(records, small=rehearsal)
    # a method the session's machine could not run (its "*" record) owes no cases, even where
    # this machine could build them (bitsandbytes here, not on the GPU image)
    star = {r["op"] for r in records if r.get("provider") == "*"}
    missing = sorted(k for k, m in want.items() if k not in have and m not in star)
    ok(not missing or partial, "a record for every bench case and provider",
       f"{len(missing)} missing, e.g. {missing[:4]}" if missing else f"{len(want)} (case, provider) pairs")
    ok(set(unavailable) <= star, "a skipped record for every method not available here",
       ", ".join(f"{m}: {why[:80]}" for m, why in unavailable.items()) or "none")
    methods = {r.get("method") for r in records if r.get("provider") != "*"}
    timed_peftops = {r.get("method") for r in records if r.get("provider") == "peftops" and r.get("median_ms")}
    for m in REQUIRED:
        ok(m in methods and m in timed_peftops, f"{m}: cases recorded, peftops timed")
    for op in FLOOR_OPS:
        ok(any(r["op"] == op and r.get("median_ms") for r in records), f"device floor {op} timed")

    tests = summary.get("tests", {})
    ok(tests.get("passed", 0) > 0 and not tests.get("failures") and not tests.get("errors")
       and not tests.get("failed_ids"), "test stage: tests passed, none failed",
       f"passed {tests.get('passed')}, failures {tests.get('failures')}, errors {tests.get('errors')}, "
       f"failed {tests.get('failed_ids', [])[:5]}" + (f" ({tests['error']})" if "error" in tests else ""))
    stages = {s["stage"]: s for s in summary.get("stages", [])}
    for name in ("setup", "tests", "bench", "e2e", "facts", "check"):
        s = stages.get(name)
        done = bool(s) and s["status"] == "done" and (name == "check" or s["rc"] == "0")
        ok(done or (partial and bool(s)), f"stage {name} done",
           f"{s['status']} rc={s['rc']} {s['seconds']}s of {s['budget']}s" if s else "not run")
    ok("kernel_facts" in summary, "kernel facts summarised", json.dumps(summary.get("kernel_facts"))[:200])

    buf = io.StringIO()
    try:
        code = check.check([path], out=buf)
        text = buf.getvalue()
        ok(0 <= code <= 7 and "Bars (bench/targets.toml)" in text and "Every case:" in text
           and "floors: HBM" in text, "`bench --check` prints its tables", f"exit {code}")
    except Exception as exc:  # noqa: BLE001 -- reported as a failed check
        ok(False, "`bench --check` prints its tables", f"{type(exc).__name__}: {exc}")
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            readme = os.path.join(tmp, "README.md")
            with open(readme, "w") as f:
                f.write(f"x\n{report.BEGIN}\n{report.END}\n")
            report.main([path], readme=readme)
            with open(readme) as f:
                block = f.read()
        ok(results[0] in block and "| op | shape | peftops |" in block, "`report` writes its block from the file")
    except Exception as exc:  # noqa: BLE001
        ok(False, "`report` writes its block from the file", f"{type(exc).__name__}: {exc}")
    return _verdict(ok, out)


def _verdict(ok: Checks, out) -> int:
    print(f"\ncheck_session: {'all checks hold' if not ok.failed else f'{len(ok.failed)} FAILED: ' + '; '.join(ok.failed)}",
          file=out)
    return 1 if ok.failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftops.benchmarks.check_session", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--allow-errors", action="store_true", help="provider errors (OOM ...) do not fail")
    ap.add_argument("--partial", action="store_true", help="stages cut by their budget / missing pairs do not fail")
    args = ap.parse_args(argv)
    return check_dir(args.out_dir, allow_errors=args.allow_errors, partial=args.partial)


if __name__ == "__main__":
    sys.exit(main())
