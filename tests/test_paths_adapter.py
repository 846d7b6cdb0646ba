"""Bottleneck adapter's dispatch paths (peftops/ops/adapter.py ``PATHS``): each path forced,
output and every gradient vs the float64 reference (gates, residual aliasing, residual2,
partial gradients, inference); the eager path beyond the kernel's width; torch.compile;
the table, including its grad-mode rows.

tests/test_adapter.py runs the default path of the test device; here every path runs on it."""

import pytest
import torch

import peftops
from peftops import reference
from peftops.ops.adapter import MAX_KERNEL_WIDTH, PATHS
from parity import BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, check_parity, path_fixture, randn
from test_adapter import ALL_GRADS, SHAPES, adapter_args, run_parity

pytestmark = pytest.mark.usefixtures("seed_per_test")

PATH_NAMES = list(PATHS.paths)


path = path_fixture("adapter", PATH_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,m", SHAPES)
def test_parity_shapes(path, lead, d, m, dtype):
    run_parity(adapter_args(lead, d, m), dtype)
    assert peftops.dispatch_counts().get(f"adapter.path:{path}") == 1


@pytest.mark.parametrize("gate", [None, "token", "sample"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_new", "silu", "swish"])
def test_parity_activation_gate(path, activation, gate):
    run_parity(adapter_args((3, 11), 67, 12, gate=gate), torch.float32, activation=activation, scaling=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gate", ["token", "sample"])
@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_parity_gate_half(path, gate, dtype, activation):
    run_parity(adapter_args((2, 13), 45, 20, gate=gate), dtype, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_noncontiguous(path, dtype):
    args = adapter_args((2, 9), 67, 7, bias=False, noncontig=True)
    assert not args["h"].is_contiguous()
    run_parity(args, dtype, activation="silu")


@pytest.mark.parametrize("gate", [None, "token"])
def test_one_bias_only(path, gate):
    """Only the up bias (the ones column) or only the down bias."""
    for drop in ("down_bias", "up_bias"):
        args = adapter_args((3, 7), 37, 9, gate=gate)
        args[drop] = None
        run_parity(args, torch.float32, activation="gelu")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1)], ids=str)
def test_empty_and_single_row(path, lead):
    args = adapter_args(lead, 37, 5, gate="token")
    kw = dict(activation="gelu", scaling=0.75)
    check_parity(peftops.bottleneck_adapter, reference.bottleneck_adapter, args, list(ALL_GRADS), torch.float32,
                 op_kwargs=kw, ref_kwargs=kw)
    # The gate gradient of one row is one dot product, sum_j dY_j f_j, that cancels heavily
    # (|sum| ~ 1e-3 sum |dY_j f_j| on typical draws): bounded relative to sum |dY_j f_j|.
    t = {k: v.float().requires_grad_(k == "gate") if v is not None else None for k, v in args.items()}
    m = {k: v.detach().requires_grad_(k == "gate") if v is not None else None for k, v in args.items()}
    out = peftops.bottleneck_adapter(**t, activation="gelu", scaling=0.75)
    want = reference.bottleneck_adapter(**m, activation="gelu", scaling=0.75)
    dy = torch.randn_like(want)
    out.backward(dy.float())
    want.backward(dy)
    f = (want - m["residual"]).detach() / m["gate"].detach()
    scale = (dy * f).abs().sum(-1, keepdim=True)                          # sum_j |dY_j f_j| per row
    assert ((t["gate"].grad.double() - m["gate"].grad).abs() <= 1e-5 * scale + 1e-12).all()


@pytest.mark.parametrize("gate", [None, "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_aliases_h(path, dtype, gate):
    """residual is h itself, on each path (the body: tests/test_adapter.py)."""
    import test_adapter

    test_adapter.test_residual_aliases_h(dtype, gate)


@pytest.mark.parametrize("gate", [None, "token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_second_residual(path, dtype, gate):
    args = adapter_args((2, 7), 67, 12, gate=gate, noncontig=True)
    args["residual2"] = randn(2, 7, 67)

    def ref(residual, residual2, **kw):
        return reference.bottleneck_adapter(residual=residual + residual2, **kw)

    grads = list(ALL_GRADS) + ["residual2"] + (["gate"] if gate else [])
    kwargs = dict(activation="gelu", scaling=0.5)
    check_parity(peftops.bottleneck_adapter, ref, args, grads, dtype, op_kwargs=kwargs, ref_kwargs=kwargs)
    with torch.no_grad():
        t = {k: v.float() for k, v in args.items()}
        out = peftops.bottleneck_adapter(**t, **kwargs)
    assert_close("no-grad output", out, ref(**args, **kwargs), BOUNDS[torch.float32])


@pytest.mark.parametrize("which", ["h", "residual"])
def test_residual2_aliases(path, which):
    """residual2 is h (the parallel placement) or is residual: every use gets its gradient."""
    m = adapter_args((2, 6), 33, 5)
    t = {k: v.float().requires_grad_(True) for k, v in m.items()}
    t64 = {k: v.detach().requires_grad_(True) for k, v in m.items()}

    def call(f, d):
        res = d["h"] if which == "h" else d["residual"]
        kw = dict(activation="gelu_new", scaling=0.9)
        if f is reference.bottleneck_adapter:
            return f(d["h"], d["down_weight"], d["down_bias"], d["up_weight"], d["up_bias"], residual=res + res, **kw)
        return f(d["h"], d["down_weight"], d["down_bias"], d["up_weight"], d["up_bias"], residual=res, residual2=res,
                 **kw)

    out, want = call(peftops.bottleneck_adapter, t), call(reference.bottleneck_adapter, t64)
    assert_close("output", out, want, BOUNDS[torch.float32])
    dy = torch.randn_like(want)
    out.backward(dy.float())
    want.backward(dy)
    for k in ("h", "down_weight", "up_weight", "residual"):
        if t64[k].grad is None:
            assert t[k].grad is None
        else:
            assert_close(f"d{k}", t[k].grad, t64[k].grad, BOUNDS[torch.float32])


def test_tf32(path):
    torch.set_float32_matmul_precision("high")
    run_parity(adapter_args((2, 17), 67, 24, gate="token"), torch.float32, bound=TF32_BOUND, activation="gelu")


@pytest.mark.parametrize("grads", [("h",), ("residual",), ("down_weight", "up_bias"), ("up_weight",), ("down_bias",),
                                   ("gate",)], ids=str)
def test_partial_gradients(path, grads):
    run_parity(adapter_args((2, 11), 37, 6, gate="token"), torch.float32, grads=grads, activation="gelu")


@pytest.mark.parametrize("gate", [None, "sample"])
def test_inference_no_autograd(path, gate):
    args = adapter_args((2, 11), 67, 24, gate=gate)
    t = {k: v.float() for k, v in args.items()}
    kw = dict(activation="gelu_new", scaling=2.0)
    with torch.no_grad():
        out = peftops.bottleneck_adapter(**t, **kw)
    assert out.grad_fn is None
    assert_close("output", out, reference.bottleneck_adapter(**args, **kw), BOUNDS[torch.float32])


def test_scalar_gate(path):
    args = adapter_args((2, 5), 37, 9)
    args["gate"] = torch.rand(1, dtype=torch.float64, device=DEVICE) + 0.5
    run_parity(args, torch.float32, activation="silu")


def test_eager_beyond_kernel_width():
    """m > MAX_KERNEL_WIDTH: the kernel path falls back to the reference (visibly); the eager
    path runs it (and the CUDA table sends it there)."""
    m = MAX_KERNEL_WIDTH + 1
    with peftops.force_path("adapter", "eager"):
        run_parity(adapter_args((9,), 24, m, gate="token"), torch.float32, activation="gelu")
    c = peftops.dispatch_counts()
    assert c.get("adapter.path:eager") == 1 and not any(k.startswith("adapter.fallback") for k in c)
    with peftops.force_path("adapter", "kernel"):
        run_parity(adapter_args((9,), 24, m), torch.float32)
    assert peftops.dispatch_counts().get(f"adapter.fallback:bottleneck width m={m} > {MAX_KERNEL_WIDTH}") == 1
    assert PATHS.pick(True, T=9, d=24, m=m, train=True) == "eager"


def test_eager_runs_no_kernel():
    with peftops.force_path("adapter", "eager"):
        run_parity(adapter_args((2, 9), 37, 6, gate="token"), torch.float32)
    c = peftops.dispatch_counts()
    assert c.get("adapter.triton") == 1 and c.get("adapter.path:eager") == 1
    assert not any(k.startswith("launch.") for k in c), c


@pytest.mark.parametrize("residual_is_h", [False, True])
def test_torch_compile_fullgraph_eager(residual_is_h):
    masters = adapter_args((2, 5), 37, 9, gate="token")
    if residual_is_h:
        del masters["residual"]
    a = {k: v.float().requires_grad_(True) for k, v in masters.items()}
    m64 = {k: v.detach().requires_grad_(True) for k, v in masters.items()}

    def fn(f, t):
        res = t["h"] if residual_is_h else t["residual"]
        return f(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], residual=res,
                 activation="gelu", scaling=0.5, gate=t["gate"])

    torch._dynamo.reset()
    with peftops.force_path("adapter", "eager"):
        out = torch.compile(lambda **t: fn(peftops.bottleneck_adapter, t), backend="aot_eager", fullgraph=True)(**a)
        grads = torch.autograd.grad(out.square().sum(), list(a.values()))
    torch._dynamo.reset()
    want = fn(reference.bottleneck_adapter, m64)
    want_grads = torch.autograd.grad(want.square().sum(), list(m64.values()))
    assert_close("output", out, want, BOUNDS[torch.float32])
    for name, got, ref in zip(a, grads, want_grads):
        assert_close(f"d{name}", got, ref, BOUNDS[torch.float32])


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("d,m,train,want", [
    (4096, 64, False, "kernel"),     # fwd: ours 0.100 ms vs eager 0.137
    (4096, 64, True, "eager"),       # fwd+bwd: eager 0.39 vs ours 0.98
    (1024, 64, False, "eager"),      # fwd: 0.044 vs 0.149
    (1024, 64, True, "eager"),       # fwd+bwd: 0.58 vs 1.45
    (4096, 256, False, "eager"),     # fwd: 0.152 vs 0.192
    (8192, 32, False, "kernel"),     # unmeasured: as d=4096 m=64
    (2048, 64, False, "eager"),      # unmeasured: by bytes
    (4096, 512, False, "eager"),     # beyond the kernel
])
def test_table_on_cuda(d, m, train, want):
    assert PATHS.pick(True, T=8192, d=d, m=m, train=train) == want
    assert PATHS.pick(False, T=8192, d=d, m=m, train=train) == "kernel"
    c = peftops.dispatch_counts()
    assert c[f"adapter.path:{want}"] == (2 if want == "kernel" else 1)


def test_grad_mode_reaches_the_table(monkeypatch):
    """The op passes train = grad enabled and some input requires grad."""
    seen = []
    real = PATHS.pick

    def spy(on_cuda, **shape):
        seen.append(shape["train"])
        return real(on_cuda, **shape)

    monkeypatch.setattr(PATHS, "pick", spy)
    t = {k: v.float() for k, v in adapter_args((3,), 16, 4).items()}
    peftops.bottleneck_adapter(**t)                                   # nothing requires grad
    t["h"].requires_grad_(True)
    with torch.no_grad():
        peftops.bottleneck_adapter(**t)                               # grad disabled
    peftops.bottleneck_adapter(**t)                                   # training
    assert seen == [False, False, True]


def test_every_row_has_evidence():
    for _rule, path_name, evidence in PATHS.rows:
        assert path_name in PATHS.paths and len(evidence) > 40


def test_forced_path_overrides_and_bad_name(monkeypatch):
    with peftops.force_path("adapter", "kernel"):
        assert PATHS.pick(True, T=8192, d=1024, m=64, train=True) == "kernel"
    monkeypatch.setenv("PEFTOPS_PATH_ADAPTER", "cublas")
    with pytest.raises(ValueError, match="PEFTOPS_PATH_ADAPTER='cublas'"):
        PATHS.pick(True, T=1, d=64, m=4, train=False)


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_bad_input_checked_on_every_path(path_name):
    t = {k: v.float() for k, v in adapter_args((4,), 8, 3).items()}
    t["up_weight"] = t["up_weight"][:, :2]
    with peftops.force_path("adapter", path_name), pytest.raises(ValueError, match="up_weight has shape"):
        peftops.bottleneck_adapter(**t)


def test_autocast_does_not_recast(path):
    """Like the kernels, every path computes in its inputs' dtype under autocast."""
    args = adapter_args((3, 7), 37, 9, gate="token")
    t = {k: v.float().requires_grad_(k == "h") for k, v in args.items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = peftops.bottleneck_adapter(**t, activation="gelu")
    assert out.dtype == torch.float32
    out.sum().backward()
    assert t["h"].grad.dtype == torch.float32
    assert_close("output", out, reference.bottleneck_adapter(**args, activation="gelu"), BOUNDS[torch.float32])
