"""AdapterFusion: ``peftops.adapter_fusion`` against the float64 N-GEMM reference (output and
every gradient), the looped kernel path, bad input, launches, and the ``AdapterFusion`` module."""
from __future__ import annotations

import math

import pytest
import torch

import peftops
from peftops import reference
from peftops.nn.fusion import AdapterFusion
from peftops.ops import fusion as fusion_ops
from parity import (BOUNDS, DEVICE, DTYPES, assert_close, check_parity, copy_as, forced_path, large_case, randn,
                    table_paths)

GRADS = ["query", "adapter_outputs", "residual", "query_weight", "query_bias", "key_weight", "value_weight"]


def _args(lead, n, d, *, noncontig=False, bias=True, score_scale=1.0):
    """Masters in float64. Wq ~ 1/sqrt(d), Wk ~ 1/d keep the scores O(score_scale)."""
    return dict(
        query=randn(*lead, d, noncontig=noncontig),
        adapter_outputs=randn(*lead, n, d, noncontig=noncontig),
        residual=randn(*lead, d, noncontig=noncontig),
        query_weight=randn(d, d, scale=1 / math.sqrt(d), noncontig=noncontig),
        query_bias=randn(d, scale=0.5) if bias else None,
        key_weight=randn(d, d, scale=score_scale / d, noncontig=noncontig),
        key_bias=randn(d, scale=0.5) if bias else None,
        value_weight=randn(d, d, scale=1 / math.sqrt(d), noncontig=noncontig),
    )


def _grads(args):
    return [g for g in GRADS if args.get(g) is not None]


def _assert_ran(counts, calls=1, backward=True):
    """``calls`` adapter_fusion calls on Triton's dispatch branch; the kernel path's with one
    forward (and backward) launch each (the eager path, CUDA's pick for d <= 1024 and N <= 3,
    is batched products: no launches)."""
    assert counts.get("adapter_fusion.triton", 0) == calls and not counts.get("adapter_fusion.reference"), counts
    kernel = counts.get("adapter_fusion.path:kernel", 0)
    assert kernel + counts.get("adapter_fusion.path:eager", 0) == calls, counts
    assert counts.get("launch.fusion_fwd", 0) == kernel, counts
    assert counts.get("launch.fusion_bwd", 0) == (kernel if backward else 0), counts


@pytest.fixture
def kernel_path():
    """Our row kernels forced (CUDA's table picks the eager path at small d and N; both paths
    run in tests/test_paths_fusion.py)."""
    with peftops.force_path("adapter_fusion", "kernel"):
        yield


CASES = [  # (lead, N, d, temperature)
    ((37,), 1, 37, 1.0),
    ((23,), 2, 67, 1.0),
    ((3, 7), 3, 129, 0.5),
    ((2, 5, 3), 5, 37, 2.5),
    ((1,), 3, 67, 1.0),
    ((41,), 16, 33, 1.0),
    ((9,), 17, 37, 1.0),   # N past a power of two: padded to 32, masked
    ((7,), 2, 1, 1.0),     # d = 1
]


@pytest.mark.parametrize("lead,n,d,tau", CASES)
def test_parity_fp32(lead, n, d, tau):
    args = _args(lead, n, d)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), torch.float32,
                 op_kwargs=dict(temperature=tau), ref_kwargs=dict(temperature=tau))
    _assert_ran(peftops.dispatch_counts())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,n,d,tau", [((29,), 3, 67, 1.0), ((2, 9), 5, 37, 1.7)])
def test_parity_half(dtype, lead, n, d, tau):
    args = _args(lead, n, d)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), dtype,
                 op_kwargs=dict(temperature=tau), ref_kwargs=dict(temperature=tau))


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous(dtype):
    args = _args((19,), 3, 37, noncontig=True)
    for name in ("query", "adapter_outputs", "query_weight", "value_weight"):
        assert not args[name].is_contiguous()
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), dtype)


def test_adapter_major_layout():
    """adapter_outputs as a [N, T, d] buffer seen as [T, N, d] (large stride over N)."""
    args = _args((31,), 4, 37)
    args["adapter_outputs"] = randn(4, 31, 37)

    def op(adapter_outputs, **kw):
        u = adapter_outputs.transpose(0, 1)
        assert u.stride(1) > u.stride(0)
        return peftops.adapter_fusion(adapter_outputs=u, **kw)

    def ref(adapter_outputs, **kw):
        return reference.adapter_fusion(adapter_outputs=adapter_outputs.transpose(0, 1), **kw)

    check_parity(op, ref, args, _grads(args), torch.float32)
    _assert_ran(peftops.dispatch_counts())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_looped_path(monkeypatch, kernel_path, dtype):
    """Force the two-sweep path (chunks over d with a ragged tail) on a small shape."""
    k = fusion_ops.kernels("fusion")
    monkeypatch.setattr(k, "ONE_PASS_MAX_FWD", 0)
    monkeypatch.setattr(k, "ONE_PASS_MAX_BWD", 0)
    monkeypatch.setattr(k, "CHUNK_ELEMS", 64)
    cfg = k.config(3, 67, backward=True)
    assert not cfg["ONE_PASS"] and cfg["BLOCK_D"] < 67
    args = _args((2, 11), 3, 67)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), dtype,
                 op_kwargs=dict(temperature=0.7), ref_kwargs=dict(temperature=0.7))


