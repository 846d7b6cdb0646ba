"""Bottleneck adapter: fused kernels (run by the Triton interpreter on CPU) vs the float64
reference, output and every gradient; the module's three placements vs the METHODS.md
formulas (written out again here, independently of the package); bad input; dispatch."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftops
from peftops import reference
from peftops.nn.adapter import BottleneckAdapter
from peftops.ops import adapter as adapter_ops
from parity import (BOUNDS, DEVICE, DTYPES, assert_close, check_parity, copy_as, forced_path, large_case,
                    randn, table_paths)

ALL_GRADS = ("h", "down_weight", "down_bias", "up_weight", "up_bias", "residual")


def adapter_args(lead, d, m, *, bias=True, gate=None, noncontig=False):
    """float64 masters; weights scaled so the adapter branch is as large as the residual
    (a small branch would hide its errors under the residual's norm)."""
    args = dict(
        h=randn(*lead, d, noncontig=noncontig),
        down_weight=randn(m, d, scale=d ** -0.5, noncontig=noncontig),
        down_bias=randn(m, scale=0.5) if bias else None,
        up_weight=randn(d, m, scale=m ** -0.5 * 2.0),
        up_bias=randn(d) if bias else None,
        residual=randn(*lead, d, noncontig=noncontig),
    )
    if gate == "token":
        args["gate"] = torch.rand(*lead, 1, dtype=torch.float64, device=DEVICE) + 0.1
    elif gate == "sample":
        args["gate"] = torch.rand(lead[0], *([1] * len(lead)), dtype=torch.float64, device=DEVICE) + 0.1
    return args


def run_parity(args, dtype, *, activation="relu", scaling=0.75, grads=ALL_GRADS, **kw):
    grads = [g for g in grads if args.get(g) is not None] + (["gate"] if args.get("gate") is not None else [])
    kwargs = dict(activation=activation, scaling=scaling)
    return check_parity(peftops.bottleneck_adapter, reference.bottleneck_adapter, args, grads, dtype,
                        op_kwargs=kwargs, ref_kwargs=kwargs, **kw)


SHAPES = [  # (leading dims, d, m)
    ((37,), 67, 24),
    ((2, 19), 129, 5),
    ((1,), 16, 16),
    ((2, 3, 5), 37, 33),
    ((70,), 130, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d,m", SHAPES)
def test_parity_shapes(lead, d, m, dtype):
    run_parity(adapter_args(lead, d, m), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gate", ["token", "sample"])
def test_parity_gate_half(gate, dtype):
    run_parity(adapter_args((2, 13), 45, 20, gate=gate), dtype, activation="gelu_new")


def test_wide_bottleneck_on_chip():
    with peftops.force_path("adapter", "kernel"):  # the kernel holds m = 256 on chip (CUDA's table: eager)
        run_parity(adapter_args((20,), 40, 256), torch.float32, activation="gelu")
    assert peftops.dispatch_counts().get("launch.adapter_fwd", 0) == 1


@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1)])
def test_empty_and_single_row(lead):
    run_parity(adapter_args(lead, 37, 5, gate="token"), torch.float32, activation="gelu")


@pytest.mark.parametrize("gate", [None, "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_aliases_h(dtype, gate):
    """residual is h itself: out = h + g s f(h); dh gets both contributions."""
    m = adapter_args((3, 7), 45, 9, gate=gate)
    grads = ["h", "down_weight", "up_weight", "up_bias"] + (["gate"] if gate else [])

    def call(fn, t):
        return fn(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], residual=t["h"],
                  activation="silu", scaling=0.5, gate=t.get("gate"))

    copies = {k: copy_as(v, dtype, k in grads) for k, v in m.items() if v is not None}
    masters = {k: v.detach().double().requires_grad_(k in grads) for k, v in copies.items()}
    out, ref = call(peftops.bottleneck_adapter, copies), call(reference.bottleneck_adapter, masters)
    assert_close("output", out, ref, BOUNDS[dtype])
    dy = torch.randn_like(ref).to(dtype)
    out.backward(dy)
    ref.backward(dy.double())
    for k in grads:
        assert_close(f"d{k}", copies[k].grad, masters[k].grad, BOUNDS[dtype])


def test_inference_path_no_autograd():
    args = adapter_args((2, 11), 67, 24, gate="sample")
    t = {k: v.float() for k, v in args.items()}
    with torch.no_grad():
        out = peftops.bottleneck_adapter(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                                         residual=t["residual"], activation="gelu_new", scaling=2.0, gate=t["gate"])
    ref = reference.bottleneck_adapter(args["h"], args["down_weight"], args["down_bias"], args["up_weight"],
                                       args["up_bias"], residual=args["residual"], activation="gelu_new",
                                       scaling=2.0, gate=args["gate"])
    assert out.grad_fn is None
    assert_close("output", out, ref, BOUNDS[torch.float32])


@settings(max_examples=8, deadline=None)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    d=st.integers(1, 70),
    m=st.integers(1, 40),
    act=st.sampled_from(["relu", "gelu", "gelu_new", "silu"]),
    gate=st.sampled_from([None, "token", "sample"]),
    bias=st.booleans(),
    scaling=st.floats(-4.0, 4.0).filter(lambda s: abs(s) > 1e-2),
)
def test_parity_any_shape(lead, d, m, act, gate, bias, scaling):
    run_parity(adapter_args(tuple(lead), d, m, gate=gate, bias=bias), torch.float32, activation=act, scaling=scaling)


# ---------------------------------------------------------------------------- dispatch
def _assert_adapter_ran(counts, calls, backward=True):
    """``calls`` bottleneck_adapter calls ran on Triton's dispatch branch (not the reference),
    the kernel path's ones with their launches (the eager path is cuBLAS, no launches)."""
    assert counts.get("adapter.triton", 0) == calls and not counts.get("adapter.reference"), counts
    kernel = counts.get("adapter.path:kernel", 0)
    assert kernel + counts.get("adapter.path:eager", 0) == calls, counts
    assert counts.get("launch.adapter_fwd", 0) == kernel, counts
    if backward:
        assert counts.get("launch.adapter_bwd_rows", 0) == kernel, counts


@pytest.fixture
def kernel_path():
    """The fused kernels forced (on CUDA the table picks the eager path for most shapes;
    tests/test_paths_adapter.py runs both)."""
    with peftops.force_path("adapter", "kernel"):
        yield


def test_kernels_launched(kernel_path):
    args = {k: v.float().requires_grad_(True) for k, v in adapter_args((2, 9), 37, 6).items()}
    out = peftops.bottleneck_adapter(args["h"], args["down_weight"], args["down_bias"], args["up_weight"],
                                     args["up_bias"], residual=args["residual"])
    counts = peftops.dispatch_counts()
    assert counts.get("launch.adapter_fwd") == 1 and counts.get("adapter.triton") == 1
    out.sum().backward()
    counts = peftops.dispatch_counts()
    assert counts.get("launch.adapter_bwd_rows") == 1
    assert counts.get("launch.adapter_bwd_weights") == 1
    assert not any(k.startswith("adapter.fallback") for k in counts)


def test_frozen_weights_skip_weight_kernel(kernel_path):
    a = adapter_args((2, 9), 37, 6)
    h = a["h"].float().requires_grad_(True)
    out = peftops.bottleneck_adapter(h, a["down_weight"].float(), a["down_bias"].float(), a["up_weight"].float(),
                                     a["up_bias"].float(), residual=a["residual"].float())
    out.sum().backward()
    counts = peftops.dispatch_counts()
    assert counts.get("launch.adapter_bwd_rows") == 1
    assert "launch.adapter_bwd_weights" not in counts


def test_fallbacks_are_visible(kernel_path):
    """float64, and a bottleneck wider than the kernel holds on its path, run the reference
    visibly (on CUDA's default table the wide one takes the eager path instead)."""
    a = adapter_args((5,), 16, 3)
    out = peftops.bottleneck_adapter(a["h"], a["down_weight"], a["down_bias"], a["up_weight"], a["up_bias"],
                                     residual=a["residual"])
    assert peftops.dispatch_counts().get("adapter.fallback:float64") == 1
    assert out.dtype == torch.float64
    w = adapter_args((3,), 8, 257)
    t = {k: v.float() for k, v in w.items()}
    out = peftops.bottleneck_adapter(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                                     residual=t["residual"])
    assert peftops.dispatch_counts().get("adapter.fallback", 0) == 2
    assert "launch.adapter_fwd" not in peftops.dispatch_counts()
    assert_close("output", out, reference.bottleneck_adapter(w["h"], w["down_weight"], w["down_bias"],
                 w["up_weight"], w["up_bias"], residual=w["residual"]), BOUNDS[torch.float32])


# ---------------------------------------------------------------------------- bad input
def _good():
    return {k: v.float() for k, v in adapter_args((2, 3), 8, 4).items()}


def _call(t, **over):
    t = {**t, **over}
    kw = {k: t[k] for k in ("residual", "activation", "scaling", "gate", "residual2") if k in t}
    return peftops.bottleneck_adapter(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], **kw)


