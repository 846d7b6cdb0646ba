"""(IA)^3's dispatch paths (peftops/ops/ia3.py ``PATHS``): each path forced, output and every
gradient vs the float64 reference; the cublas path's fold / scale variants, its dl guard for
(nearly) zero l, fp32 l over a half base, torch.compile; the table.

tests/test_ia3.py runs the default path of the test device; here every path runs on it."""

import pytest
import torch

import peftops
from peftops import reference
from peftops.ops.ia3 import PATHS, _fold
from parity import BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, path_fixture, randn
from test_ia3 import SHAPES, ia3_args, run_parity

pytestmark = pytest.mark.usefixtures("seed_per_test")

PATH_NAMES = list(PATHS.paths)


FF = pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])


path = path_fixture("ia3", PATH_NAMES)


@FF
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
def test_parity_shapes(path, lead, n_in, n_out, dtype, feedforward):
    run_parity(ia3_args(lead, n_in, n_out, feedforward=feedforward), dtype, feedforward)
    assert peftops.dispatch_counts().get(f"ia3.path:{path}") == 1


# (lead, in, out): rows above both dimensions (W folded for either scaling) and rows below
# both (the activations scaled instead); see ``_fold``.
FOLD_SHAPES = [((3, 29), 37, 67), ((129,), 67, 37)]
SCALE_SHAPES = [((7,), 37, 67), ((2, 5), 129, 33)]


@pytest.mark.parametrize("lead,n_in,n_out", FOLD_SHAPES + SCALE_SHAPES)
@FF
def test_fold_rule(lead, n_in, n_out, feedforward):
    T = 1
    for n in lead:
        T *= n
    folds = (lead, n_in, n_out) in FOLD_SHAPES
    assert _fold(T, n_out, n_in, feedforward) == folds
    assert not _fold(0, 1, 1, feedforward)


@FF
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out", FOLD_SHAPES + SCALE_SHAPES, ids=["fold-a", "fold-b", "scale-a", "scale-b"])
def test_cublas_fold_and_scale(lead, n_in, n_out, dtype, feedforward):
    with peftops.force_path("ia3", "cublas"):
        run_parity(ia3_args(lead, n_in, n_out, feedforward=feedforward), dtype, feedforward)
        # only l trainable (a frozen embedding feeds x): dl without dx
        run_parity(ia3_args(lead, n_in, n_out, feedforward=feedforward), dtype, feedforward, grads=("ia3_l",))
        run_parity(ia3_args(lead, n_in, n_out, feedforward=feedforward), dtype, feedforward, grads=("x",))


@FF
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_noncontiguous_no_bias_peft_shape(path, dtype, feedforward):
    args = ia3_args((2, 11), 40, 52, feedforward=feedforward, bias=False, noncontig=True, peft_shape=True)
    assert not args["x"].is_contiguous()
    out, _ = run_parity(args, dtype, feedforward)
    assert out.shape == (2, 11, 52)


@FF
@pytest.mark.parametrize("lead", [(45,), (7,)], ids=["fold", "scale"])
def test_parity_transposed_weight(path, feedforward, lead):
    """A weight given as a transposed view (GPT-2 Conv1D stores [in, out])."""
    args = ia3_args(lead, 36, 44, feedforward=feedforward)
    args["weight"] = args["weight"].t().contiguous().t()
    run_parity(args, torch.float32, feedforward)


@FF
@pytest.mark.parametrize("lead", [(0,), (1,), (1, 1), (2, 0, 3)], ids=str)
def test_zero_and_one_rows(path, lead, feedforward):
    out, _ = run_parity(ia3_args(lead, 29, 35, feedforward=feedforward), torch.float32, feedforward)
    assert out.shape == (*lead, 35)


@FF
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(150,), (9,)], ids=["fold", "scale"])
def test_zero_and_tiny_l(path, dtype, feedforward, lead):
    """dl where l is 0 or tiny: dividing by l cannot give it there (output scaling: y / l;
    input scaling with W folded: dx / l); the guard launch recomputes those columns. Checked
    column by column, not only in norm."""
    n_in, n_out = 37, 129
    args = ia3_args(lead, n_in, n_out, feedforward=feedforward)
    l = args["ia3_l"]
    cols = [0, 5, 30, 36]
    tiny = [9, 20]
    l[cols] = 0.0
    l[tiny] = 1e-5 if dtype == torch.float16 else 1e-35
    run_parity(args, dtype, feedforward)
    x = args["x"].to(dtype).requires_grad_(True)
    w, b = args["weight"].to(dtype), args["bias"].to(dtype)
    lt = l.to(dtype).requires_grad_(True)
    y = peftops.ia3_linear(x, w, b, lt, feedforward=feedforward)
    dy = torch.randn_like(y)
    y.backward(dy)
    if feedforward:
        expect = (x.double() * (dy.double() @ w.double())).sum(0)             # colsum(x * dY W)
    else:
        expect = (dy.double() * (x.double() @ w.double().t() + b.double())).sum(0)  # colsum(dY * z)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i in cols + tiny:
        assert abs(lt.grad[i].item() - expect[i].item()) <= tol * expect.abs().max().item(), i


