"""(IA)^3: fused kernels (run by the Triton interpreter on CPU) vs the float64 reference,
the module vs peft's own IA3 layer, bad input, dispatch."""
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import peftops
from peftops import reference
from peftops.ops import ia3 as ia3_ops
from parity import (BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, check_parity, forced_path, large_case, randn,
                    table_paths)

GRADS = ("x", "weight", "bias", "ia3_l")


def ia3_args(lead, n_in, n_out, *, feedforward, bias=True, noncontig=False, peft_shape=False):
    """float64 masters; l random around 1 with both signs present (peft's init of ones
    would hide a missing or misplaced scale)."""
    n = n_in if feedforward else n_out
    l = randn(n) + 0.5
    if peft_shape:
        l = l.view(1, n) if feedforward else l.view(n, 1)
    return dict(
        x=randn(*lead, n_in, noncontig=noncontig),
        weight=randn(n_out, n_in, scale=n_in ** -0.5),
        bias=randn(n_out) if bias else None,
        ia3_l=l,
    )


def run_parity(args, dtype, feedforward, grads=GRADS, **kw):
    grads = [g for g in grads if args.get(g) is not None]
    kwargs = dict(feedforward=feedforward)
    return check_parity(peftops.ia3_linear, reference.ia3_linear, args, grads, dtype,
                        op_kwargs=kwargs, ref_kwargs=kwargs, **kw)


