"""LoRA: fused kernels (run by the Triton interpreter on CPU) vs the float64 reference,
the module vs peft's own LoRA layer, bad input, dispatch."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftops
from peftops import reference
from peftops._launch import new_seed
from peftops.ops import lora as lora_ops
from peftops.ops.lora import dropout_mask
from parity import (BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, check_parity, copy_as, forced_path, large_case,
                    randn, table_paths)


def lora_args(lead, n_in, n_out, r, *, bias=True, gate=None, noncontig=False):
    """float64 masters for lora_linear; B non-zero (peft's zero init would hide bugs)."""
    args = dict(
        x=randn(*lead, n_in, noncontig=noncontig),
        weight=randn(n_out, n_in, scale=n_in ** -0.5),
        bias=randn(n_out) if bias else None,
        lora_A=randn(r, n_in, scale=n_in ** -0.5),
        lora_B=randn(n_out, r, scale=r ** -0.5),
    )
    if gate == "token":
        args["gate"] = torch.rand(*lead, 1, dtype=torch.float64, device=DEVICE)
    elif gate == "sample":
        args["gate"] = torch.rand(lead[0], *([1] * len(lead)), dtype=torch.float64, device=DEVICE)
    return args


def run_parity(args, dtype, scaling=0.75, grads=("x", "lora_A", "lora_B"), op_kwargs=None, ref_kwargs=None, **kw):
    grads = list(grads) + (["gate"] if args.get("gate") is not None else [])
    return check_parity(peftops.lora_linear, reference.lora_linear, args, grads, dtype,
                        op_kwargs=op_kwargs or dict(scaling=scaling), ref_kwargs=ref_kwargs or dict(scaling=scaling),
                        **kw)


SHAPES = [  # (leading dims, in, out, r)
    ((37,), 67, 129, 7),
    ((2, 19), 33, 40, 1),
    ((1,), 16, 16, 16),
    ((2, 3, 5), 24, 31, 12),
    ((70,), 130, 65, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
def test_parity_shapes(lead, n_in, n_out, r, dtype):
    run_parity(lora_args(lead, n_in, n_out, r), dtype)


@pytest.mark.parametrize("gate", ["token", "sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_gate(gate, dtype):
    run_parity(lora_args((3, 13), 45, 29, 6, gate=gate), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_noncontiguous_no_bias(dtype):
    args = lora_args((2, 11), 40, 52, 5, bias=False, noncontig=True)
    assert not args["x"].is_contiguous()
    run_parity(args, dtype)


def test_parity_transposed_weight():
    """A weight given as a transposed view (GPT-2 Conv1D stores [in, out])."""
    args = lora_args((21,), 36, 44, 3)
    args["weight"] = args["weight"].t().contiguous().t()
    run_parity(args, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_trainable_base(dtype):
    run_parity(lora_args((2, 9), 30, 27, 4, gate="token"), dtype,
               grads=("x", "weight", "bias", "lora_A", "lora_B"))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1)], ids=str)
def test_zero_and_one_rows(lead):
    torch.manual_seed(1)  # one row's dgate is one sum of r = 3 products: see test_paths_lora.py's twin
    args = lora_args(lead, 20, 24, 3, gate="token")
    copies = {k: copy_as(v, torch.float32, k != "weight") for k, v in args.items()}
    args = {k: v.requires_grad_(k != "weight") for k, v in args.items()}
    y = peftops.lora_linear(**copies, scaling=0.5)
    ref = reference.lora_linear(**args, scaling=0.5)
    assert y.shape == (*lead, 24)
    assert_close("y", y, ref, BOUNDS[torch.float32])
    y.sum().backward()
    ref.sum().backward()
    for name in ("x", "lora_A", "lora_B", "gate", "bias"):
        assert_close(f"d{name}", copies[name].grad, args[name].grad, BOUNDS[torch.float32])


def test_tf32_follows_matmul_precision():
    torch.set_float32_matmul_precision("high")
    run_parity(lora_args((33,), 64, 48, 8), torch.float32, bound=TF32_BOUND)


@settings(max_examples=12, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3), n_in=st.integers(1, 70),
       n_out=st.integers(1, 70), r=st.integers(1, 20), bias=st.booleans(),
       gate=st.sampled_from([None, "token", "sample"]),
       scaling=st.floats(0.05, 4) | st.floats(-4, -0.05))  # fp32 cannot hold s * grad for |s| ~ 1e-50
def test_parity_hypothesis(lead, n_in, n_out, r, bias, gate, scaling):
    run_parity(lora_args(tuple(lead), n_in, n_out, r, bias=bias, gate=gate), torch.float32, scaling=scaling)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("lead", [(2, 17), (75,)], ids=["S-in-GEMM", "S-skinny-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_same_mask_forward_and_backward(dtype, lead):
    """The fused op regenerates the mask from its seed in backward; the float64 reference
    given that mask must agree on the output and on dx, dA, dB, dgate. Both forward paths:
    S computed inside the GEMM (few rows) and S from its own pass (more rows)."""
    p = 0.3
    args = lora_args(lead, 41, 23, 5, gate="token")
    torch.manual_seed(1234)
    seed = int(new_seed())
    rows = math.prod(lead)
    mask = dropout_mask(seed, (rows, 41), p, DEVICE).view(*lead, 41).double()
    torch.manual_seed(1234)  # the op draws the same seed
    run_parity(args, dtype, grads=("x", "lora_A", "lora_B"),
               op_kwargs=dict(scaling=0.75, dropout_p=p),
               ref_kwargs=dict(scaling=0.75, dropout_p=p, dropout_mask=mask))


def test_dropout_mask_rate_and_seed():
    p = 0.25
    m = dropout_mask(7, (128, 96), p, DEVICE)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - (1 - p)) < 0.01  # 12288 draws: sd of the rate ~0.004
    assert torch.equal(m, dropout_mask(7, (128, 96), p, DEVICE))
    assert not torch.equal(m, dropout_mask(8, (128, 96), p, DEVICE))


def test_dropout_changes_between_calls_and_is_seeded():
    args = {k: copy_as(v, torch.float32) for k, v in lora_args((9,), 32, 16, 4).items()}
    torch.manual_seed(0)
    y1 = peftops.lora_linear(**args, scaling=1.0, dropout_p=0.5)
    y2 = peftops.lora_linear(**args, scaling=1.0, dropout_p=0.5)
    torch.manual_seed(0)
    y3 = peftops.lora_linear(**args, scaling=1.0, dropout_p=0.5)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y3)


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("rows,skinny", [(5, 2), (80, 3)])
def test_kernels_ran_not_reference(rows, skinny):
    """The kernel path's launches (forced: on CUDA the table picks cublas; each path's own
    launches are counted in tests/test_paths_lora.py)."""
    args = {k: copy_as(v, torch.float32, k == "x") for k, v in lora_args((rows,), 16, 16, 2).items()}
    with peftops.force_path("lora", "kernel"):
        peftops.lora_linear(**args, scaling=1.0).sum().backward()
    counts = peftops.dispatch_counts()
    assert counts.get("lora.triton") == 1 and "lora.reference" not in counts
    assert counts.get("launch.lora_gemm") == 2  # forward GEMM + dx GEMM
    # (dY B, dB), dA; plus S = x A^T's own pass above FUSE_S_MAX_ROWS rows
    assert counts.get("launch.lora_skinny") == skinny


def test_repeatable_bitwise():
    args = {k: copy_as(v, torch.float32, k in ("x", "lora_A", "lora_B"))
            for k, v in lora_args((40,), 50, 30, 6).items()}
    grads = []
    for _ in range(2):
        for t in args.values():
            t.grad = None if t is not None else None
        peftops.lora_linear(**args, scaling=1.0).square().sum().backward()
        grads.append([args[k].grad.clone() for k in ("x", "lora_A", "lora_B")])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_float64_falls_back_visibly():
    args = lora_args((4,), 8, 8, 2)
    y = peftops.lora_linear(**args, scaling=1.0)
    assert_close("y", y, reference.lora_linear(**args, scaling=1.0), 1e-12)
    assert peftops.dispatch_counts().get("lora.fallback") == 1


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("PEFTOPS_BACKEND", "reference")
    args = {k: copy_as(v, torch.float32) for k, v in lora_args((4,), 8, 8, 2).items()}
    peftops.lora_linear(**args, scaling=1.0)
    assert peftops.dispatch_counts() == {"lora.reference": 1}


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("PEFTOPS_BACKEND", "cuda")
    args = {k: copy_as(v, torch.float32) for k, v in lora_args((4,), 8, 8, 2).items()}
    with pytest.raises(ValueError, match="PEFTOPS_BACKEND"):
        peftops.lora_linear(**args, scaling=1.0)


# ----------------------------------------------------------------------------- bad input
def _good():
    return {k: copy_as(v, torch.float32) for k, v in lora_args((3, 4), 8, 6, 2).items()}


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(x=a["x"][..., :7]), ValueError, r"x has 7 features .*\(3, 4, 7\).*\(6, 8\)"),
    (lambda a: a.update(weight=a["weight"][None]), ValueError, r"weight must have 2 dims.*\(1, 6, 8\)"),
    (lambda a: a.update(bias=a["bias"][:5]), ValueError, r"bias has shape \(5,\)"),
    (lambda a: a.update(lora_A=a["lora_A"][:0]), ValueError, r"r = 0"),
    (lambda a: a.update(lora_A=a["lora_A"][:, :5]), ValueError, r"lora_A has shape \(2, 5\)"),
    (lambda a: a.update(lora_B=a["lora_B"][:, :1]), ValueError, r"lora_B has shape \(6, 1\), expected \[6, 2\]"),
    (lambda a: a.update(lora_B=a["lora_B"].half()), TypeError, r"lora_B has dtype torch.float16"),
    (lambda a: a.update(x=a["x"].long()), TypeError, r"x must be a floating-point"),
    (lambda a: a.update(x=a["x"].cpu().numpy()), TypeError, r"x must be a torch.Tensor"),
    (lambda a: a.update(gate=torch.rand(3, 4, 2, device=DEVICE)), ValueError,
     r"gate with shape \(3, 4, 2\) does not broadcast to \(3, 4, 1\)"),
    (lambda a: a.update(gate=torch.rand(5, 1, 1, device=DEVICE)), ValueError, r"gate with shape \(5, 1, 1\)"),
    (lambda a: a.update(gate=torch.rand(3, 4, 1, device="meta")), ValueError, r"gate is on meta"),
    (lambda a: a.update(scaling=float("nan")), ValueError, r"scaling must be finite"),
    (lambda a: a.update(scaling=float("inf")), ValueError, r"scaling must be finite"),
    (lambda a: a.update(scaling=torch.tensor(1.0)), TypeError, r"scaling must be a Python float"),
    (lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, r"weight is on meta"),
])
def test_bad_input(mutate, exc, match):
    args = dict(_good(), scaling=1.0)
    mutate(args)
    with pytest.raises(exc, match=match):
        peftops.lora_linear(**args)