@pytest.mark.parametrize("over,exc,words", [
    (dict(h=torch.randn(2, 3, 9, device=DEVICE)), ValueError, ["h", "(2, 3, 9)", "down_weight"]),
    (dict(down_weight=torch.randn(4, 8, 1, device=DEVICE)), ValueError, ["down_weight", "dims"]),
    (dict(down_weight=torch.randn(0, 8, device=DEVICE), up_weight=torch.randn(8, 0, device=DEVICE)), ValueError,
     ["m = 0"]),
    (dict(down_bias=torch.randn(5, device=DEVICE)), ValueError, ["down_bias", "(5,)"]),
    (dict(up_weight=torch.randn(4, 8, device=DEVICE)), ValueError, ["up_weight", "(4, 8)", "[8, 4]"]),
    (dict(up_bias=torch.randn(4, device=DEVICE)), ValueError, ["up_bias", "(4,)"]),
    (dict(residual=torch.randn(2, 8, device=DEVICE)), ValueError, ["residual", "(2, 8)", "(2, 3, 8)"]),
    (dict(residual=torch.randn(2, 3, 8, dtype=torch.float16, device=DEVICE)), TypeError, ["residual", "float16"]),
    (dict(up_weight=torch.randn(8, 4, dtype=torch.float64, device=DEVICE)), TypeError, ["up_weight", "float64"]),
    (dict(h=torch.ones(2, 3, 8, dtype=torch.int32, device=DEVICE)), TypeError, ["h", "int32"]),
    (dict(residual=None), TypeError, ["residual"]),
    (dict(residual2=torch.randn(2, 8, device=DEVICE)), ValueError, ["residual2", "(2, 8)"]),
    (dict(residual2=torch.randn(2, 3, 8, dtype=torch.float16, device=DEVICE)), TypeError, ["residual2", "float16"]),
    (dict(activation="tanh"), ValueError, ["activation", "tanh"]),
    (dict(scaling=float("nan")), ValueError, ["scaling"]),
    (dict(scaling=torch.tensor(1.0)), TypeError, ["scaling"]),
    (dict(gate=torch.rand(3, 1, 1, device=DEVICE)), ValueError, ["gate", "(3, 1, 1)"]),
    (dict(gate=torch.rand(2, 3, 8, device=DEVICE)), ValueError, ["gate", "(2, 3, 8)"]),
])
def test_bad_input(over, exc, words):
    with pytest.raises(exc) as info:
        _call(_good(), **over)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_missing_residual_is_an_error():
    t = _good()
    with pytest.raises(TypeError):
        peftops.bottleneck_adapter(t["h"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"])


# ---------------------------------------------------------------------------- module
def _formula_f(z, wd, bd, wu, bu, act):
    """f(z) = act(z Wd^T + bd) Wu^T + bu, written out from METHODS.md."""
    pre = z @ wd.t() + bd
    if act == "relu":
        a = torch.clamp(pre, min=0)
    elif act in ("swish", "silu"):
        a = pre * torch.sigmoid(pre)
    elif act == "gelu":
        a = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
    else:  # gelu_new
        a = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre ** 3)))
    return a @ wu.t() + bu


