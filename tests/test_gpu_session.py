"""bench/gpu_session.sh's machinery without running it (the rehearsal itself is a .ci/run step):
the files it leaves in $OUT (limits, trimming), the session checker on good and broken
directories, the CPU timing path, skipped records, and the measured floors in --check / report.
CPU only, a few seconds."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import types

import pytest
import torch

from peftops.benchmarks import check, check_session, core, report, run, session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")
TARGETS = os.path.join(ROOT, "bench", "targets.toml")
BASELINE = os.path.join(ROOT, "bench", "results", "nvidia-h100-80gb-hbm3-20261123.json")
ENV = {"device": "cpu", "gpu_name": None, "torch": "2.x", "triton": "3.x", "commit": "abc1234"}


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.fixture(scope="module")
def small_records():
    """A record for every (case, provider) the rehearsal builds, as the CPU bench would write them."""
    cases = run.smallest_cases(run.load_cases(list(run.METHODS), torch.device("cpu"), torch.bfloat16, small=True))
    recs = []
    for c in cases:
        for p in c.providers:
            r = {"op": c.op, "shape": c.shape, "dtype": "bfloat16", "provider": p, "method": c.method, **ENV}
            if core.is_late(p):
                r.update(median_ms=None, skipped=core.CPU_COMPILE_SKIP)
            else:
                r.update(median_ms=1.0 + len(recs) % 7, bytes=1e6, flops=1e9)
                r["gb_per_s"], r["tflops"] = r["bytes"] / r["median_ms"] / 1e6, r["flops"] / r["median_ms"] / 1e9
            recs.append(r)
    return recs


def _session(tmp_path, records, *, tests_xml=None, stages=None, extra_files=()):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    results = out / "cpu-rehearsal-20261201.json"
    results.write_text(json.dumps(records))
    (work / "bench.log").write_text("bench log\n")
    (work / "gpu.txt").write_text("rehearsal\n")
    (work / "tests.xml").write_text(tests_xml or '<testsuites><testsuite tests="3" failures="0" errors="0" '
                                    'skipped="0"><testcase classname="t" name="a"/></testsuite></testsuites>')
    (work / "kernel_facts.json").write_text(json.dumps({"source": "x", "summary": {"variants": 1}, "kernels": []}))
    rows = stages or [(s, "done", "0") for s in ("setup", "tests", "bench", "e2e", "facts")] + [("check", "done", "7")]
    (work / "stages.tsv").write_text("stage\tstatus\trc\tseconds\tbudget\n"
                                     + "".join(f"{s}\t{st}\t{rc}\t1\t10\n" for s, st, rc in rows))
    (out / "report.md").write_text("report\n")
    for name in extra_files:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    env = {"OUT": str(out), "WORK": str(work), "RESULTS": str(results), "START": "0", "MODE": "rehearse",
           "TOTAL_S": "540"}
    assert session.finish(env) == 0
    return out


def _timed(recs) -> int:
    return next(i for i, r in enumerate(recs) if r["provider"] == "eager" and r["median_ms"])


def _check(out, **kw) -> tuple[int, str]:
    buf = io.StringIO()
    code = check_session.check_dir(str(out), out=buf, **kw)
    return code, buf.getvalue()


def test_checker_passes_a_complete_rehearsal(tmp_path, small_records):
    out = _session(tmp_path, small_records)
    assert sorted(os.listdir(out)) == ["cpu-rehearsal-20261201.json", "report.md", "session.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["passed"] == 3 and summary["mode"] == "rehearse" and summary["trimmed"] == []
    assert summary["results"]["floors"]["source"] == "measured"
    with tarfile.open(out / "session.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["bench.log", "gpu.txt", "kernel_facts.json", "stages.tsv", "tests.xml"]
    code, text = _check(out)
    assert code == 0, text
    assert "FAIL" not in text and "ok    lora: cases recorded, peftops timed" in text


@pytest.mark.parametrize("broken, expect", [
    ("nine_files", "at most 8 files"),
    ("too_deep", "no file deeper than 2 folders"),
    ("missing_pair", "a record for every bench case and provider"),
    ("error_record", "a time or a skip reason"),
    ("failed_test", "test stage: tests passed, none failed"),
    ("cut_stage", "stage bench done"),
    ("no_e2e", "e2e: cases recorded, peftops timed"),
])
def test_checker_fails_what_a_broken_session_leaves(tmp_path, small_records, broken, expect):
    recs = [dict(r) for r in small_records]
    kw: dict = {}
    if broken == "nine_files":
        kw["extra_files"] = [f"extra{i}.txt" for i in range(5)]
    elif broken == "too_deep":
        kw["extra_files"] = ["a/b/c/deep.txt"]
    elif broken == "missing_pair":
        recs = [r for r in recs if not (r["op"] == "lora.fwd" and r["provider"] == "peft")]
    elif broken == "error_record":
        recs[_timed(recs)].update(median_ms=None, error="RuntimeError: CUDA-only path")
    elif broken == "failed_test":
        kw["tests_xml"] = ('<testsuite tests="2" failures="1" errors="0" skipped="0"><testcase classname="t" '
                           'name="a"><failure/></testcase></testsuite>')
    elif broken == "cut_stage":
        kw["stages"] = [("setup", "done", "0"), ("tests", "done", "0"), ("bench", "timed out", "124"),
                        ("e2e", "done", "0"), ("facts", "done", "0"), ("check", "done", "7")]
    elif broken == "no_e2e":
        recs = [r for r in recs if r.get("method") != "e2e"]
    code, text = _check(_session(tmp_path, recs, **kw))
    assert code == 1 and any(line.startswith("FAIL") and expect in line for line in text.splitlines()), text


def test_a_method_skipped_on_the_session_machine_owes_no_cases(tmp_path, small_records):
    """The GPU image lacks a library this machine has: that method's "*" record stands for its cases."""
    recs = [r for r in small_records if r.get("method") != "fusion"]
    recs.append({"op": "fusion", "method": "fusion", "shape": {}, "dtype": "bfloat16", "provider": "*",
                 "median_ms": None, "skipped": "missing dependency: ModuleNotFoundError: x", **ENV})
    code, text = _check(_session(tmp_path, recs))
    assert "ok    a record for every bench case and provider" in text
    assert "FAIL  fusion: cases recorded, peftops timed" in text and code == 1  # fusion is one of the required


