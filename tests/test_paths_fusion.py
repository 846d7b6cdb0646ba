"""AdapterFusion's dispatch paths (peftops/ops/fusion.py ``PATHS``): each path forced, output
and every gradient vs the float64 N-GEMM reference; the eager path's batched products on
odd, strided and empty inputs; torch.compile; the table.

tests/test_fusion.py runs the default path of the test device; here every path runs on it."""
from __future__ import annotations


import pytest
import torch

import peftops
from peftops import reference
from peftops.ops.fusion import PATHS
from parity import BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, check_parity, copy_as, path_fixture, randn
from test_fusion import CASES, _args, _grads

pytestmark = pytest.mark.usefixtures("seed_per_test")

PATH_NAMES = list(PATHS.paths)


path = path_fixture("adapter_fusion", PATH_NAMES)


def _run(args, dtype, tau=1.0, grads=None):
    return check_parity(peftops.adapter_fusion, reference.adapter_fusion, args,
                        _grads(args) if grads is None else grads, dtype,
                        op_kwargs=dict(temperature=tau), ref_kwargs=dict(temperature=tau))


@pytest.mark.parametrize("lead,n,d,tau", CASES)
def test_parity_fp32(path, lead, n, d, tau):
    _run(_args(lead, n, d), torch.float32, tau)
    c = peftops.dispatch_counts()
    assert c.get(f"adapter_fusion.path:{path}") == 1
    launched = c.get("launch.fusion_fwd", 0) + c.get("launch.fusion_bwd", 0)
    assert launched == (2 if path == "kernel" else 0), c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,n,d,tau", [((29,), 3, 67, 1.0), ((2, 9), 5, 37, 1.7), ((129,), 2, 37, 0.8)])
def test_parity_half(path, dtype, lead, n, d, tau):
    _run(_args(lead, n, d), dtype, tau)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous(path, dtype):
    args = _args((19,), 3, 37, noncontig=True)
    for name in ("query", "adapter_outputs", "query_weight", "value_weight"):
        assert not args[name].is_contiguous()
    _run(args, dtype)


def test_adapter_major_layout(path):
    """adapter_outputs as a [N, T, d] buffer seen as [T, N, d] (large stride over N)."""
    args = _args((31,), 4, 37)
    args["adapter_outputs"] = randn(4, 31, 37)

    def op(adapter_outputs, **kw):
        return peftops.adapter_fusion(adapter_outputs=adapter_outputs.transpose(0, 1), **kw)

    def ref(adapter_outputs, **kw):
        return reference.adapter_fusion(adapter_outputs=adapter_outputs.transpose(0, 1), **kw)

    check_parity(op, ref, args, _grads(args), torch.float32)


def test_no_biases(path):
    _run(_args((13,), 2, 37, bias=False), torch.float32)


@pytest.mark.parametrize("grads", [["adapter_outputs"], ["query", "key_weight"], ["value_weight", "residual"],
                                   ["query_bias"]], ids=str)
def test_partial_gradients(path, grads):
    _run(_args((3, 5), 3, 37), torch.float32, grads=grads)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1)], ids=str)
def test_empty_and_single_token(path, lead):
    """Zero and one token, on each path (the body: tests/test_fusion.py)."""
    import test_fusion

    test_fusion.test_empty_and_single_token(lead)


def test_key_bias_gradient_is_exactly_zero(path):
    args = {k: v.float().requires_grad_(True) for k, v in _args((7,), 3, 16).items()}
    peftops.adapter_fusion(**args).square().sum().backward()
    assert torch.count_nonzero(args["key_bias"].grad) == 0


def test_peaked_scores_stay_finite(path):
    """Scores of a few hundred: a saturated softmax. The gradients through it are ill-
    conditioned (a_n (g_n - sum a g) cancels), so each is bounded by 1.5x eager fp32's own
    error on the same inputs (DESIGN.md, Numerics), and all must be finite."""
    args = _args((17,), 5, 37, score_scale=300.0)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args,
                 ["adapter_outputs", "residual", "value_weight"], torch.float32, vs_eager=True)
    copies = {k: copy_as(v, torch.float32, True) for k, v in args.items()}
    peftops.adapter_fusion(**copies).sum().backward()
    for name, t in copies.items():
        assert torch.isfinite(t.grad).all(), name