SHAPES = [  # (leading dims, in, out)
    ((37,), 67, 129),
    ((2, 19), 33, 40),
    ((2, 3, 5), 24, 31),
    ((70,), 130, 65),
]


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
def test_parity_shapes(lead, n_in, n_out, dtype, feedforward):
    run_parity(ia3_args(lead, n_in, n_out, feedforward=feedforward), dtype, feedforward)


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_parity_transposed_weight(feedforward):
    """A weight given as a transposed view (GPT-2 Conv1D stores [in, out])."""
    args = ia3_args((21,), 36, 44, feedforward=feedforward)
    args["weight"] = args["weight"].t().contiguous().t()
    run_parity(args, torch.float32, feedforward)


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_only_l_trainable(dtype, feedforward):
    """dl without dx (x from a frozen embedding): the colsum / no-store paths."""
    run_parity(ia3_args((3, 9), 45, 38, feedforward=feedforward), dtype, feedforward, grads=("ia3_l",))


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_many_tiles(feedforward):
    """Several K tiles and column blocks in every GEMM (the dl partials of the output-scaling
    dx GEMM are spread round robin over the column blocks)."""
    run_parity(ia3_args((45,), 150, 200, feedforward=feedforward), torch.float32, feedforward)


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_only_x_needs_grad(feedforward):
    run_parity(ia3_args((17,), 45, 38, feedforward=feedforward), torch.float32, feedforward, grads=("x",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_output_scaling_zero_and_tiny_l(dtype):
    """dl where l is 0 or tiny: y / l cannot give z there, the guard launch recomputes it.
    Checked column by column, not only in norm."""
    args = ia3_args((41,), 37, 129, feedforward=False)
    l = args["ia3_l"]
    l[[0, 5, 70, 128]] = 0.0
    l[[9, 100]] = 1e-5 if dtype == torch.float16 else 1e-35
    run_parity(args, dtype, False)
    x = args["x"].to(dtype)
    w, b = args["weight"].to(dtype), args["bias"].to(dtype)
    lt = l.to(dtype).requires_grad_(True)
    y = peftops.ia3_linear(x, w, b, lt, feedforward=False)
    dy = torch.randn_like(y)
    y.backward(dy)
    z = (x.double() @ w.double().t() + b.double())
    expect = (dy.double() * z).sum(0)
    for i in (0, 5, 70, 128, 9, 100):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert abs(lt.grad[i].item() - expect[i].item()) <= tol * (expect.abs().max().item()), i
    assert peftops.dispatch_counts().get("launch.ia3_gemm_guard", 0) >= 1


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_tf32_follows_matmul_precision(feedforward):
    torch.set_float32_matmul_precision("high")
    run_parity(ia3_args((33,), 64, 48, feedforward=feedforward), torch.float32, feedforward, bound=TF32_BOUND)


@settings(max_examples=6, deadline=None)
@given(lead=st.lists(st.integers(0, 9), min_size=1, max_size=3), n_in=st.integers(1, 70),
       n_out=st.integers(1, 70), bias=st.booleans(), feedforward=st.booleans(), peft_shape=st.booleans())
def test_parity_hypothesis(lead, n_in, n_out, bias, feedforward, peft_shape):
    run_parity(ia3_args(tuple(lead), n_in, n_out, feedforward=feedforward, bias=bias, peft_shape=peft_shape),
               torch.float32, feedforward)


def test_kernels_ran_not_reference():
    """The kernel path's launches (forced: on CUDA the table picks cublas; each path's own
    launches are counted in tests/test_paths_ia3.py)."""
    for ff in (False, True):
        args = ia3_args((9,), 20, 24, feedforward=ff)
        with peftops.force_path("ia3", "kernel"):
            run_parity(args, torch.float32, ff, grads=("x", "ia3_l"))
    counts = peftops.dispatch_counts()
    assert counts.get("ia3.triton", 0) == 2 and counts.get("ia3.reference", 0) == 0
    # forward x2, dx GEMM x2, guard x1 (output scaling)
    assert counts.get("launch.ia3_gemm", 0) == 4
    assert counts.get("launch.ia3_gemm_guard", 0) == 1


def test_repeatable_bitwise():
    args = ia3_args((30,), 50, 70, feedforward=False)
    outs = []
    for _ in range(2):
        x = args["x"].float().requires_grad_(True)
        l = args["ia3_l"].float().requires_grad_(True)
        y = peftops.ia3_linear(x, args["weight"].float(), args["bias"].float(), l, feedforward=False)
        y.sum().backward()
        outs.append((y.detach(), x.grad, l.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_float64_falls_back_visibly():
    args = ia3_args((5,), 8, 6, feedforward=True)
    y = peftops.ia3_linear(**args, feedforward=True)
    assert torch.allclose(y, reference.ia3_linear(**args, feedforward=True))
    assert peftops.dispatch_counts().get("ia3.fallback", 0) == 1


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    args = {k: v.float() if v is not None else None for k, v in ia3_args((4,), 8, 6, feedforward=False).items()}
    peftops.ia3_linear(**args, feedforward=False)
    counts = peftops.dispatch_counts()
    assert counts.get("ia3.reference") == 1 and "launch.ia3_gemm" not in counts


def _good():
    return {k: v.float() if v is not None else None for k, v in ia3_args((4,), 8, 6, feedforward=False).items()}


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(x=a["x"][:, :5]), ValueError, "x has 5 features"),
    (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight must have 2 dims"),
    (lambda a: a.update(bias=a["bias"][:3]), ValueError, "bias has shape"),
    (lambda a: a.update(ia3_l=a["ia3_l"][:5]), ValueError, r"ia3_l has shape \(5,\)"),
    (lambda a: a.update(ia3_l=torch.ones(8, device=DEVICE)), ValueError, r"ia3_l has shape \(8,\)"),  # the [in] shape
    (lambda a: a.update(ia3_l=torch.ones(1, 6, device=DEVICE)), ValueError, r"ia3_l has shape \(1, 6\)"),  # ff's layout
    (lambda a: a.update(ia3_l=torch.ones(6, 1, 1, device=DEVICE)), ValueError, "ia3_l must have 1 or 2 dims"),
    (lambda a: a.update(ia3_l=torch.ones(6, dtype=torch.float16, device=DEVICE)), TypeError, "ia3_l has dtype"),
    (lambda a: a.update(weight=a["weight"].half()), TypeError, "weight has dtype"),
    (lambda a: a.update(x=a["x"].long()), TypeError, "x must be a floating-point"),
    (lambda a: a.update(x=None), TypeError, "x must be a tensor"),
    (lambda a: a.update(ia3_l=[1.0] * 6), TypeError, "ia3_l must be a torch.Tensor"),
    (lambda a: a.update(x=torch.tensor(1.0, device=DEVICE)), ValueError, "x must have at least 1 dim"),
    (lambda a: a.update(ia3_l=a["ia3_l"].to("meta")), ValueError, "ia3_l is on meta"),
])
def test_bad_input(mutate, exc, match):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        peftops.ia3_linear(**args, feedforward=False)


def test_bad_feedforward_flag():
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        peftops.ia3_linear(**_good(), feedforward=1)
    args = _good()
    with pytest.raises(ValueError, match="input .feedforward=True"):
        peftops.ia3_linear(**args, feedforward=True)  # l [out] given for input scaling


# ------------------------------------------------------------------------ module vs peft
def _peft_layer(base, ff, name="default"):
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear as PeftIA3

    cfg = IA3Config(target_modules=["lin"], feedforward_modules=["lin"] if ff else [])
    return PeftIA3(base, name, cfg, is_feedforward=ff)


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)


def _compare(ours, theirs, x, bound=1e-4, names=None):
    """Same outputs and gradients (x, every ia3_l, base layer params) as peft's layer."""
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    assert_close("output", ya, yb, bound)
    dy = torch.randn_like(yb)
    for m in (ours, theirs):
        m.zero_grad(set_to_none=True)
    ya.backward(dy)
    yb.backward(dy)
    assert_close("dx", xa.grad, xb.grad, bound)
    pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert pa.keys() == pb.keys()
    for k in names or pa:
        ga, gb = pa[k].grad, pb[k].grad
        assert (ga is None) == (gb is None), k
        if gb is not None:
            assert_close(f"d{k}", ga, gb, bound)


def _assert_kernels_ran(counts, calls):
    """``calls`` ia3_linear calls (x and l trainable) ran on Triton, each with the launches of
    the path the table picked: forward + dx GEMM (kernel), dl's column-sum pass (cublas)."""
    assert counts.get("ia3.triton", 0) == calls and not counts.get("ia3.reference"), counts
    kernel, cublas = counts.get("ia3.path:kernel", 0), counts.get("ia3.path:cublas", 0)
    assert kernel + cublas == calls, counts
    assert counts.get("launch.ia3_gemm", 0) >= 2 * kernel, counts
    assert counts.get("launch.ia3_colsum", 0) >= cublas, counts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ff", [False, True], ids=["out_scale", "in_scale"])
def test_module_matches_peft(ff, bias):
    torch.manual_seed(0)
    base = nn.Linear(67, 45, bias=bias).to(DEVICE)
    theirs = _peft_layer(base, ff)
    ours = peftops.IA3Linear(base, "default", is_feedforward=ff)
    assert ours.base_layer.weight is theirs.base_layer.weight
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert tuple(ours.ia3_l["default"].shape) == tuple(theirs.ia3_l["default"].shape)
    assert torch.equal(ours.ia3_l["default"], theirs.ia3_l["default"])  # both init to ones
    _randomise([theirs.ia3_l["default"]])
    ours.load_state_dict(theirs.state_dict())
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    _compare(ours, theirs, torch.randn(2, 7, 67, device=DEVICE))
    _assert_kernels_ran(peftops.dispatch_counts(), calls=1)


@pytest.mark.parametrize("ff", [False, True], ids=["out_scale", "in_scale"])
def test_module_trainable_base_matches_peft(ff):
    torch.manual_seed(1)
    base_a = nn.Linear(30, 26).to(DEVICE)
    base_b = nn.Linear(30, 26).to(DEVICE)
    base_b.load_state_dict(base_a.state_dict())
    ours = peftops.IA3Linear(base_a, "default", is_feedforward=ff)
    theirs = _peft_layer(base_b, ff)
    _randomise([theirs.ia3_l["default"]])
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, torch.randn(19, 30, device=DEVICE))