# ----------------------------------------------------------------------------- module vs peft
def _peft_lora(base, r, alpha, **cfg):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    return PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha, **cfg), r=r, lora_alpha=alpha, **cfg)


def _randomise_b(*layers):
    for name, p in layers[0].named_parameters():
        if "lora_B" in name or "lora_A" in name:
            new = torch.randn_like(p) * 0.3
            for layer in layers:
                dict(layer.named_parameters())[name].data.copy_(new)


@pytest.mark.parametrize("use_rslora,lora_bias,bias", [(False, False, True), (True, False, False), (False, True, True)])
def test_module_matches_peft(use_rslora, lora_bias, bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 29, bias=bias).to(DEVICE)
    ours = peftops.LoraLinear(base, "default", r=7, lora_alpha=14, use_rslora=use_rslora, lora_bias=lora_bias)
    theirs = _peft_lora(base, 7, 14, use_rslora=use_rslora, lora_bias=lora_bias)
    assert ours.base_layer.weight is base.weight
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomise_b(ours, theirs)
    x = torch.randn(3, 5, 37, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert_close("y", ya, yb, 1e-5)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close("dx", xa.grad, xb.grad, 1e-5)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert_close(f"d{name}", pa.grad, pb.grad, 1e-5)


def test_module_several_adapters_and_switching():
    from peft import LoraConfig

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20).to(DEVICE)
    ours = peftops.LoraLinear(base, "a", r=4, lora_alpha=8)
    theirs = _peft_lora(base, 4, 8)
    theirs.update_layer("a", r=4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8))
    del theirs.lora_A["default"], theirs.lora_B["default"], theirs.lora_dropout["default"]
    ours.update_layer("b", r=3, lora_alpha=5)
    theirs.update_layer("b", r=3, lora_alpha=5, config=LoraConfig(r=3, lora_alpha=5))
    _randomise_b(ours, theirs)
    x = torch.randn(6, 24, device=DEVICE)
    for active in (["a"], ["b"], ["a", "b"]):
        ours.set_adapter(active)
        theirs.set_adapter(active)
        assert_close(f"y{active}", ours(x), theirs(x), 1e-5)
    ours.enable_adapters(False)
    assert torch.equal(ours(x), base(x))