def test_no_biases():
    args = _args((13,), 2, 37, bias=False)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), torch.float32)


def test_peaked_scores_stay_finite():
    """Scores of a few hundred: the softmax saturates, the max-subtraction keeps it finite."""
    args = _args((17,), 5, 37, score_scale=300.0)
    # With a nearly one-hot softmax the gradients that pass through the scores (dquery,
    # dWq, dbq, dWk) are rounding-level in any precision, so compare the well-conditioned
    # ones and require the rest to be finite. d adapter_outputs has a part through the keys
    # too (u_n feeds K), held to a multiple of eager fp32's own error on the same inputs.
    # Over 40 draws ours was 1.0-1.5x eager's error on 37 and 2.3x / 2.9x / 5.0x on three
    # (up to 8.8e-5 relative), in either association of the scores (u_n . (Wk^T Q), as the
    # kernel does, or (Wk u_n) . Q): 6x keeps every draw in and a wrong gradient (>= 1e-2)
    # out. The saturated regime's extra rounding is left to AdapterFusion's kernel work.
    copies = {k: copy_as(v, torch.float32, True) for k, v in args.items()}
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args,
                 ["adapter_outputs", "residual", "value_weight"], torch.float32,
                 vs_eager=["adapter_outputs"], eager_eps=1e-6, eager_factor=6.0)
    out = peftops.adapter_fusion(**copies)
    out.sum().backward()
    for name, t in copies.items():
        assert torch.isfinite(t.grad).all(), name


@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1)])
def test_empty_and_single_token(lead):
    args = _args(lead, 3, 37)
    grads = _grads(args)
    if math.prod(lead) == 0:
        copies = {k: copy_as(v, torch.float32, k in grads) for k, v in args.items()}
        out = peftops.adapter_fusion(**copies)
        assert out.shape == (*lead, 37)
        out.sum().backward()
        for name in grads:
            g = copies[name].grad
            assert g is not None and g.shape == copies[name].shape
            assert torch.count_nonzero(g) == 0
    else:
        check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, grads, torch.float32)


def test_key_bias_gradient_is_exactly_zero():
    args = _args((21,), 3, 37)
    copies = {k: copy_as(v, torch.float32, True) for k, v in args.items()}
    masters = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
    dy = torch.randn(21, 37, dtype=torch.float64, device=DEVICE)
    peftops.adapter_fusion(**copies).backward(dy.float())
    reference.adapter_fusion(**masters).backward(dy)
    assert torch.equal(copies["key_bias"].grad, torch.zeros(37, device=DEVICE))
    # The reference gets it as a sum that cancels to rounding noise.
    assert masters["key_bias"].grad.abs().max() < 1e-9
    assert_close("dquery", copies["query"].grad, masters["query"].grad, BOUNDS[torch.float32])


@pytest.mark.parametrize("only", ["adapter_outputs", "value_weight", "key_weight", "query"])
def test_partial_requires_grad(only):
    args = _args((15,), 3, 37)
    check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, [only], torch.float32)


def test_launches_and_dispatch(kernel_path):
    args = _args((9,), 2, 37)
    copies = {k: copy_as(v, torch.float32, k == "adapter_outputs") for k, v in args.items()}
    peftops.adapter_fusion(**copies).sum().backward()
    counts = peftops.dispatch_counts()
    assert counts["adapter_fusion.triton"] == 1
    assert counts["launch.fusion_fwd"] == 1 and counts["launch.fusion_bwd"] == 1
    assert "adapter_fusion.reference" not in counts


def test_no_backward_launch_without_grad(kernel_path):
    args = _args((9,), 2, 37)
    with torch.no_grad():
        peftops.adapter_fusion(**{k: copy_as(v, torch.float32) for k, v in args.items()})
    counts = peftops.dispatch_counts()
    assert counts["launch.fusion_fwd"] == 1 and "launch.fusion_bwd" not in counts