def test_the_script_leaves_its_files_when_out_of_time(tmp_path):
    """TOTAL_S=1: setup runs, every stage is skipped for want of time; the EXIT trap still writes
    summary.json and the archive (and nothing else) into $OUT."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TOTAL_S", "RESUME_FROM")}
    env.update(OUT=str(out), TOTAL_S="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ["session.tar.gz", "summary.json"], proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"setup": "done", **{s: "skipped (no time left)" for s in ("tests", "bench", "e2e", "facts",
                                                                                  "check")}}
    assert summary["mode"] == "rehearse" and "error" in summary["tests"] and summary["cap_s"] == 1
    assert summary["default_budgets_s"] == {"tests": 100, "bench": 260, "e2e": 60, "facts": 15, "check": 25}
    with tarfile.open(out / "session.tar.gz") as tar:
        assert {"gpu.txt", "stages.tsv"} <= set(tar.getnames())
    assert "default budgets: setup ~20s, tests 100s, bench 260s" in proc.stdout


def test_checker_options_for_a_real_run(tmp_path, small_records):
    recs = [dict(r) for r in small_records]
    recs[_timed(recs)].update(median_ms=None, error="OutOfMemoryError: CUDA out of memory")
    code, text = _check(_session(tmp_path, recs), allow_errors=True)
    assert code == 0, text


def test_archive_trimmed_to_the_limit(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tests.log").write_bytes(os.urandom(3 * 2**20))  # incompressible
    (work / "bench.log").write_text("short\n")
    data, names, trimmed = session.build_archive(str(work), limit=2**20)
    assert len(data) <= 2**20 and names == ["bench.log", "tests.log"]
    assert trimmed and all(t.startswith("session.tar.gz:tests.log: 3145728 -> ") for t in trimmed)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        text = tar.extractfile("tests.log").read()
        assert b"bytes cut by bench/gpu_session.sh" in text and tar.extractfile("bench.log").read() == b"short\n"


def test_cpu_timing_path():
    calls = []
    stats = core.time_fn(lambda: calls.append(1), torch.device("cpu"), rep_ms=1e6)
    assert len(calls) == core.CPU_MAX_CALLS == stats["calls"]
    assert stats["median_ms"] > 0 and stats["p20"] <= stats["median_ms"] <= stats["p80"]
    assert stats["peak_mem_bytes"] is None
    one = core.time_cpu(lambda: calls.append(1), rep_ms=0.0, iters=4)
    assert one["calls"] == 1  # a call longer than the window: timed once


def test_run_timing_on_cpu_records_skips_errors_and_dispatch(tmp_path, monkeypatch):
    from peftops._dispatch import _bump

    def ok():
        def call():
            _bump("fakeop.path:kernel")
            _bump("fakeop.row:0")
        return call

    def missing():
        raise ModuleNotFoundError("No module named 'adapters'")

    def broken():
        raise RuntimeError("a CUDA-only path")

    case = core.Case("fake.fwd", {"T": 4}, torch.float32,
                     {"peftops": ok, "compile": ok, "ahub": missing, "bad": broken, "gpu": ok}, bytes=8.0,
                     cuda_only={"gpu": "needs cuBLAS"}, method="fake")
    monkeypatch.setitem(sys.modules, "fake_unavailable", types.SimpleNamespace(
        cases=lambda *a: (_ for _ in ()).throw(ImportError("No module named 'bitsandbytes'"))))
    monkeypatch.setitem(run.METHODS, "qfake", "fake_unavailable")
    unavailable: list = []
    assert run.load_cases(["qfake"], torch.device("cpu"), torch.float32, True, unavailable) == []
    assert unavailable and "bitsandbytes" in unavailable[0][1]
    path = str(tmp_path / "r.json")
    run.run_timing([case], torch.device("cpu"), path,
                   extra=run.skip_records(unavailable, torch.float32, torch.device("cpu")))
    recs = {r["provider"]: r for r in core.load_records(path)}
    assert set(recs) == {"*", "peftops", "compile", "ahub", "bad", "gpu"}
    assert recs["*"]["op"] == "qfake" and "bitsandbytes" in recs["*"]["skipped"]
    assert recs["peftops"]["median_ms"] > 0 and recs["peftops"]["device"] == "cpu"
    assert recs["peftops"]["dispatch"] == {"fakeop.path:kernel": recs["peftops"]["calls"],
                                           "fakeop.row:0": recs["peftops"]["calls"]}
    assert recs["compile"]["skipped"] == core.CPU_COMPILE_SKIP and recs["compile"]["median_ms"] is None
    assert recs["gpu"]["skipped"] == "needs cuBLAS"
    assert recs["ahub"]["skipped"].startswith("missing dependency: ModuleNotFoundError")
    assert recs["bad"]["error"] == "RuntimeError: a CUDA-only path" and "skipped" not in recs["bad"]
    assert all(check_session.record_problem(r, False) is None for p, r in recs.items() if p != "bad")
    assert check_session.record_problem(recs["bad"], False).startswith("error")


# ------------------------------------------------------------------ measured floors

def _targets(tmp_path):
    t = tmp_path / "t.toml"
    t.write_text('[rule]\nrivals = ["eager"]\n\n[floor]\nhbm_bytes_per_s = 3.0e12\n\n'
                 '[[target]]\nop = "ad"\nshape = { d = 8 }\ndenominator = "hbm_floor"\nbar = ">="\nmust = 0.85\n\n'
                 '[[target]]\nop = "mm"\nshape = { d = 8 }\ndenominator = "gemm_floor"\nbar = ">="\nmust = 0.8\n')
    return str(t)


def _rec(op, provider, ms, **extra):
    return {"op": op, "shape": {"d": 8}, "dtype": "bfloat16", "provider": provider, "median_ms": ms, **extra}


def test_floors_measured_in_the_file_replace_the_nominal_constant(tmp_path):
    targets = check.load_targets(_targets(tmp_path))
    cases = [_rec("ad", "peftops", 1.0, bytes=3.87e9), _rec("mm", "peftops", 2.0, flops=1.264e12)]
    nominal = check.floors(cases, targets)
    assert nominal["hbm_bytes_per_s"] == 3.0e12 and nominal["source"] == "nominal"
    assert "NOMINAL" in nominal["hbm_label"] and nominal["gemm_flops_per_s"] is None
    (ad, mm) = check.bar_rows(check.group(cases), targets)
    assert ad.den_value == pytest.approx(1.29) and ad.status == "met"  # 3.87 GB / 3 TB/s = 1.29 ms
    assert mm.status == "not measured" and mm.reason == "no gemm_floor"
    # the same case with the device's own floors: a 2 GiB copy at 4.3 TB/s, a GEMM at 790 TFLOP/s
    measured = cases + [
        {"op": "floor.hbm_copy", "shape": {"MiB": 2048}, "dtype": "bfloat16", "provider": "torch",
         "median_ms": 0.999, "gb_per_s": 4300.0, "gpu_name": "NVIDIA H200"},
        {"op": "floor.gemm", "shape": {"M": 8192, "N": 4096, "K": 4096}, "dtype": "bfloat16", "provider": "torch",
         "median_ms": 0.35, "tflops": 790.0},
        {"op": "floor.gemm", "shape": {"M": 8192, "N": 11008, "K": 4096}, "dtype": "bfloat16", "provider": "torch",
         "median_ms": 1.0, "tflops": 700.0}]
    fl = check.floors(measured, targets)
    assert fl["hbm_bytes_per_s"] == pytest.approx(4.3e12) and fl["gemm_flops_per_s"] == pytest.approx(7.9e14)
    assert fl["source"] == "measured" and "4.3 TB/s measured (floor.hbm_copy MiB=2048, NVIDIA H200)" in fl["hbm_label"]
    (ad, mm) = check.bar_rows(check.group(measured), targets)
    assert ad.den_value == pytest.approx(0.9) and ad.ratio == pytest.approx(0.9) and ad.status == "met"
    assert mm.den_value == pytest.approx(1.6) and mm.ratio == pytest.approx(0.8) and mm.status == "met"
    assert check.fmt_ratio(ad.target, ad.ratio) == "90% of HBM floor"
    assert check.fmt_ratio(mm.target, mm.ratio) == "80% of GEMM floor"
    slower = [dict(r) for r in measured]
    slower[0]["median_ms"] = 1.2  # 0.9 / 1.2 = 75 % of the measured floor (it would read 108 % of 3 TB/s)
    (ad, _) = check.bar_rows(check.group(slower), targets)
    assert ad.ratio == pytest.approx(0.75) and ad.status == "MISSED"
    # floor records are not cases of the rule
    assert {r.case.op for r in check.rule_rows(check.group(measured), targets)} == {"ad", "mm"}


def test_check_and_report_print_the_floors_they_use(tmp_path):
    buf = io.StringIO()
    check.check([BASELINE], TARGETS, out=buf)
    assert "floors: HBM 3 TB/s NOMINAL (targets [floor]; no floor.hbm_copy record in the file)" in buf.getvalue()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(json.load(open(BASELINE)) + [
        {"op": "floor.hbm_copy", "shape": {"MiB": 2048}, "dtype": "bfloat16", "provider": "torch",
         "median_ms": 1.0, "gb_per_s": 3350.0, "gpu_name": "NVIDIA H100 80GB HBM3"}]))
    bars = check.bar_rows(check.group(check.load_results([str(path)])), check.load_targets(TARGETS))
    (row,) = [b for b in bars if b.op == "bottleneck_adapter_fwd" and b.target["shape"] == {"T": 8192, "d": 4096, "m": 64}]
    assert row.den_value == pytest.approx(0.0671 * 3.0 / 3.35, abs=5e-4)  # the baseline test's 0.0671 ms at 3 TB/s
    block = report.markdown([str(path)], check.load_targets(TARGETS))
    assert "Floors: HBM 3.35 TB/s measured (floor.hbm_copy MiB=2048, NVIDIA H100 80GB HBM3)" in block


def test_kernel_facts_without_a_gpu(tmp_path):
    """The rehearsal's facts: compile-check's JSON when there is one, else the launch record."""
    from peftops.benchmarks import kernel_facts

    cc = tmp_path / "compile_check.json"
    cc.write_text(json.dumps({"variants": [
        {"kernel": "lora_gemm_kernel", "arch": 90, "options": {"num_warps": 8, "num_stages": 3}, "ok": True,
         "regs": 168, "stack": 0, "shared": 98304, "wgmma": True, "dtypes": ["bfloat16"]},
        {"kernel": "adapter_bwd_rows_kernel", "arch": 90, "options": {"num_warps": 4, "num_stages": 2}, "ok": True,
         "regs": 255, "stack": 8, "shared": 1024, "wgmma": False, "dtypes": ["bfloat16"]},
        {"kernel": "x_kernel", "arch": 80, "options": {}, "ok": False, "error": "CompilationError: boom"}]}))
    launches = tmp_path / "launches"
    launches.mkdir()
    (launches / "launches-main.json").write_text(json.dumps([
        {"module": "peftops.kernels.lora", "name": "lora_gemm_kernel", "args": [], "options": {"num_warps": 4},
         "constexprs": {"BLOCK_M": 64, "HAS_BIAS": True}},
        {"module": "peftops.kernels.lora", "name": "lora_gemm_kernel", "args": [["int", 3]],
         "options": {"num_warps": 4}, "constexprs": {"BLOCK_M": 64, "HAS_BIAS": True}}]))
    out = tmp_path / "facts.json"
    assert kernel_facts.main(["--compile-check", str(cc), "--launches", str(launches), "--out", str(out)]) == 0
    facts = json.loads(out.read_text())
    assert facts["source"].startswith("compile-check JSON")
    assert facts["summary"] == {"variants": 3, "kernels": 3, "spilling_variants": 1,
                                "spilling_kernels": ["adapter_bwd_rows_kernel"], "max_regs": 255, "with_wgmma": 1,
                                "compile_errors": 1}
    assert kernel_facts.main(["--compile-check", str(tmp_path / "absent.json"), "--launches", str(launches),
                              "--out", str(out)]) == 0
    facts = json.loads(out.read_text())
    assert facts["source"].startswith("launch record") and facts["summary"]["variants"] == 1  # one (kernel, tiles)
    assert facts["kernels"] == [{"name": "lora_gemm_kernel", "num_warps": 4, "num_stages": None,
                                 "tiles": {"BLOCK_M": 64}}]