def test_module_dropout_several_adapters_trains():
    base = torch.nn.Linear(16, 16).to(DEVICE)
    m = peftops.LoraLinear(base, "a", r=2, lora_alpha=2, lora_dropout=0.1)
    m.update_layer("b", r=3, lora_alpha=3, lora_dropout=0.2)
    m.set_adapter(["a", "b"])
    _randomise_b(m)
    m.train()
    x = torch.randn(4, 16, device=DEVICE)
    m(x).sum().backward()
    for name in ("a", "b"):
        assert m.lora_A[name].weight.grad.abs().sum() > 0
    m.eval()  # no dropout in eval: equals the explicit formula
    expect = base(x) + sum(m.lora_B[a](m.lora_A[a](x)) * m.scaling[a] for a in ("a", "b"))
    assert_close("eval y", m(x), expect, 1e-5)


def test_module_merge_unmerge_round_trip():
    torch.manual_seed(0)
    base = torch.nn.Linear(33, 21).to(DEVICE)
    w0 = base.weight.detach().clone()
    m = peftops.LoraLinear(base, "default", r=5, lora_alpha=10, lora_bias=True)
    _randomise_b(m)
    with torch.no_grad():
        m.lora_B["default"].bias.normal_()
    x = torch.randn(7, 33, device=DEVICE)
    y = m(x)
    m.merge()
    assert m.merged and base.weight is m.base_layer.weight
    assert_close("merged y", m(x), y, 1e-5)
    assert_close("W + s B A", base.weight, reference.lora_merge(w0, m.lora_A["default"].weight,
                                                                m.lora_B["default"].weight, m.scaling["default"]), 1e-6)
    m.unmerge()
    assert not m.merged
    assert_close("unmerged W", base.weight, w0, 1e-6)
    assert_close("unmerged y", m(x), y, 1e-5)