def test_float64_falls_back_visibly():
    args = _args((5,), 2, 37)
    out = peftops.adapter_fusion(**args)
    assert torch.equal(out, reference.adapter_fusion(**args))
    counts = peftops.dispatch_counts()
    assert counts["adapter_fusion.fallback"] == 1 and "launch.fusion_fwd" not in counts


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    args = {k: copy_as(v, torch.float32) for k, v in _args((5,), 2, 37).items()}
    assert torch.equal(peftops.adapter_fusion(**args), reference.adapter_fusion(**args))
    assert peftops.dispatch_counts()["adapter_fusion.reference"] == 1


def test_custom_ops_opcheck():
    u = torch.randn(5, 3, 37, device=DEVICE)
    qk = torch.randn(5, 37, device=DEVICE)
    torch.library.opcheck(fusion_ops.fusion_fwd, (u, qk, 1.5))
    m, a = fusion_ops.fusion_fwd(u, qk, 1.5)
    torch.library.opcheck(fusion_ops.fusion_bwd, (u, qk, a, torch.randn(5, 37, device=DEVICE), 1.5))


# ------------------------------------------------------------------------ bad input
def _bad(**override):
    args = {k: copy_as(v, torch.float32) for k, v in _args((4,), 3, 8).items()}
    temperature = override.pop("temperature", 1.0)
    args.update(override)
    return args, temperature


@pytest.mark.parametrize("override,exc,match", [
    (dict(adapter_outputs=torch.randn(4, 3, 9, device=DEVICE)), ValueError, "adapter_outputs"),
    (dict(adapter_outputs=torch.randn(5, 3, 8, device=DEVICE)), ValueError, "adapter_outputs"),
    (dict(adapter_outputs=torch.randn(4, 8, device=DEVICE)), ValueError, "adapter_outputs"),
    (dict(adapter_outputs=torch.randn(4, 0, 8, device=DEVICE)), ValueError, "N = 0"),
    (dict(residual=torch.randn(4, 9, device=DEVICE)), ValueError, "residual"),
    (dict(residual=torch.randn(1, 8, device=DEVICE)), ValueError, "residual"),
    (dict(query_weight=torch.randn(8, 9, device=DEVICE)), ValueError, "query_weight"),
    (dict(key_weight=torch.randn(8, device=DEVICE)), ValueError, "key_weight"),
    (dict(value_weight=torch.randn(9, 9, device=DEVICE)), ValueError, "value_weight"),
    (dict(query_bias=torch.randn(9, device=DEVICE)), ValueError, "query_bias"),
    (dict(key_bias=torch.randn(8, 1, device=DEVICE)), ValueError, "key_bias"),
    (dict(query=torch.randn((), device=DEVICE)), ValueError, "query"),
    (dict(value_weight=torch.randn(8, 8, dtype=torch.float16, device=DEVICE)), TypeError, "value_weight"),
    (dict(residual=torch.ones(4, 8, dtype=torch.int64, device=DEVICE)), TypeError, "residual"),
    (dict(query_weight=None), TypeError, "query_weight"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=torch.tensor(1.0)), TypeError, "temperature"),
])
def test_bad_input(override, exc, match):
    args, temperature = _bad(**override)
    with pytest.raises(exc, match=match):
        peftops.adapter_fusion(**args, temperature=temperature)


def test_bad_device():
    args, _ = _bad()
    args["residual"] = args["residual"].to("meta")
    with pytest.raises(ValueError, match="residual"):
        peftops.adapter_fusion(**args)


# ------------------------------------------------------------------------ module
def test_module_init_and_names():
    torch.manual_seed(0)
    d = 129
    m = AdapterFusion(d, device=DEVICE)
    assert set(m.state_dict()) == {"query.weight", "query.bias", "key.weight", "key.bias", "value.weight"}
    assert m.value.bias is None
    w = m.value.weight.detach()
    assert torch.equal(torch.diagonal(w), torch.ones(d, device=DEVICE))
    off = w[~torch.eye(d, dtype=torch.bool, device=DEVICE)]
    assert torch.allclose(off, torch.full_like(off, 1e-6))
    for lin in (m.query, m.key):
        assert torch.count_nonzero(lin.bias) == 0
        assert abs(lin.weight.std().item() - 0.02) < 2e-3 and abs(lin.weight.mean().item()) < 2e-3
    assert m.T == 1.0
    plain = AdapterFusion(d, value_initialized=False, device=DEVICE)
    assert abs(plain.value.weight.std().item() - 0.02) < 2e-3


def test_module_regularization_loss():
    d = 37
    m = AdapterFusion(d, device=DEVICE)
    expect_init = 0.01 * d * (d - 1) * 1e-12
    assert math.isclose(m.regularization_loss().item(), expect_init, rel_tol=1e-3)
    with torch.no_grad():
        m.value.weight.add_(torch.randn(d, d, device=DEVICE) * 0.1)
    w = m.value.weight.detach().double()
    eye = torch.eye(d, dtype=torch.float64, device=DEVICE)
    expect = 0.01 * ((eye - w) ** 2).sum()
    loss = m.regularization_loss()
    assert math.isclose(loss.item(), expect.item(), rel_tol=1e-5)
    loss.backward()
    assert torch.allclose(m.value.weight.grad.double(), 0.02 * (w - eye), atol=1e-7)


