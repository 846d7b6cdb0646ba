"""Every launch-config function in kernels/ declares the configs it can return, and
``python -m peftops compile-check`` turns each into launches to compile.

compile-check compiles what the test suite launches, plus every config each ``*config``
function can return (``@kernels.enumerates``) applied to the recorded flag paths of its
kernel, so a config no test reaches still meets the GPU compiler in CI, not first on a
user's shape. A new config function without an enumeration fails here.
"""
import json

import pytest

from peftops import compile_check as cc


def _all_config_functions():
    return [(m.__name__, name, fn) for m in cc.kernel_modules() for name, fn in cc.config_functions(m).items()]


def test_config_functions_are_found():
    names = {f"{m.rsplit('.', 1)[-1]}.{n}" for m, n, _ in _all_config_functions()}
    # the ones this test was written against (a new kernel file adds to them, never removes)
    assert {"adapter.rows_config", "adapter.weights_config", "fusion.config", "ia3.gemm_config",
            "ia3.colsum_config", "lora.gemm_config", "lora.tma_config", "lora.rank_add_config",
            "lora.skinny_config", "prefix_attention.fwd_config", "prefix_attention.bwd_config"} <= names


@pytest.mark.parametrize("module,name,fn", _all_config_functions(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_config_function_enumerates_its_configs(module, name, fn):
    gen = getattr(fn, "variants", None)
    assert gen is not None, (f"{module}.{name} has no enumeration: declare every config it can return with "
                             f"@enumerates({name}) next to it (kernels/__init__.py: enumerates, variant)")
    variants = list(gen())
    assert variants, f"{module}.{name}'s enumeration yields nothing"
    kernels = __import__(module, fromlist=["_"])
    for v in variants:
        kernel = getattr(kernels, v["kernel"], None)
        assert kernel is not None, f"{module}.{name}: variant for unknown kernel {v['kernel']}"
        params = set(kernel.arg_names)
        assert set(v["constexprs"]) | set(v["where"]) <= params, (
            f"{module}.{name}: {sorted(set(v['constexprs']) | set(v['where']) - params)} are not parameters of "
            f"{v['kernel']}")
        assert v["options"].get("num_warps") in (1, 2, 4, 8, 16)


def test_enumeration_returns_what_the_function_returns():
    """The enumeration is the function evaluated, not a copy of its table: change a threshold and
    the enumerated configs follow."""
    from peftops.kernels import adapter

    got = {(v["kernel"], v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_D"], v["constexprs"]["BLOCK_W"],
            v["options"]["num_warps"]) for v in adapter.rows_config_variants()}
    # the backward row kernel at > 16 rows and a bottleneck block of 16 (m <= 16): not in the suite
    assert ("adapter_bwd_rows_kernel", 32, 64, 16, 4) in got and ("adapter_bwd_rows_kernel", 32, 128, 32, 4) in got
    assert ("adapter_fwd_kernel", 64, 128, 64, 8) in got           # the tall-row forward (FWD_TALL_ROWS)
    assert ("adapter_fwd_kernel", 64, 128, 128, 8) not in got       # tall rows only up to m = 64


def _record():
    """A small synthetic record: one bf16 GELU backward row launch (no gate, up bias, contiguous
    [T, d] = [7, 45] rows, m = 24) as the suite records it."""
    from peftops.kernels import adapter

    names = adapter.adapter_bwd_rows_kernel.arg_names
    cx = dict(ACT=1, HAS_BU=True, HAS_GATE=False, NEED_DH=True, ADD_DY=False, UPCAST=False, PRECISION="ieee",
              BLOCK_M=16, BLOCK_D=128, BLOCK_W=32)
    ints = dict(T=7, D=45, MW=24, stride_ym=45, stride_yd=1, stride_wdm=45, stride_wdd=1, stride_wud=24, stride_wum=1,
                stride_hm=45, stride_hd=1)
    args = []
    for n in names:
        if n in cx:
            args.append(["constexpr", cx[n]])
        elif n.endswith("_ptr"):
            args.append(["tensor", "float32" if n in ("z_ptr", "dz_ptr", "dg_ptr", "gate_ptr") else "bfloat16"])
        elif n == "scale":
            args.append(["float", 0.5])
        else:
            args.append(["int", ints[n]])
    return [{"module": adapter.__name__, "name": "adapter_bwd_rows_kernel", "args": args, "constexprs": cx,
             "options": {"num_warps": 4, "num_stages": 3}}]


def test_enumerated_launches_apply_configs_to_recorded_flag_paths():
    recs = _record()
    launches, unreached = cc.enumerated_launches(recs)
    rows = [r for r in launches if r["name"] == "adapter_bwd_rows_kernel"]
    blocks = {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_D"], r["constexprs"]["BLOCK_W"],
               r["options"]["num_warps"]) for r in rows}
    assert (32, 64, 16, 4) in blocks and (16, 128, 32, 4) in blocks and (32, 64, 256, 8) in blocks
    for r in rows:
        assert r["enumerated"] == "rows_config"
        assert r["constexprs"]["ACT"] == 1 and r["constexprs"]["HAS_GATE"] is False   # the flags stay as recorded
        names = __import__(r["module"], fromlist=["_"]).adapter_bwd_rows_kernel.arg_names
        for name in ("BLOCK_M", "BLOCK_D", "BLOCK_W"):  # the constexpr arguments carry the new values too
            assert r["args"][names.index(name)] == ["constexpr", r["constexprs"][name]]
    # the recorded launch's own config is deduplicated by compile-check's plan, not here
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    # kernels with no recorded launch are not enumerated (nothing to specialise them from)
    assert {r["name"] for r in launches} == {"adapter_bwd_rows_kernel"}
    assert unreached == []


_COMPILED = r"""
import json, sys
sys.path.insert(0, "test_dir")
from test_config_variants import _record
from peftops import compile_check as cc
recs = _record()
launches, _ = cc.enumerated_launches(recs)
jobs = cc.plan(recs + launches, [90], {90}, {90})
sm80 = cc.plan(recs + launches, [80], {90}, {90})
wanted = [r for r, _ in jobs if r["constexprs"]["BLOCK_W"] == 16 and r["constexprs"]["BLOCK_M"] == 32]
res = cc.compile_one(wanted[0], 90) if sys.argv[1] == "compile" else None
print(json.dumps({"jobs": [[r.get("enumerated"), r["constexprs"], r["options"]] for r, _ in jobs],
                  "sm80": len(sm80), "compiled": res}))
"""


def _plan_outside_the_interpreter(compile=False):
    """compile-check's planning binds the real (not interpreted) kernels: a fresh process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _COMPILED.replace("test_dir", here), "compile" if compile else "plan"],
                         cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plan_dedupes_enumerated_against_the_record():
    got = _plan_outside_the_interpreter()
    recorded = [j for j in got["jobs"] if j[0] is None]
    assert len(recorded) == 1
    blocks = [(c["BLOCK_M"], c["BLOCK_D"], c["BLOCK_W"], o["num_warps"]) for _, c, o in got["jobs"]]
    assert len(blocks) == len(set(blocks))            # the recorded config is compiled once, as recorded
    assert (32, 64, 16, 4) in blocks and (16, 128, 32, 4) in blocks
    assert got["sm80"] == 1                            # enumerated configs: sm_90 only by default


def test_gelu_backward_rows_at_width_16_is_spill_free_on_sm_90():
    """The config compile-check's enumeration found spilling (no test shape reached it): the
    GELU row backward at > 16 rows and m <= 16, bf16, compiled for sm_90 (rows_config)."""
    res = _plan_outside_the_interpreter(compile=True)["compiled"]
    assert res["ok"], res.get("error")
    assert res["constexprs"]["ACT"] == 1 and res["dtypes"] == ["bfloat16", "float32"]
    assert res["stack"] == 0, f"{res['stack']} B of stack (spills) at {res['regs']} registers"