def _formula_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _placement_formula(placement, h, x_in, p, act, s, ln_w, ln_b, eps, gate=None):
    def sf(z):
        out = s * _formula_f(z, p["adapter_down.0.weight"], p["adapter_down.0.bias"], p["adapter_up.weight"],
                             p["adapter_up.bias"], act)
        return out if gate is None else gate * out

    def ln(x):
        return _formula_ln(x, ln_w, ln_b, eps)

    if placement == "pfeiffer":   # y = LN(h + s f(LN(h + x_in)) + x_in)
        return ln(h + sf(ln(h + x_in)) + x_in)
    if placement == "houlsby":    # y = LN(h + s f(h) + x_in)
        return ln(h + sf(h) + x_in)
    return ln(h + sf(x_in) + x_in)  # parallel: y = LN(h + s f(x_in) + x_in)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("placement,act,scale,reduction", [
    ("pfeiffer", "relu", 1.0, 16), ("houlsby", "swish", 1.0, 16), ("parallel", "relu", 4.0, 2),
])
def test_module_placements(placement, act, scale, reduction, gate):
    d = 67
    torch.manual_seed(3)
    mod = BottleneckAdapter(d, placement=placement).to(DEVICE)
    assert (mod.non_linearity, mod.scaling, mod.bottleneck_size) == (act, scale, max(1, d // reduction))
    ln = torch.nn.LayerNorm(d, eps=1e-5).to(DEVICE)
    with torch.no_grad():  # non-trivial weights everywhere (the default init hides bugs)
        for p in list(mod.parameters()) + list(ln.parameters()):
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.5) + (1.0 if p is ln.weight else 0.0))
    h = randn(2, 9, d).float().requires_grad_(True)
    x_in = randn(2, 9, d).float().requires_grad_(True)
    g = (torch.rand(2, 1, 1, device=DEVICE) + 0.1).requires_grad_(True) if gate else None
    out = mod(h, x_in, ln, gate=g)

    params = {k: v.detach().double().requires_grad_(True) for k, v in mod.named_parameters()}
    lw, lb = ln.weight.detach().double().requires_grad_(True), ln.bias.detach().double().requires_grad_(True)
    h64, x64 = h.detach().double().requires_grad_(True), x_in.detach().double().requires_grad_(True)
    g64 = g.detach().double().requires_grad_(True) if gate else None
    ref = _placement_formula(placement, h64, x64, params, act, scale, lw, lb, 1e-5, g64)
    assert_close("output", out, ref, 1e-4)
    dy = torch.randn_like(ref)
    out.backward(dy.float())
    ref.backward(dy)
    _assert_adapter_ran(peftops.dispatch_counts(), calls=1)
    for name, p in mod.named_parameters():
        assert_close(f"d{name}", p.grad, params[name].grad, 1e-4)
    for name, got, want in [("h", h, h64), ("x_in", x_in, x64), ("ln.weight", ln.weight, lw), ("ln.bias", ln.bias, lb)]:
        assert_close(f"d{name}", got.grad, want.grad, 1e-4)
    if gate:
        assert_close("dgate", g.grad, g64.grad, 1e-4)