def test_module_fan_in_fan_out_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(18, 26).to(DEVICE)  # weight [in=26, out=18]
    ours = peftops.LoraLinear(base, "default", r=3, lora_alpha=6, fan_in_fan_out=True)
    theirs = _peft_lora(base, 3, 6, fan_in_fan_out=True)
    _randomise_b(ours, theirs)
    x = torch.randn(2, 4, 26, device=DEVICE)
    y = theirs(x)
    assert_close("y", ours(x), y, 1e-5)
    ours.merge()  # base is shared: peft's layer now sees the merged weight too
    assert_close("merged y", ours(x), y, 1e-5)
    ours.unmerge()
    assert_close("unmerged y", theirs(x), y, 1e-5)


def test_module_peft_init_and_bad_args():
    base = torch.nn.Linear(10, 12, device=DEVICE)
    m = peftops.LoraLinear(base, r=4, lora_alpha=8)
    assert torch.count_nonzero(m.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(10)  # kaiming_uniform(a=sqrt(5)) on fan_in 10
    assert m.lora_A["default"].weight.abs().max() <= bound
    assert m.scaling["default"] == 2.0
    assert peftops.LoraLinear(base, r=4, lora_alpha=8, use_rslora=True).scaling["default"] == 4.0
    with pytest.raises(ValueError, match="r must be a positive int"):
        peftops.LoraLinear(base, r=0)
    with pytest.raises(ValueError, match="unknown adapter"):
        m.set_adapter("nope")
    with pytest.raises(TypeError, match="2-D weight"):
        peftops.LoraLinear(torch.nn.ReLU())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """The launchers are torch custom ops: a compiled graph holds them without a break, and
    the kernels (not the reference) run inside it. Inductor also checks the fake kernels'
    shapes and strides against the real ones."""
    args = {k: copy_as(v, torch.float32, k in ("x", "lora_A", "lora_B"))
            for k, v in lora_args((2, 7), 24, 20, 3, gate="token").items()}
    torch._dynamo.reset()
    fn = torch.compile(lambda **a: peftops.lora_linear(**a, scaling=0.5), fullgraph=True, backend=backend)
    y = fn(**args)
    y.square().sum().backward()
    got = [args[k].grad.clone() for k in ("x", "lora_A", "lora_B")]
    counts = peftops.dispatch_counts()
    # y and dx: one rank-r GEMM step each, on either path (our GEMM, or cuBLAS + the rank-r
    # add); dA and dY B: two skinny passes (plus S's own pass before a rank-r add).
    assert counts.get("launch.lora_gemm", 0) + counts.get("launch.lora_rank_add", 0) == 2, counts
    assert counts.get("launch.lora_skinny", 0) >= 2, counts
    for t in args.values():
        t.grad = None
    ref = peftops.lora_linear(**args, scaling=0.5)
    ref.square().sum().backward()
    assert_close("y", y, ref, 1e-6)
    for k, g in zip(("x", "lora_A", "lora_B"), got):
        assert_close(f"d{k}", g, args[k].grad, 1e-6)


# ----------------------------------------------------------------------------- GPU-sized
@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("gate", [None, "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", table_paths(lora_ops))
def test_gpu_sized(path, dtype, gate):
    """T = 4096 rows (2 x 2048), d = 1024, r = 16, each path: output and every gradient; fp32
    under tf32 at TF32_BOUND, bf16 within 1.5x eager bf16's error (parity.large_case)."""
    if dtype == torch.float32:
        torch.set_float32_matmul_precision("high")
    with forced_path("lora", path):
        run_parity(lora_args((2, 2048), 1024, 1024, 16, gate=gate), dtype, **large_case(dtype))