@pytest.mark.parametrize("ff", [False, True], ids=["out_scale", "in_scale"])
def test_module_several_adapters_and_switching(ff):
    torch.manual_seed(2)
    base = nn.Linear(40, 33).to(DEVICE)
    base.requires_grad_(False)
    theirs = _peft_layer(base, ff, "a")
    theirs.update_layer("b", config=_cfg(ff))
    ours = peftops.IA3Linear(base, "a", is_feedforward=ff)
    ours.update_layer("b")
    _randomise(theirs.ia3_l.values())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 40, device=DEVICE)
    for active in (["a", "b"], "b", ["b", "a"], "a"):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        assert [p.requires_grad for p in ours.ia3_l.values()] == [p.requires_grad for p in theirs.ia3_l.values()]
        _compare(ours, theirs, x)
    # disabling: the base layer alone, adapters frozen
    theirs.enable_adapters(False)
    ours.enable_adapters(False)
    assert ours.disable_adapters and not any(p.requires_grad for p in ours.ia3_l.values())
    assert_close("disabled", ours(x), base(x), 1e-6)
    _compare(ours, theirs, x)
    ours.enable_adapters(True)
    assert not ours.disable_adapters and ours.ia3_l["a"].requires_grad


def _cfg(ff):
    from peft import IA3Config

    return IA3Config(target_modules=["lin"], feedforward_modules=["lin"] if ff else [])