def test_module_without_layer_norm():
    d = 40
    mod = BottleneckAdapter(d, reduction_factor=8, placement="houlsby", non_linearity="gelu", scaling=0.5,
                            device=DEVICE)
    with torch.no_grad():
        mod.adapter_up.weight.normal_()
    h, x_in = torch.randn(3, d, device=DEVICE), torch.randn(3, d, device=DEVICE)
    p = {k: v.detach() for k, v in mod.named_parameters()}
    want = h + 0.5 * _formula_f(h, p["adapter_down.0.weight"], p["adapter_down.0.bias"], p["adapter_up.weight"],
                                p["adapter_up.bias"], "gelu") + x_in
    assert_close("output", mod(h, x_in), want, 1e-5)


def test_module_names_and_init():
    d = 64
    mod = BottleneckAdapter(d, reduction_factor=4, init_weights="bert", device=DEVICE)
    assert sorted(mod.state_dict()) == ["adapter_down.0.bias", "adapter_down.0.weight", "adapter_up.bias",
                                        "adapter_up.weight"]
    assert mod.adapter_down[0].weight.shape == (16, d) and mod.adapter_up.weight.shape == (d, 16)
    assert 0.01 < mod.adapter_down[0].weight.std().item() < 0.03   # bert: N(0, 0.02)
    assert mod.adapter_up.bias.abs().max() == 0 and mod.adapter_down[0].bias.abs().max() == 0
    mam = BottleneckAdapter(d, reduction_factor=4, init_weights="mam_adapter", device=DEVICE)
    assert mam.adapter_up.weight.abs().max() == 0 and mam.adapter_down[0].weight.abs().max() > 0
    near = BottleneckAdapter(d, reduction_factor=4, init_weights="houlsby", device=DEVICE)
    assert 0 < near.adapter_up.weight.abs().max() <= 2e-2
    # mam_adapter (up = 0) is exactly the identity adapter: y = LN(h + x_in)
    ln = torch.nn.LayerNorm(d, device=DEVICE)
    h, x_in = torch.randn(5, d, device=DEVICE), torch.randn(5, d, device=DEVICE)
    assert_close("identity", mam(h, x_in, ln), ln(h + x_in), 1e-6)
    with pytest.raises(ValueError, match="placement"):
        BottleneckAdapter(d, placement="sideways")
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(d, init_weights="xavier")
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckAdapter(d, non_linearity="tanh")
    with pytest.raises(ValueError, match="reduction_factor"):
        BottleneckAdapter(d, reduction_factor=0)