@FF
@pytest.mark.parametrize("lead", [(2, 40), (2, 13)], ids=["fold", "scale"])
def test_fp32_l_under_half_x(path, feedforward, lead):
    """peft keeps l in float32 over a half-precision base: accepted, dl comes back fp32."""
    args = ia3_args(lead, 45, 29, feedforward=feedforward)
    x = args["x"].to(torch.bfloat16).requires_grad_(True)
    w, b = args["weight"].to(torch.bfloat16), args["bias"].to(torch.bfloat16)
    l = args["ia3_l"].float().requires_grad_(True)
    y = peftops.ia3_linear(x, w, b, l, feedforward=feedforward)
    assert y.dtype == torch.bfloat16
    m = {k: v.detach().requires_grad_(k in ("x", "ia3_l")) if v is not None else None for k, v in args.items()}
    ref = reference.ia3_linear(**m, feedforward=feedforward)
    assert_close("output", y, ref, BOUNDS[torch.bfloat16])
    dy = torch.randn_like(ref)
    ref.backward(dy)
    y.backward(dy.to(torch.bfloat16))
    assert l.grad.dtype == torch.float32
    assert_close("dl", l.grad, m["ia3_l"].grad, BOUNDS[torch.bfloat16])
    assert_close("dx", x.grad, m["x"].grad, BOUNDS[torch.bfloat16])


@FF
def test_tf32_follows_matmul_precision(path, feedforward):
    torch.set_float32_matmul_precision("high")
    run_parity(ia3_args((70,), 64, 48, feedforward=feedforward), torch.float32, feedforward, bound=TF32_BOUND)


@FF
def test_inference_no_autograd(path, feedforward):
    args = {k: v.float() for k, v in ia3_args((3, 30), 40, 24, feedforward=feedforward).items()}
    with torch.no_grad():
        y = peftops.ia3_linear(**args, feedforward=feedforward)
    assert y.grad_fn is None
    want = reference.ia3_linear(**{k: v.double() for k, v in args.items()}, feedforward=feedforward)
    assert_close("output", y, want, BOUNDS[torch.float32])


def test_cublas_repeatable_bitwise():
    outs = []
    with peftops.force_path("ia3", "cublas"):
        for ff in (False, True):
            a = ia3_args((90,), 50, 70, feedforward=ff)
            for _ in range(2):
                x = a["x"].float().requires_grad_(True)
                l = a["ia3_l"].float().requires_grad_(True)
                y = peftops.ia3_linear(x, a["weight"].float(), a["bias"].float(), l, feedforward=ff)
                y.sum().backward()
                outs.append((y.detach(), x.grad, l.grad))
    for i in (0, 2):
        for u, v in zip(outs[i], outs[i + 1]):
            assert torch.equal(u, v)


def test_cublas_launches_no_gemm_kernel():
    """The cublas path runs no Triton GEMM except the guard (which does no K steps unless
    some |l| <= guard): the GEMMs are cuBLAS (torch)."""
    with peftops.force_path("ia3", "cublas"):
        for ff in (False, True):
            run_parity(ia3_args((60,), 20, 24, feedforward=ff), torch.float32, ff, grads=("x", "ia3_l"))
    c = peftops.dispatch_counts()
    assert c.get("ia3.path:cublas") == 2 and c.get("ia3.triton") == 2
    assert "launch.ia3_gemm" not in c
    assert c.get("launch.ia3_colsum") == 2 and c.get("launch.ia3_gemm_guard") == 2


