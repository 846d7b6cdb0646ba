"""What ``bench/gpu_session.sh`` leaves in ``$OUT``: at most 8 files, each under 16 MiB, none
in a folder (what the device tool returns), written from the session's scratch directory.

    python -m peftops.benchmarks.session finish    (environment: OUT, WORK, RESULTS, START, MODE,
                                                    TOTAL_S, LIMIT_BYTES, BUDGETS; the script calls it)

* ``session.tar.gz``: every file of the scratch directory's top level (the stage logs,
  ``tests.xml``, ``kernel_facts.json``, ``stages.tsv``, ``gpu.txt``); when the archive would
  pass ``LIMIT_BYTES``, the largest logs are cut to their head and tail (``trim_text``) until
  it fits, each named in ``summary.json`` ``trimmed``;
* ``summary.json``: ``summary(...)``;
* the results JSON, if over the limit, has its records' ``error`` texts shortened (noted too).

Both are written under a temporary name and renamed, so a session killed while writing leaves
the previous complete pair. ``check_session`` reads them back.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
import time

MAX_FILES = 8
LIMIT_BYTES = 15 * 2**20  # each file in $OUT under this (the device tool's cap is 16 MiB)
ARCHIVE = "session.tar.gz"
SUMMARY = "summary.json"
REPORT = "report.md"
ARCHIVED = ("gpu.txt", "stages.tsv", "tests.xml", "kernel_facts.json")  # besides every *.log


def trim_text(data: bytes, keep: int) -> bytes:
    """``data`` cut to its first and last ``keep // 2`` bytes with a line saying so."""
    if len(data) <= keep:
        return data
    half = keep // 2
    note = f"\n\n[... {len(data) - 2 * half} bytes cut by bench/gpu_session.sh: over the size limit ...]\n\n"
    return data[:half] + note.encode() + data[-half:]


def _archive(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_archive(work: str, limit: int = LIMIT_BYTES) -> tuple[bytes, list[str], list[str]]:
    """(archive bytes, archived names, trimmed notes) of the scratch directory's files."""
    files = {}
    for name in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        path = os.path.join(work, name)
        if os.path.isfile(path) and (name.endswith(".log") or name in ARCHIVED):
            with open(path, "rb") as f:
                files[name] = f.read()
    trimmed: list[str] = []
    data = _archive(files)
    while len(data) > limit:
        name = max(files, key=lambda n: len(files[n]))
        size = len(files[name])
        if size < 64 * 1024:
            break
        files[name] = trim_text(files[name], size // 4)
        trimmed.append(f"{ARCHIVE}:{name}: {size} -> {len(files[name])} bytes (head and tail kept)")
        data = _archive(files)
    return data, sorted(files), trimmed


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def tests_summary(xml_path: str) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    t = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    t["passed"] = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
    t["failed_ids"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:300]
    return t


def results_summary(path: str) -> dict:
    try:
        with open(path) as f:
            recs = json.load(f)
    except (OSError, ValueError) as exc:
        return {"file": os.path.basename(path), "error": f"{type(exc).__name__}: {exc}"}
    from .check import floors

    fl = floors(recs)
    return {"file": os.path.basename(path), "records": len(recs),
            "timed": sum(1 for r in recs if r.get("median_ms")),
            "skipped": sum(1 for r in recs if r.get("skipped")),
            "skip_reasons": sorted({r["skipped"][:160] for r in recs if r.get("skipped")})[:40],
            "methods": sorted({r.get("method") or r["op"] for r in recs}),
            "devices": sorted({str(r.get("device")) for r in recs}),
            "floors": {k: fl[k] for k in ("hbm_bytes_per_s", "gemm_flops_per_s", "source")},
            "errors": [f"{r['op']} {r['shape']} {r['provider']}: {r['error'][:200]}" for r in recs if r.get("error")]}


def shrink_results(path: str, limit: int) -> list[str]:
    """Shorten the records' ``error`` texts if the results file would pass the limit."""
    if not os.path.exists(path) or os.path.getsize(path) <= limit:
        return []
    size = os.path.getsize(path)
    with open(path) as f:
        recs = json.load(f)
    for r in recs:
        if r.get("error"):
            r["error"] = r["error"][:200]
    _write(path, (json.dumps(recs, indent=1) + "\n").encode())
    return [f"{os.path.basename(path)}: error texts cut to 200 characters ({size} -> {os.path.getsize(path)} bytes)"]


def summary(out: str, work: str, results: str | None, start: int, mode: str, total_s: int,
            archived: list[str], trimmed: list[str]) -> dict:
    s: dict = {"mode": mode, "seconds": int(time.time()) - start, "cap_s": total_s, "out": out, "stages": []}
    try:
        with open(os.path.join(work, "stages.tsv")) as f:
            s["stages"] = list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        pass
    try:
        with open(os.path.join(work, "gpu.txt")) as f:
            s["gpu"] = f.read().strip().splitlines()
    except OSError:
        pass
    s["tests"] = tests_summary(os.path.join(work, "tests.xml"))
    if results and os.path.exists(results):
        s["results"] = results_summary(results)
    try:
        with open(os.path.join(work, "kernel_facts.json")) as f:
            facts = json.load(f)
        s["kernel_facts"] = {**facts["summary"], "source": facts.get("source", "triton cache")}
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(work, "check.log")) as f:
            lines = f.read().splitlines()
        s["check"] = [line for line in lines if line.startswith(("floors:", "RULE:", "BARS:", "exit "))]
    except OSError:
        pass
    s["archive"] = {"file": ARCHIVE, "members": archived}
    s["trimmed"] = trimmed
    return s


def finish(env=os.environ) -> int:
    out, work = env["OUT"], env["WORK"]
    limit = int(env.get("LIMIT_BYTES") or LIMIT_BYTES)
    results = env.get("RESULTS") or None
    trimmed = shrink_results(results, limit) if results else []
    data, archived, cut = build_archive(work, limit)
    trimmed += cut
    _write(os.path.join(out, ARCHIVE), data)
    s = summary(out, work, results, int(env.get("START") or time.time()), env.get("MODE", "gpu"),
                int(env.get("TOTAL_S") or 0), archived, trimmed)
    s["default_budgets_s"] = {k: int(v) for k, _, v in (x.partition("=") for x in env.get("BUDGETS", "").split())
                              if v.isdigit()}
    s["files"] = sorted(os.listdir(out)) + ([] if SUMMARY in os.listdir(out) else [SUMMARY])
    _write(os.path.join(out, SUMMARY), (json.dumps(s, indent=1, default=str) + "\n").encode())
    brief = {k: s[k] for k in ("mode", "seconds", "tests", "results", "kernel_facts", "check", "trimmed") if k in s}
    print("summary.json:", json.dumps(brief, default=str)[:3000])
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["finish"]:
        raise SystemExit(__doc__)
    sys.exit(finish())