def test_custom_ops_opcheck():
    """The launchers' torch.library registrations (real and fake) agree, so torch.compile
    can trace through them."""
    from peftops.ops import adapter as adapter_ops

    T, d, m = 5, 37, 6
    h, r = (torch.randn(T, d, device=DEVICE) for _ in range(2))
    wd, bd = torch.randn(m, d, device=DEVICE), torch.randn(m, device=DEVICE)
    wu, bu = torch.randn(d, m, device=DEVICE), torch.randn(d, device=DEVICE)
    g = torch.rand(T, device=DEVICE)
    torch.library.opcheck(adapter_ops.adapter_fwd, (h, wd, bd, wu, bu, r, None, g, 1, 0.5, True))
    torch.library.opcheck(adapter_ops.adapter_fwd, (h, wd, None, wu, None, r, h, None, 0, 0.5, False))
    _, z = adapter_ops.adapter_fwd(h, wd, bd, wu, bu, r, None, g, 1, 0.5, True)
    dy = torch.randn(T, d, device=DEVICE)
    torch.library.opcheck(adapter_ops.adapter_bwd, (dy, h, z, wd, wu, bu, g, 1, 0.5, True, True, True, True, True))
    torch.library.opcheck(adapter_ops.adapter_bwd, (dy, h, z, wd, wu, None, None, 3, 0.5, True, False, False, False, False))


def test_torch_compile_traces_the_op(kernel_path):
    """fullgraph tracing through the autograd Function and the custom ops' fake kernels;
    the compiled graph still runs the kernels and gives the reference's numbers."""
    masters = adapter_args((2, 5), 37, 9, gate="token")
    a = {k: v.float().requires_grad_(True) for k, v in masters.items()}
    m64 = {k: v.detach().requires_grad_(True) for k, v in masters.items()}

    def fn(h, down_weight, down_bias, up_weight, up_bias, residual, gate):
        return peftops.bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias, residual=residual,
                                          activation="gelu", scaling=0.5, gate=gate)

    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(**a)
    grads = torch.autograd.grad(out.square().sum(), list(a.values()))
    want = reference.bottleneck_adapter(m64["h"], m64["down_weight"], m64["down_bias"], m64["up_weight"],
                                        m64["up_bias"], residual=m64["residual"], activation="gelu", scaling=0.5,
                                        gate=m64["gate"])
    want_grads = torch.autograd.grad(want.square().sum(), list(m64.values()))
    assert_close("output", out, want, BOUNDS[torch.float32])
    for name, got, ref in zip(a, grads, want_grads):
        assert_close(f"d{name}", got, ref, BOUNDS[torch.float32])
    # (Dynamo replays the traced dispatch-counter update after the graph runs, which
    # overwrites the forward's launch count; the backward runs outside the graph.)
    assert peftops.dispatch_counts().get("launch.adapter_bwd_rows", 0) >= 1


def test_torch_compile_residual_is_h():
    """One tensor as both h and residual: the op must not hand it twice to the Function
    (Dynamo cannot trace that); dh = dz Wd + dY comes from one kernel."""
    masters = adapter_args((3, 4), 29, 7)
    a = {k: masters[k].float().requires_grad_(True) for k in ("h", "down_weight", "up_weight")}
    m64 = {k: masters[k].detach().requires_grad_(True) for k in a}

    def fn(f, h, down_weight, up_weight):
        return f(h, down_weight, None, up_weight, None, residual=h, activation="relu", scaling=1.5)

    out = torch.compile(lambda **t: fn(peftops.bottleneck_adapter, **t), backend="aot_eager", fullgraph=True)(**a)
    want = fn(reference.bottleneck_adapter, **m64)
    dy = torch.randn_like(want)
    grads = torch.autograd.grad(out, list(a.values()), dy.float())
    want_grads = torch.autograd.grad(want, list(m64.values()), dy)
    assert_close("output", out, want, BOUNDS[torch.float32])
    for name, got, ref in zip(a, grads, want_grads):
        assert_close(f"d{name}", got, ref, BOUNDS[torch.float32])


