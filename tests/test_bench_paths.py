"""``python -m peftops paths``: PATHS rows and knobs read from synthetic results (confirmed,
contradicted, unmeasured), and the table on the committed H100 baseline. CPU only, seconds."""
from __future__ import annotations

import io
import os

import pytest

from peftops._dispatch import PathTable
from peftops.benchmarks import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "bench", "results", "nvidia-h100-80gb-hbm3-20261123.json")

TABLE = PathTable("fakeop", paths=("kernel", "cublas"), default="kernel", rows=[
    (lambda T, **_: T <= 16, "kernel", "decode: ours"),
    (lambda T, **_: T <= 512, "cublas", "mid: cuBLAS"),
    (lambda T, **_: T > 100000, "kernel", "never reached by the bench"),
    (lambda **_: True, "cublas", "the rest"),
])
KNOBS = {("fake.kernels", "FUSE"): paths.Knob("fake.kernels", "FUSE", True, {"peftops[kernel:no_fuse]": False},
                                             {"fake.fwd"}),
         ("fake.kernels", "SPLIT"): paths.Knob("fake.kernels", "SPLIT", True, {"peftops[kernel:no_split]": False},
                                              {"fake.fwd"})}


def _case(T, times, dispatch=None):
    recs = []
    for provider, ms in times.items():
        r = {"op": "fake.fwd", "shape": {"T": T, "d": 64}, "dtype": "bfloat16", "provider": provider,
             "median_ms": ms, "gpu_name": "NVIDIA H200"}
        if provider == "peftops" and dispatch:
            r["dispatch"] = dispatch
        recs.append(r)
    return recs


def _read(records):
    return paths.read(records, tables={"fakeop": ("fake.ops", TABLE)}, knobs=KNOBS, source="x.json",
                      op_tables={"fake.fwd": "fakeop"})


def test_rows_confirmed_contradicted_unmeasured():
    records = (
        # T = 16 reaches row 0 (kernel): the kernel wins -> confirms; the knob variant is slower -> confirms FUSE
        _case(16, {"peftops": 1.0, "peftops[kernel]": 1.0, "peftops[cublas]": 1.5, "peftops[kernel:no_fuse]": 1.2},
              {"fakeop.path:kernel": 5, "fakeop.row:0": 5})
        # T = 512 reaches row 1 (cublas) but the kernel is 20 % faster -> contradicts; SPLIT off wins -> contradicts
        + _case(512, {"peftops": 2.4, "peftops[kernel]": 2.0, "peftops[cublas]": 2.4, "peftops[kernel:no_split]": 1.5},
                {"fakeop.path:cublas": 5, "fakeop.row:1": 5})
        # T = 8192: no dispatch recorded (an older file): the row is the table's pick for the shape (row 3),
        # cublas within the 3 % tie of the kernel -> confirms
        + _case(8192, {"peftops": 3.0, "peftops[kernel]": 2.95, "peftops[cublas]": 3.0}))
    result = _read(records)
    verdicts = {r["row"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {0: "confirms", 1: "contradicts", 2: "unmeasured", 3: "confirms"}
    row1 = next(r for r in result["rows"] if r["row"] == 1)
    assert row1["write"].startswith("(lambda T, **_: T <= 512, 'kernel', \"NVIDIA H200 (x.json): fake.fwd T=512 d=64: "
                                    "kernel 2.000 ms, cublas 2.400 ms")
    assert next(r for r in result["rows"] if r["row"] == 2)["write"].startswith("keep")
    cases = {c["shape"]: c for c in result["cases"]}
    assert cases["T=512 d=64"]["fastest"] == "kernel" and cases["T=512 d=64"]["margin"] == pytest.approx(1.2)
    assert cases["T=512 d=64"]["shipped_path"] == "cublas" and cases["T=512 d=64"]["row"] == 1
    assert cases["T=8192 d=64"]["row"] == 3 and cases["T=8192 d=64"]["shipped_path"] == "cublas"
    knobs = {k["knob"]: k for k in result["knobs"]}
    assert knobs["fake.kernels.FUSE"]["verdict"] == "confirms" and knobs["fake.kernels.FUSE"]["shapes"] == 1
    assert knobs["fake.kernels.SPLIT"]["verdict"] == "contradicts"
    assert knobs["fake.kernels.SPLIT"]["write"].startswith("SPLIT = False  # NVIDIA H200 (x.json): fake.fwd T=512")


def test_rows_a_rule_cannot_read_and_forced_defaults_stay_unmeasured():
    table = PathTable("fakeop", paths=("kernel", "cublas"), default="kernel",
                      rows=[(lambda row_gate, **_: row_gate, "kernel", "needs a keyword the shape lacks")])
    records = _case(16, {"peftops": 1.0, "peftops[kernel]": 1.0, "peftops[cublas]": 0.5})
    result = paths.read(records, tables={"fakeop": ("fake.ops", table)}, knobs={}, source="x.json",
                        op_tables={"fake.fwd": "fakeop"})
    assert result["rows"][0]["verdict"] == "unmeasured"
    assert result["cases"][0]["fastest"] == "cublas" and result["cases"][0]["row"] is None
    # on a CPU (the interpreter's default path, no row recorded) nothing is attributed to a row either
    cpu = _case(16, {"peftops": 1.0, "peftops[kernel]": 1.0, "peftops[cublas]": 0.5}, {"fakeop.path:kernel": 1})
    assert _read(cpu)["rows"][0]["verdict"] == "unmeasured"


def test_bench_ops_map_to_their_tables():
    ops = paths.case_tables()
    assert ops["lora.fwd"] == "lora" and ops["bottleneck_adapter_fwd"] == "adapter"
    assert ops["gated_lora.fwd_bwd"] == "gated_lora" and ops["adapter_fusion_fwd_bwd"] == "adapter_fusion"


def test_knobs_discovered_from_the_bench_cases():
    knobs = paths.bench_knobs()
    names = {f"{m}.{a}": k for (m, a), k in knobs.items()}
    assert {"peftops.kernels.lora.TMA_FUSE_S", "peftops.kernels.lora.DECODE_SPLIT_K",
            "peftops.kernels.adapter.FWD_TALL_ROWS"} <= set(names)
    assert names["peftops.kernels.lora.TMA_FUSE_S"].shipped is True
    assert "peftops[kernel:no_fuse_s]" in names["peftops.kernels.lora.TMA_FUSE_S"].variants


def test_paths_on_the_h100_baseline_prints_every_row_unmeasured():
    buf = io.StringIO()
    assert paths.main([BASELINE], out=buf) == 0
    text = buf.getvalue()
    tables = paths.path_tables()
    assert {"lora", "ia3", "adapter", "adapter_fusion", "prefix_attention", "gated_lora"} <= set(tables)
    n_rows = sum(len(t.rows) for _, t in tables.values())
    assert "(no peftops[<path>] or knob provider timed in this file)" in text
    n_knobs = len(paths.bench_knobs())
    assert n_knobs >= 3
    assert f"rows + knobs: 0 confirmed, 0 contradicted, {n_rows + n_knobs} unmeasured" in text
    assert "TMA_FUSE_S" in text and "lambda **_: True" in text