@FF
@pytest.mark.parametrize("lead", [(3, 15), (3, 5)], ids=["fold", "scale"])
def test_torch_compile_fullgraph(feedforward, lead):
    """The cublas path traces into one graph (its backward is a custom op with a fake)."""
    args = ia3_args(lead, 24, 20, feedforward=feedforward)
    w, b = args["weight"].float(), args["bias"].float()
    x = args["x"].float().requires_grad_(True)
    l = args["ia3_l"].float().requires_grad_(True)
    torch._dynamo.reset()
    with peftops.force_path("ia3", "cublas"):
        f = torch.compile(lambda x, l: peftops.ia3_linear(x, w, b, l, feedforward=feedforward), backend="aot_eager",
                          fullgraph=True)
        y = f(x, l)
        dy = torch.randn_like(y)
        y.backward(dy)
    torch._dynamo.reset()
    m = {k: v.detach().requires_grad_(k in ("x", "ia3_l")) for k, v in args.items()}
    ref = reference.ia3_linear(**m, feedforward=feedforward)
    ref.backward(dy.double())
    assert_close("output", y, ref, 1e-5)
    assert_close("dx", x.grad, m["x"].grad, 1e-5)
    assert_close("dl", l.grad, m["ia3_l"].grad, 1e-5)
    assert peftops.dispatch_counts().get("launch.ia3_colsum", 0) >= 1


def test_custom_op_opcheck():
    from peftops.ops.ia3 import ia3_cublas_bwd

    for ff in (False, True):
        a = {k: v.float() for k, v in ia3_args((40,), 24, 20, feedforward=ff).items()}
        x, w, b, l = a["x"], a["weight"], a["bias"], a["ia3_l"]
        y = peftops.ia3_linear(x, w, b, l, feedforward=ff)
        dy = torch.randn_like(y)
        wf = w * (l[None, :] if ff else l[:, None])
        for wfold in (wf, None):
            for need_dx, need_dl in ((True, True), (False, True), (True, False)):
                if wfold is not None and not need_dx:
                    continue
                torch.library.opcheck(ia3_cublas_bwd, (dy, x, None if ff else y, wfold, w, b, l, ff, need_dx, need_dl))


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("T", [1, 16, 512, 8192])
@FF
def test_table_on_cuda_picks_cublas(T, feedforward):
    # H100 2026-11-23: our GEMM 1.36-6.3x the base GEMM, eager 1.2-1.3x; the cublas path is
    # the base GEMM plus O(out * in) or O(T * n) elementwise work at every measured shape.
    assert PATHS.pick(True, T=T, d_in=4096, d_out=4096, feedforward=feedforward) == "cublas"
    assert PATHS.pick(False, T=T, d_in=4096, d_out=4096, feedforward=feedforward) == "kernel"
    c = peftops.dispatch_counts()
    assert c["ia3.path:cublas"] == 1 and c["ia3.path:kernel"] == 1


def test_forced_path_overrides_and_bad_name(monkeypatch):
    with peftops.force_path("ia3", "kernel"):
        assert PATHS.pick(True, T=8192, d_in=64, d_out=64, feedforward=False) == "kernel"
    monkeypatch.setenv("PEFTOPS_PATH_IA3", "nonsense")
    with pytest.raises(ValueError, match="PEFTOPS_PATH_IA3='nonsense'"):
        PATHS.pick(True, T=1, d_in=64, d_out=64, feedforward=False)
    args = {k: v.float() for k, v in ia3_args((4,), 8, 6, feedforward=False).items()}
    with pytest.raises(ValueError, match="PEFTOPS_PATH_IA3"):
        peftops.ia3_linear(**args, feedforward=False)


def test_env_var_forces_the_op(monkeypatch):
    monkeypatch.setenv("PEFTOPS_PATH_IA3", "cublas")
    run_parity(ia3_args((30,), 20, 24, feedforward=True), torch.float32, True)
    assert peftops.dispatch_counts().get("ia3.path:cublas") == 1


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_bad_input_checked_on_every_path(path_name):
    args = {k: v.float() for k, v in ia3_args((4,), 8, 6, feedforward=False).items()}
    args["x"] = args["x"][:, :5]
    with peftops.force_path("ia3", path_name), pytest.raises(ValueError, match="x has 5 features"):
        peftops.ia3_linear(**args, feedforward=False)


def test_masters_live_on_the_test_device():
    assert randn(2, 3).device.type == DEVICE.type


@FF
def test_autocast_does_not_recast(path, feedforward):
    """Like the kernel, every path computes in its inputs' dtype under autocast (the module
    casts to the autocast dtype itself, as nn.Linear would)."""
    args = ia3_args((40,), 24, 20, feedforward=feedforward)
    t = {k: v.float().requires_grad_(k == "x") for k, v in args.items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = peftops.ia3_linear(**t, feedforward=feedforward)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert t["x"].grad.dtype == torch.float32
    assert_close("output", y, reference.ia3_linear(**args, feedforward=feedforward), BOUNDS[torch.float32])