@pytest.mark.parametrize("ff", [False, True], ids=["out_scale", "in_scale"])
def test_module_merge_unmerge(ff):
    torch.manual_seed(3)
    base_a, base_b = nn.Linear(36, 28).to(DEVICE), nn.Linear(36, 28).to(DEVICE)
    base_b.load_state_dict(base_a.state_dict())
    ours = peftops.IA3Linear(base_a, "a", is_feedforward=ff)
    ours.update_layer("b")
    theirs = _peft_layer(base_b, ff, "a")
    theirs.update_layer("b", config=_cfg(ff))
    _randomise(theirs.ia3_l.values())
    ours.load_state_dict(theirs.state_dict())
    for m in (ours, theirs):
        m.set_adapter(["a", "b"])
    x = torch.randn(11, 36, device=DEVICE)
    before = ours(x).detach()
    ours.merge()
    theirs.merge()
    assert ours.merged and ours.merged_adapters == ["a", "b"]
    assert_close("merged W", base_a.weight, base_b.weight, 1e-6)
    assert_close("merged b", base_a.bias, base_b.bias, 1e-6)
    assert_close("merged output", ours(x), before, 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.unmerge()
        theirs.unmerge()
    assert not ours.merged
    assert_close("unmerged W", base_a.weight, base_b.weight, 1e-6)
    assert_close("unmerged output", ours(x), before, 1e-5)
    # a merged layer that gets disabled unmerges first (peft's behaviour)
    ours.merge(adapter_names=["a"])
    ours.enable_adapters(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close("disabled", ours(x), nn.functional.linear(x, base_b.weight, base_b.bias), 1e-5)
    assert not ours.merged
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.enable_adapters(True)
        with torch.no_grad():
            ours.ia3_l["a"].fill_(float("inf"))
        ours.merge(safe_merge=True)


def test_module_from_peft_and_fan_in_fan_out_conv1d():
    from transformers.pytorch_utils import Conv1D
    from peft import IA3Config
    from peft.tuners.ia3.layer import Linear as PeftIA3

    torch.manual_seed(4)
    for ff in (False, True):
        conv = Conv1D(26, 34).to(DEVICE)  # weight [in=34, out=26]
        cfg = IA3Config(target_modules=["c"], feedforward_modules=["c"] if ff else [], fan_in_fan_out=True)
        theirs = PeftIA3(conv, "default", cfg, is_feedforward=ff)
        _randomise([theirs.ia3_l["default"]])
        conv.requires_grad_(False)
        ours = peftops.IA3Linear.from_peft(theirs)
        assert ours.ia3_l["default"] is theirs.ia3_l["default"] and ours.fan_in_fan_out
        own = peftops.IA3Linear(conv, is_feedforward=ff, fan_in_fan_out=True)
        assert own.ia3_l["default"].shape == theirs.ia3_l["default"].shape
        _compare(ours, theirs, torch.randn(2, 6, 34, device=DEVICE))
        y_before = ours(torch.ones(3, 34, device=DEVICE)).detach()
        ours.merge()
        assert_close("merged conv1d", ours(torch.ones(3, 34, device=DEVICE)), y_before, 1e-5)


def test_module_half_base_fp32_l():
    """A bf16 base with fp32 vectors (peft's autocast_adapter_dtype) runs fused and matches."""
    torch.manual_seed(5)
    base = nn.Linear(48, 40).to(DEVICE, torch.bfloat16).requires_grad_(False)
    for ff in (False, True):
        theirs = _peft_layer(base, ff)
        theirs.ia3_l["default"].data = theirs.ia3_l["default"].data.float()
        _randomise([theirs.ia3_l["default"]])
        ours = peftops.IA3Linear.from_peft(theirs)
        _compare(ours, theirs, torch.randn(2, 9, 48, device=DEVICE).to(torch.bfloat16), bound=BOUNDS[torch.bfloat16])


def test_module_autocast_matches_peft():
    """Under autocast the base layer runs in the autocast dtype, as peft's does."""
    torch.manual_seed(6)
    base = nn.Linear(40, 24).to(DEVICE).requires_grad_(False)
    dt = torch.bfloat16
    for ff in (False, True):
        theirs = _peft_layer(base, ff)
        _randomise([theirs.ia3_l["default"]])
        ours = peftops.IA3Linear.from_peft(theirs)
        x = torch.randn(3, 7, 40, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=dt):
            ya, yb = ours(x), theirs(x)
        assert ya.dtype == yb.dtype == dt
        assert_close("autocast output", ya, yb, BOUNDS[dt])
        assert peftops.dispatch_counts().get("ia3.triton", 0) >= 1


def test_module_bad_args():
    with pytest.raises(TypeError, match="2-D weight"):
        peftops.IA3Linear(nn.ReLU())
    m = peftops.IA3Linear(nn.Linear(8, 6, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(2, 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="x has 5 features"):
        m(torch.randn(2, 5, device=DEVICE))


@settings(max_examples=6, deadline=None)
@given(lead=st.lists(st.integers(0, 7), min_size=1, max_size=3), n_in=st.integers(1, 70),
       n_out=st.integers(1, 70), bias=st.booleans(), ff=st.booleans(), trainable_base=st.booleans())
def test_module_matches_peft_any_shape(lead, n_in, n_out, bias, ff, trainable_base):
    base_a, base_b = nn.Linear(n_in, n_out, bias=bias).to(DEVICE), nn.Linear(n_in, n_out, bias=bias).to(DEVICE)
    base_b.load_state_dict(base_a.state_dict())
    for b in (base_a, base_b):
        b.requires_grad_(trainable_base)
    theirs = _peft_layer(base_b, ff)
    ours = peftops.IA3Linear(base_a, is_feedforward=ff)
    _randomise([theirs.ia3_l["default"]])
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, torch.randn(*lead, n_in, device=DEVICE))


def test_torch_compile_fullgraph():
    """The launchers are custom ops with fake implementations: torch.compile traces the op
    (forward and backward) as one graph."""
    for ff in (False, True):
        args = ia3_args((3, 5), 24, 20, feedforward=ff)
        w, b = args["weight"].float(), args["bias"].float()
        x = args["x"].float().requires_grad_(True)
        l = args["ia3_l"].float().requires_grad_(True)
        f = torch.compile(lambda x, l: peftops.ia3_linear(x, w, b, l, feedforward=ff), backend="aot_eager",
                          fullgraph=True)
        y = f(x, l)
        dy = torch.randn_like(y)
        y.backward(dy)
        m = {k: v.detach().requires_grad_(k in ("x", "ia3_l")) for k, v in args.items()}
        ref = reference.ia3_linear(**m, feedforward=ff)
        ref.backward(dy.double())
        assert_close("output", y, ref, 1e-5)
        assert_close("dx", x.grad, m["x"].grad, 1e-5)
        assert_close("dl", l.grad, m["ia3_l"].grad, 1e-5)
    # Backward launches for both (the dx GEMM on the kernel path, dl's column sum on the
    # cublas one): the forward ones are launched too (seen by tracing record_launch), but
    # dynamo replays its traced copy of the dispatch Counter after the compiled forward graph
    # runs, dropping increments made inside that graph.
    c = peftops.dispatch_counts()
    assert c.get("launch.ia3_gemm", 0) + c.get("launch.ia3_colsum", 0) >= 2, c


# ------------------------------------------------------------------------ GPU-sized
@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", table_paths(ia3_ops))
def test_gpu_sized(path, dtype, feedforward):
    """T = 4096 rows (2 x 2048), d = 1024 in and out, both scalings, each path: output and every
    gradient (x, W, b, l); fp32 under tf32 at TF32_BOUND, bf16 within 1.5x eager bf16's error."""
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    with forced_path("ia3", path):
        run_parity(ia3_args((2, 2048), 1024, 1024, feedforward=feedforward), dtype, feedforward, **large_case(dtype))
        # frozen base (the PEFT case): dx and dl only
        run_parity(ia3_args((2, 2048), 1024, 1024, feedforward=feedforward), dtype, feedforward,
                   grads=("x", "ia3_l"), **large_case(dtype))