@pytest.mark.parametrize("m", [24, 200])
def test_gpu_launch_configs(monkeypatch, kernel_path, m):
    """Run the kernels with the GPU launch configs (tile sizes, several T splits in the
    weight-gradient kernel) instead of the interpreter's, so that code path is checked too."""
    from peftops.kernels import adapter as kern

    rows_cfg, weights_cfg = kern.rows_config, kern.weights_config
    monkeypatch.setattr(kern, "rows_config", lambda T, D, MW, interpret, **kw: rows_cfg(T, D, MW, False, **kw))
    monkeypatch.setattr(kern, "weights_config", lambda T, D, MW, want, interpret: weights_cfg(T, D, MW, 8, False))
    assert weights_cfg(70, 40, m, 8, False)["splits"] >= 2
    run_parity(adapter_args((70,), 40, m, gate="token"), torch.float32, activation="gelu")


def test_permuted_3d_inputs():
    """h / residual as transposed 3-D views (rows() must copy them), weights transposed views."""
    a = adapter_args((5, 3), 37, 9, gate="token")
    a["h"] = randn(3, 5, 37).transpose(0, 1)
    a["residual"] = randn(37, 3, 5).permute(2, 1, 0)
    a["up_weight"] = randn(9, 37, scale=0.5).t()
    assert not a["h"].is_contiguous() and not a["up_weight"].is_contiguous()
    run_parity(a, torch.float32, activation="gelu")


def test_module_learned_scaling():
    """scaling="learned": a trainable [1] parameter named ``scaling`` (AdapterHub), exact grad."""
    d = 48
    mod = BottleneckAdapter(d, reduction_factor=4, placement="parallel", scaling="learned").to(DEVICE)
    assert "scaling" in mod.state_dict() and mod.scaling.shape == (1,)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ln = torch.nn.LayerNorm(d).to(DEVICE)
    h, x_in = randn(2, 5, d).float(), randn(2, 5, d).float()
    g = torch.rand(2, 5, 1, device=DEVICE) + 0.2
    out = mod(h, x_in, ln, gate=g)
    params = {k: v.detach().double().requires_grad_(True) for k, v in mod.named_parameters()}
    ref = _placement_formula("parallel", h.double(), x_in.double(), params, "relu", params["scaling"],
                             ln.weight.detach().double(), ln.bias.detach().double(), 1e-5, g.double())
    assert_close("output", out, ref, 1e-4)
    dy = torch.randn_like(ref)
    out.backward(dy.float())
    ref.backward(dy)
    for name, p in mod.named_parameters():
        assert_close(f"d{name}", p.grad, params[name].grad, 1e-4)
    with pytest.raises(ValueError, match="scaling"):
        BottleneckAdapter(d, scaling="sometimes")


# ---------------------------------------------------------------------------- GPU-sized
@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("gate", [None, "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", table_paths(adapter_ops))
def test_gpu_sized(path, dtype, gate):
    """T = 4096 rows (2 x 2048), d = 1024, bottleneck m = 64 (reduction 16) and m = 256 (the
    widest the kernel holds on chip), each path: output and every gradient; fp32 under tf32
    at TF32_BOUND, bf16 within 1.5x eager bf16's error (parity.large_case)."""
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    with forced_path("adapter", path):
        for m in (64, 256):
            run_parity(adapter_args((2, 2048), 1024, m, gate=gate), dtype, activation="gelu", **large_case(dtype))
        # inference (no autograd: the kernel's forward without z)
        kw = dict(activation="gelu_new", scaling=0.75)
        with torch.no_grad():
            check_parity(peftops.bottleneck_adapter, reference.bottleneck_adapter,
                         adapter_args((2, 2048), 1024, 64, gate=gate), [], dtype, op_kwargs=kw, ref_kwargs=kw,
                         **large_case(dtype))