def test_module_forward_matches_reference():
    torch.manual_seed(1)
    d, n = 37, 3
    m = AdapterFusion(d, device=DEVICE)
    with torch.no_grad():  # move away from the identity-like init so every path matters
        for lin in (m.query, m.key, m.value):
            lin.weight.normal_(0.0, 1 / math.sqrt(d))
        m.query.bias.normal_()
    q, r = torch.randn(2, 5, d, device=DEVICE), torch.randn(2, 5, d, device=DEVICE)
    u = [torch.randn(2, 5, d, device=DEVICE) for _ in range(n)]
    out = m(q, u, r)
    ref = reference.adapter_fusion(q.double(), torch.stack(u, -2).double(), r.double(),
                                   *(t.double() for t in (m.query.weight, m.query.bias, m.key.weight,
                                                          m.key.bias, m.value.weight)))
    assert_close("module output", out, ref, BOUNDS[torch.float32])
    out.sum().backward()
    assert m.value.weight.grad is not None and torch.equal(m.key.bias.grad, torch.zeros(d, device=DEVICE))
    _assert_ran(peftops.dispatch_counts())
    with pytest.raises(ValueError, match="empty"):
        m(q, [], r)


def test_module_temperature_schedule(monkeypatch):
    m = AdapterFusion(16, temperature=True, device=DEVICE)
    assert m.T == 50.0 and math.isclose(m.reduction, 0.05)
    q, u, r = (torch.randn(*shape, device=DEVICE) for shape in ((3, 16), (3, 2, 16), (3, 16)))
    seen = []
    orig = reference.adapter_fusion

    def spy(*a, temperature, **kw):
        seen.append(temperature)
        return orig(*a, temperature=temperature, **kw)

    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    monkeypatch.setattr(reference, "adapter_fusion", spy)
    m(q, u, r)
    m(q, u, r)
    assert seen == [50.0, 49.95]
    assert math.isclose(m.T, 49.9)
    m.eval()
    m(q, u, r)
    assert math.isclose(m.T, 49.9)  # evaluation does not advance the schedule
    m.train()
    m.T = 1.02
    m(q, u, r)
    assert m.T == 1.0
    m(q, u, r)
    assert m.T == 1.0 and seen[-1] == 1.0
    assert AdapterFusion(16, device=DEVICE).T == 1.0


def test_module_bad_size():
    with pytest.raises(ValueError, match="hidden_size"):
        AdapterFusion(0)


# ------------------------------------------------------------------------ GPU-sized
@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("dtype,d", [(torch.float32, 1024), (torch.bfloat16, 1024), (torch.bfloat16, 4096)],
                         ids=["float32-d1024", "bfloat16-d1024", "bfloat16-d4096"])
@pytest.mark.parametrize("path", table_paths(fusion_ops))
def test_gpu_sized(path, dtype, d):
    """T = 4096 tokens (2 x 2048), N = 3 adapters, each path: output and every gradient. fp32
    under tf32 at TF32_BOUND; bf16 within 1.5x eager bf16's error on the same inputs (eager's
    AdapterFusion grads are 8-16 % off float64 at d = 4096, shared/PERF.md)."""
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    args = _args((2, 2048), 3, d)
    with forced_path("adapter_fusion", path):
        check_parity(peftops.adapter_fusion, reference.adapter_fusion, args, _grads(args), dtype,
                     op_kwargs=dict(temperature=1.0), ref_kwargs=dict(temperature=1.0), **large_case(dtype))


@pytest.mark.parametrize("backward", [False, True])
def test_config_blocks_are_gpu_legal(backward):
    """Every block a power of two, N covered by BLOCK_N, D by BLOCK_D (one pass) or chunks
    of >= 16 (looped), tiles bounded -- for the production shapes too (d = 4096, N = 16)."""
    k = fusion_ops.kernels("fusion")
    for n in (1, 2, 3, 8, 16, 17, 64):
        for d in (1, 37, 129, 1024, 4096, 8192):
            cfg = k.config(n, d, backward)
            bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
            assert bn & (bn - 1) == 0 and bd & (bd - 1) == 0 and bd >= 16 and bn >= n
            if cfg["ONE_PASS"]:
                assert bd >= d
            assert bn * bd <= max(k.ONE_PASS_MAX_FWD, k.CHUNK_ELEMS, 16 * bn)
            assert cfg["num_warps"] in (1, 2, 4, 8)