def test_inference_no_autograd(path):
    args = _args((3, 11), 3, 37)
    t = {k: v.float() for k, v in args.items()}
    with torch.no_grad():
        out = peftops.adapter_fusion(**t, temperature=0.6)
    assert out.grad_fn is None
    assert_close("output", out, reference.adapter_fusion(**args, temperature=0.6), BOUNDS[torch.float32])


def test_tf32(path):
    torch.set_float32_matmul_precision("high")
    args = _args((33,), 3, 64)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), torch.float32, bound=TF32_BOUND)


def test_torch_compile_fullgraph_eager():
    masters = _args((2, 5), 3, 24)
    a = {k: v.float().requires_grad_(True) for k, v in masters.items()}
    m64 = {k: v.detach().requires_grad_(True) for k, v in masters.items()}
    torch._dynamo.reset()
    with peftops.force_path("adapter_fusion", "eager"):
        out = torch.compile(lambda **t: peftops.adapter_fusion(**t, temperature=0.8), backend="aot_eager",
                            fullgraph=True)(**a)
        grads = torch.autograd.grad(out.square().sum(), [a[n] for n in _grads(a)])
    torch._dynamo.reset()
    want = reference.adapter_fusion(**m64, temperature=0.8)
    want_grads = torch.autograd.grad(want.square().sum(), [m64[n] for n in _grads(m64)])
    assert_close("output", out, want, BOUNDS[torch.float32])
    for name, got, ref in zip(_grads(a), grads, want_grads):
        assert_close(f"d{name}", got, ref, BOUNDS[torch.float32])


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("d,N,train,want", [
    (1024, 3, True, "eager"),      # fwd+bwd: eager 1.36 ms, compile 1.20 vs ours 1.58
    (1024, 3, False, "eager"),     # fwd: compile 0.238 vs ours 0.333; this path ~0.13 by bytes
    (768, 2, True, "eager"),       # smaller: same rule
    (1024, 8, True, "kernel"),     # fwd+bwd: ours 1.54 vs compile 1.89
    (4096, 3, True, "kernel"),     # 3.84 vs compile 8.64
    (4096, 2, False, "kernel"),    # 1.25 vs eager 2.33
    (4096, 16, True, "kernel"),    # 6.04 vs eager 69.6
])
def test_table_on_cuda(d, N, train, want):
    assert PATHS.pick(True, T=8192, d=d, N=N, train=train) == want
    assert PATHS.pick(False, T=8192, d=d, N=N, train=train) == "kernel"
    c = peftops.dispatch_counts()
    assert c[f"adapter_fusion.path:{want}"] == (2 if want == "kernel" else 1)


def test_every_row_has_evidence():
    for _rule, path_name, evidence in PATHS.rows:
        assert path_name in PATHS.paths and len(evidence) > 40


def test_forced_path_overrides_and_bad_name(monkeypatch):
    with peftops.force_path("adapter_fusion", "kernel"):
        assert PATHS.pick(True, T=8192, d=1024, N=3, train=True) == "kernel"
    monkeypatch.setenv("PEFTOPS_PATH_ADAPTER_FUSION", "compile")
    with pytest.raises(ValueError, match="PEFTOPS_PATH_ADAPTER_FUSION='compile'"):
        PATHS.pick(True, T=1, d=64, N=2, train=False)


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_bad_input_checked_on_every_path(path_name):
    t = {k: v.float() for k, v in _args((4,), 2, 8).items()}
    with peftops.force_path("adapter_fusion", path_name), pytest.raises(ValueError, match="temperature must be > 0"):
        peftops.adapter_fusion(**t, temperature=0.0)


def test_masters_live_on_the_test_device():
    assert randn(2, 3).device.type == DEVICE.type
