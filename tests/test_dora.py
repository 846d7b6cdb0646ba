"""DoRA: ``peftops.dora_linear``, ``LoraLinear(use_dora=True)`` and ``accelerate`` on peft's
DoRA layers, vs the float64 reference and vs peft's own DoRA layer.

Outputs and every gradient (x, lora_A, lora_B, the magnitude) by relative norm error:
fp32 (IEEE dots) 1e-5; bf16 / fp16 bounded by peft's own error in that dtype against its
float64 run (``eager_bound``: ours <= 1.5x peft's + 1e-3), never looser than the plain bound.

Rounding of the row-norm identity vs peft's direct form (``test_identity_rounding_vs_direct``,
measured on a bad case: ||W_i|| ~ 5.7 against s ||(B A)_i|| ~ 1e-3, in = 512; error of
n - ||W||, the adapter's effect on the norm, vs float64 on the same rounded inputs): the
identity (fp32 accumulation over the exact bf16 / fp16 W) is at the fp32 floor in every
dtype (4.2e-3 / 4.3e-3 / 4.2e-3 for fp32 / bf16 / fp16: n's own ulp against a delta of
~1e-4); peft's direct form is at the same floor in fp32 (3.8e-3) but in bf16 / fp16 rounds
W + s B A element by element to the half type first and loses the delta (1.9e+2 / 2.2e+1).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftops
from peftops import reference
from peftops.ops.dora import DoraNormCache, dora_weight_norm, norm_rows
from peftops.ops.lora import dropout_mask

from parity import BOUNDS, DEVICE, assert_close, copy_as, eager_bound, randn, rel_err

pytestmark = pytest.mark.usefixtures("seed_per_test")

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def dora_args(lead, n_in, n_out, r, *, bias=True, scale_m=0.1):
    x = randn(*lead, n_in)
    w = randn(n_out, n_in, scale=n_in ** -0.5)
    b = randn(n_out) if bias else None
    a = randn(r, n_in, scale=n_in ** -0.5)
    bb = randn(n_out, r, scale=0.5)
    return x, w, b, a, bb


def magnitude_for(w, a, bb, scaling):
    n = reference.dora_weight_norm(w, a, bb, scaling)
    return n * (1 + 0.2 * torch.randn_like(n))


def run_op_parity(lead, n_in, n_out, r, dtype, scaling=0.75, bias=True, adapter_dtype=None):
    x, w, b, a, bb = dora_args(lead, n_in, n_out, r, bias=bias)
    m = magnitude_for(w, a, bb, scaling)
    ad = adapter_dtype or dtype
    # float64 reference
    ref_in = [t.clone().requires_grad_() for t in (x, a, bb, m)]
    y_ref = reference.dora_linear(ref_in[0], w, b, ref_in[1], ref_in[2], ref_in[3], scaling)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    # the reference (peft's form) in the low dtype: the eager error that bounds half precision
    low_in = [copy_as(x, dtype, True), copy_as(a, ad, True), copy_as(bb, ad, True), copy_as(m, ad, True)]
    y_low = reference.dora_linear(low_in[0], copy_as(w, dtype), copy_as(b, dtype), low_in[1], low_in[2], low_in[3],
                                  scaling)
    y_low.backward(dy.to(dtype))
    ours = [copy_as(x, dtype, True), copy_as(a, ad, True), copy_as(bb, ad, True), copy_as(m, ad, True)]
    y = peftops.dora_linear(ours[0], copy_as(w, dtype), copy_as(b, dtype), ours[1], ours[2], ours[3], scaling)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype and y.shape == y_ref.shape
    base = BOUNDS[dtype]
    for name, o, e, r_ in [("y", y, y_low, y_ref)] + [
            (n, t.grad, tl.grad, tr.grad) for n, t, tl, tr in zip(("x", "lora_A", "lora_B", "magnitude"),
                                                                   ours, low_in, ref_in)]:
        bound = base if dtype == torch.float32 else eager_bound(base, e, r_)
        assert_close(name, o, r_, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,n_in,n_out,r", [((37,), 67, 129, 7), ((2, 5), 64, 48, 1), ((21,), 129, 37, 16)])
def test_op_parity(lead, n_in, n_out, r, dtype):
    run_op_parity(lead, n_in, n_out, r, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_fp32_adapters_over_half_base(dtype):
    """peft's default: adapters and magnitude in fp32 over a half base."""
    run_op_parity((19,), 67, 40, 7, dtype, adapter_dtype=torch.float32, bias=False)


@pytest.mark.parametrize("path", ["kernel", "cublas"])
def test_op_paths(path):
    with peftops.force_path("dora", path):
        run_op_parity((33,), 67, 65, 7, torch.float32)
    counts = peftops.dispatch_counts()
    assert counts.get(f"dora.path:{path}", 0) >= 1
    assert counts.get("launch.dora_norm", 0) >= 1 and counts.get("launch.dora_grad", 0) >= 1
    assert counts.get("launch.lora_gemm" if path == "kernel" else "launch.lora_rank_add", 0) >= 1


def test_zero_rows_and_noncontiguous():
    x, w, b, a, bb = dora_args((0,), 40, 24, 3)
    m = magnitude_for(w, a, bb, 1.0)
    xs = x.float().requires_grad_()
    ms = m.float().requires_grad_()
    y = peftops.dora_linear(xs, w.float(), b.float(), a.float(), bb.float(), ms, 1.0)
    y.sum().backward()
    assert y.shape == (0, 24) and ms.grad.abs().sum() == 0
    # non-contiguous x and a transposed (Conv1D-style) weight view
    x = randn(9, 40, noncontig=True).float()
    wt = w.float().t().contiguous().t()
    y = peftops.dora_linear(x, wt, b.float(), a.float(), bb.float(), m.float(), 1.0)
    ref = reference.dora_linear(x.double(), w, b, a, bb, m, 1.0)
    assert_close("y", y, ref, 1e-5)


def test_zero_magnitude_column_gradient():
    """m_j = 0: y - b carries no u there, so that column's u is recomputed from x, W_j, S."""
    x, w, b, a, bb = dora_args((13,), 33, 20, 4)
    m = magnitude_for(w, a, bb, 0.5)
    m[3] = 0.0
    ref_m = m.clone().requires_grad_()
    reference.dora_linear(x, w, b, a, bb, ref_m, 0.5).pow(2).sum().backward()
    ms = m.float().requires_grad_()
    peftops.dora_linear(x.float(), w.float(), b.float(), a.float(), bb.float(), ms, 0.5).pow(2).sum().backward()
    assert_close("magnitude", ms.grad, ref_m.grad, 1e-5)
    assert ms.grad[3] != 0


def test_dropout_training_matches_reference_with_our_mask():
    """dropout > 0 (training): the direction's base part on drop(x), as peft; the same draw
    as the reference by re-drawing the seed the op took from torch's generator."""
    x, w, b, a, bb = dora_args((17,), 48, 36, 5)
    m = magnitude_for(w, a, bb, 0.5)
    p = 0.3
    ours = [copy_as(t, torch.float32, True) for t in (x, a, bb, m)]
    torch.manual_seed(123)
    y = peftops.dora_linear(ours[0], w.float(), b.float(), ours[1], ours[2], ours[3], 0.5, dropout_p=p)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
    mask = dropout_mask(seed, (17, 48), p, DEVICE).double()
    assert 0 < mask.mean() < 1
    ref_in = [t.clone().requires_grad_() for t in (x, a, bb, m)]
    y_ref = reference.dora_linear(ref_in[0], w, b, ref_in[1], ref_in[2], ref_in[3], 0.5, dropout_p=p, dropout_mask=mask)
    dy = torch.randn_like(y_ref)
    y.backward(dy.float())
    y_ref.backward(dy)
    assert_close("y", y, y_ref, 1e-5)
    for name, o, r_ in zip(("x", "lora_A", "lora_B", "magnitude"), ours, ref_in):
        assert_close(name, o.grad, r_.grad, 1e-5)
    assert peftops.dispatch_counts().get("launch.dora_composed", 0) == 1


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda k: k.update(magnitude=k["magnitude"][:-1]), ValueError, r"magnitude has shape \(23,\).*\[24\]"),
    (lambda k: k.update(magnitude=k["magnitude"][:, None]), ValueError, "magnitude"),
    (lambda k: k.update(magnitude=k["magnitude"].half()), TypeError, "magnitude has dtype"),
    (lambda k: k.update(lora_B=k["lora_B"][:, :2]), ValueError, "lora_B has shape"),
    (lambda k: k.update(scaling=float("nan")), ValueError, "scaling"),
])
def test_bad_input(mutate, exc, match):
    x, w, b, a, bb = [t.float() for t in dora_args((5,), 16, 24, 3)]
    kw = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, magnitude=torch.ones(24, device=DEVICE), scaling=1.0)
    mutate(kw)
    with pytest.raises(exc, match=match):
        peftops.dora_linear(**kw)


# ---------------------------------------------------------------------------- the norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_identity_and_cache(dtype):
    """n by the identity (vs the direct norm in float64 of the same rounded inputs; half W is
    exact in the kernel's tf32 dots, which round A), ||W||^2 kept, n kept while W, A, B are."""
    tol = 1e-6 if dtype == torch.float32 else 1e-4
    x, w, b, a, bb = [t.to(dtype) for t in dora_args((1,), 129, 67, 7)]
    n_ref = reference.dora_weight_norm(w.double(), a.double(), bb.double(), 0.3)
    n, wsq = norm_rows(w, a, bb, 0.3)
    assert_close("n", n, n_ref, tol)
    assert_close("wsq", wsq, w.double().pow(2).sum(1), 1e-6)
    n2, _ = norm_rows(w, a, bb, 0.3, wsq)                                        # ||W||^2 reused
    assert torch.equal(n, n2)
    cache = DoraNormCache()
    peftops.reset_dispatch_counts()
    dora_weight_norm(w, a, bb, 0.3, norm_cache=cache)
    dora_weight_norm(w, a, bb, 0.3, norm_cache=cache)                             # n reused: no launch
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dora_norm") == 1 and counts.get("variant.dora_norm:row_sq") == 1
    with torch.no_grad():
        a.mul_(1.5)                                                               # A's version moves
    assert_close("n", dora_weight_norm(w, a, bb, 0.3, norm_cache=cache),
                 reference.dora_weight_norm(w.double(), a.double(), bb.double(), 0.3), tol)
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dora_norm") == 2 and counts.get("variant.dora_norm:row_sq") == 1  # ||W||^2 kept
    w.data = w.data * 2                                                          # a new storage: W changed
    assert_close("n", dora_weight_norm(w, a, bb, 0.3, norm_cache=cache),
                 reference.dora_weight_norm(w.double(), a.double(), bb.double(), 0.3), tol)
    assert peftops.dispatch_counts().get("variant.dora_norm:row_sq") == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identity_rounding_vs_direct(dtype):
    """Large ||W|| against a small s B A: the identity's n - ||W|| (what the adapter does to
    the norm) against peft's direct form ||W + s B A|| in the same dtype, both vs float64."""
    n_in, n_out, r = 512, 64, 8
    w = randn(n_out, n_in, scale=0.25)
    a = randn(r, n_in, scale=n_in ** -0.5)
    bb = randn(n_out, r, scale=1e-3)
    s = 0.5
    wl, al, bl = w.to(dtype), a.to(dtype), bb.to(dtype)
    exact = reference.dora_weight_norm(wl.double(), al.double(), bl.double(), s)
    base = wl.double().norm(dim=1)
    ours = norm_rows(wl, al, bl, s)[0].double()
    direct = torch.linalg.norm(wl + s * (bl @ al), dim=1).double()                # peft's get_weight_norm
    err_ours = rel_err(ours - base, exact - base)
    err_direct = rel_err(direct - base, exact - base)
    print(f"{dtype}: identity {err_ours:.2e}, direct {err_direct:.2e}")
    assert err_ours < 1e-2                        # the fp32 floor: n's own rounding (~5e-7 on n ~ 5.7)
    if dtype == torch.float32:
        assert err_ours <= 2 * err_direct         # both at that floor
    else:
        assert err_direct > 10 * err_ours         # the half sum W + s B A has rounded s B A away


# ---------------------------------------------------------------------------- memory
class _FreshStorages(TorchDispatchMode):
    """Records the size (elements) of every fresh storage an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.sizes.append((str(func), t.untyped_storage().nbytes() // max(t.element_size(), 1)))
        return out


def _peft_dora(base, r=4, dropout=0.0, seed=0, **cfg):
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                           use_dora=True, lora_dropout=dropout, **cfg))
    with torch.no_grad():
        for n, p_ in model.named_parameters():
            if "lora_B" in n:
                p_.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p_.mul_(1 + 0.1 * torch.randn_like(p_))
    return model


@pytest.mark.parametrize("which,dropout", [("peftops", 0.0), ("peftops", 0.2), ("peft", 0.0)])
def test_no_out_by_in_tensor_in_forward_backward(which, dropout):
    """One DoRA forward + backward creates no storage of [out, in] size or more (T, r small
    against in, out), with dropout (the composed path) or not; peft's own layer does (B A
    and W + s B A), so the check can fail."""
    T, n_in, n_out = 8, 64, 96
    model = _peft_dora(nn.Linear(n_in, n_out).to(DEVICE), dropout=dropout).train()
    if which == "peftops":
        peftops.accelerate(model)
    x = torch.randn(T, n_in, device=DEVICE, requires_grad=True)
    rec = _FreshStorages()
    with rec:
        model(x).pow(2).sum().backward()
    big = [(f, n) for f, n in rec.sizes if n >= n_in * n_out]
    if which == "peftops":
        assert not big, big
        assert peftops.dispatch_counts().get("launch.dora_norm", 0) >= 1
    else:
        assert big


# ---------------------------------------------------------------------------- vs peft's layer
def _compare_models(peft_model, dtype, x64, train=False):
    """peft's model in float64 (the truth) and in ``dtype`` (its own error), ours (accelerated
    copy) in ``dtype``: output and every trainable gradient."""
    m64 = copy.deepcopy(peft_model).double()
    mlow = copy.deepcopy(peft_model).to(dtype)
    ours = peftops.accelerate(copy.deepcopy(peft_model).to(dtype))
    assert not ours.peftops_summary.left, ours.peftops_summary.left
    for m in (m64, mlow, ours):
        m.train(train)
    outs = {}
    dy = torch.randn(*x64.shape[:-1], m64(x64).shape[-1], dtype=torch.float64, device=DEVICE)
    for key, m, dt in (("ref", m64, torch.float64), ("low", mlow, dtype), ("ours", ours, dtype)):
        x = x64.detach().to(dt).requires_grad_()
        y = m(x)
        y.backward(dy.to(dt))
        grads = {n: p_.grad for n, p_ in m.named_parameters() if p_.requires_grad}
        outs[key] = (y, x.grad, grads)
    base = BOUNDS[dtype]
    names = ["y", "x"] + sorted(outs["ref"][2])
    vals = {k: [outs[k][0], outs[k][1]] + [outs[k][2][n] for n in names[2:]] for k in outs}
    assert any("lora_magnitude_vector" in n for n in names)
    for i, name in enumerate(names):
        bound = base if dtype == torch.float32 else eager_bound(base, vals["low"][i], vals["ref"][i])
        assert_close(name, vals["ours"][i], vals["ref"][i], bound)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r,rslora,bias", [(1, False, True), (7, True, False), (16, False, True)])
def test_accelerated_matches_peft_dora(r, rslora, bias, dtype):
    model = _peft_dora(nn.Linear(67, 37, bias=bias).to(DEVICE), r=r, use_rslora=rslora)
    ours = _compare_models(model, dtype, randn(3, 7, 67))
    counts = peftops.dispatch_counts()
    assert counts.get("dora.triton", 0) >= 1 and counts.get("launch.dora_grad", 0) >= 1
    assert "accelerate.lora.peft_forward" not in counts
    assert type(ours.base_model.model[0]).__name__ == "PeftopsLoraLinear"


def test_accelerated_eval_with_dropout_reuses_base():
    """Eval with lora_dropout > 0: no dropout, the fused path (peft reuses the base result)."""
    model = _peft_dora(nn.Linear(48, 40).to(DEVICE), r=4, dropout=0.3)
    _compare_models(model, torch.float32, randn(11, 48), train=False)
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dora_composed", 0) == 0 and counts.get("launch.dora_grad", 0) >= 1


def test_accelerated_train_dropout_zero():
    model = _peft_dora(nn.Linear(48, 40).to(DEVICE), r=4, dropout=0.0)
    _compare_models(model, torch.float32, randn(11, 48), train=True)


def test_accelerated_fan_in_fan_out_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = _peft_dora(Conv1D(37, 53).to(DEVICE), r=5, fan_in_fan_out=True)
    _compare_models(model, torch.float32, randn(9, 53))


def _two_adapters(kinds):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 33)).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=kinds[0] == "dora"))
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["0"], use_dora=kinds[1] == "dora"))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for n, p_ in model.named_parameters():
            if "lora_B" in n:
                p_.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p_.mul_(1 + 0.1 * torch.randn_like(p_))
    for p_ in model.parameters():
        p_.requires_grad_(False)
    for n, p_ in model.named_parameters():
        if "lora_" in n:
            p_.requires_grad_(True)
    return model


@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora")])
def test_two_adapters_match_peft(kinds):
    """Both active: peft applies each in order on the running result; ours the same."""
    model = _two_adapters(kinds)
    assert model.base_model.model[0].active_adapters == ["default", "second"]
    _compare_models(model, torch.float32, randn(10, 40))


def test_merge_unmerge_then_forward():
    """merge (W <- (m/n)(W + s B A), written through .data), forward = peft's; unmerge, forward
    again: the cached norms were dropped, so the unmerged (re-rounded) W is what is used."""
    model = _peft_dora(nn.Linear(40, 24).to(DEVICE), r=4)
    ref = copy.deepcopy(model).eval()
    ours = peftops.accelerate(copy.deepcopy(model)).eval()
    x = torch.randn(6, 40, device=DEVICE)
    with torch.no_grad():
        assert_close("y", ours(x), ref(x), 1e-5)
        for m in (ref, ours):
            m.merge_adapter()
        assert_close("y merged", ours(x), ref(x), 1e-5)
        for m in (ref, ours):
            m.unmerge_adapter()
        peftops.reset_dispatch_counts()
        assert_close("y unmerged", ours(x), ref(x), 1e-5)
        assert peftops.dispatch_counts().get("variant.dora_norm:row_sq") == 1     # recomputed, not stale


def test_pickled_model_drops_the_cache():
    import io

    model = peftops.accelerate(_peft_dora(nn.Linear(40, 24).to(DEVICE), r=4)).eval()
    x = torch.randn(6, 40, device=DEVICE)
    with torch.no_grad():
        y = model(x)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert_close("y", again(x), y, 1e-6)


def test_cache_in_eval_and_state_dict_load():
    """Eval: the second call reuses n (no norm launch); load_state_dict into W moves its
    version counter: recomputed."""
    model = peftops.accelerate(_peft_dora(nn.Linear(40, 24).to(DEVICE), r=4)).eval()
    x = torch.randn(6, 40, device=DEVICE)
    with torch.no_grad():
        y1 = model(x)
        peftops.reset_dispatch_counts()
        assert torch.equal(model(x), y1)
        assert peftops.dispatch_counts().get("launch.dora_norm", 0) == 0
        lin = model.base_model.model[0]
        sd = {k: v * 1.1 if k == "weight" else v for k, v in lin.base_layer.state_dict().items()}
        lin.base_layer.load_state_dict(sd)
        ref = copy.deepcopy(model)
        peftops.deaccelerate(ref)
        assert_close("y", model(x), ref(x), 1e-5)
        assert peftops.dispatch_counts().get("variant.dora_norm:row_sq") == 1


def test_summary_and_kernels_on_a_model():
    """A tiny Llama with DoRA on every projection: every DoRA layer swapped, none left."""
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]))
    ref = copy.deepcopy(model)
    _, summary = peftops.accelerate(model, return_summary=True)
    assert len(summary.swapped) == 7 and not summary.left
    assert "DoraLinearVariant" not in str(summary)
    ids = torch.randint(0, 64, (2, 5), device=DEVICE)
    assert_close("logits", model(ids).logits, ref(ids).logits, 1e-4)
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dora_norm", 0) >= 7 and counts.get("dora.triton", 0) >= 7


# ---------------------------------------------------------------------------- our module
def test_module_matches_peft_and_state_dict_keys():
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(DEVICE)
    peft_model = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    ours = peftops.LoraLinear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
    peft_layer = peft_model.base_model.model[0]
    assert set(ours.state_dict()) == set(peft_layer.state_dict())
    assert_close("magnitude init", ours.lora_magnitude_vector["default"].weight,
                 peft_layer.lora_magnitude_vector["default"].weight, 1e-6)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.3)
        peft_layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    ours.load_state_dict(peft_layer.state_dict())
    x = torch.randn(7, 40, device=DEVICE)
    assert_close("y", ours(x), peft_layer(x), 1e-5)
    # merge / unmerge of our own module = peft's
    with torch.no_grad():
        y = ours(x)
        ours.merge()
        assert_close("merged", ours(x), y, 1e-5)
        ours.unmerge()
        assert_close("unmerged", ours(x), y, 1e-5)
    with pytest.raises(ValueError, match="lora_bias"):
        peftops.LoraLinear(base, r=4, use_dora=True, lora_bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["kernel", "cublas"])
def test_many_rows_half_column_scale_in_both_gemms(path, dtype):
    """T = 300 rows of a half base: the persistent TMA GEMM (``kernel``, S fused) or cuBLAS +
    the rank-r add (``cublas``) carry m / n in their epilogue; dx runs the same GEMMs."""
    with peftops.force_path("dora", path), peftops.force_path("lora", path):
        run_op_parity((300,), 64, 80, 16, dtype)
    counts = peftops.dispatch_counts()
    assert counts.get("launch.lora_gemm_tma" if path == "kernel" else "launch.lora_rank_add", 0) >= 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """The norm pass, forward and backward are torch custom ops: one graph, kernels inside."""
    x, w, b, a, bb = dora_args((2, 7), 24, 20, 3)
    m = magnitude_for(w, a, bb, 0.5)
    args = dict(x=copy_as(x, torch.float32, True), weight=w.float(), bias=b.float(), lora_A=copy_as(a, torch.float32, True),
                lora_B=copy_as(bb, torch.float32, True), magnitude=copy_as(m, torch.float32, True))
    torch._dynamo.reset()
    fn = torch.compile(lambda **k: peftops.dora_linear(**k, scaling=0.5), fullgraph=True, backend=backend)
    y = fn(**args)
    y.square().sum().backward()
    names = ("x", "lora_A", "lora_B", "magnitude")
    got = [args[k].grad.clone() for k in names]
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dora_norm") == 1 and counts.get("launch.dora_grad") == 1, counts
    for t in args.values():
        t.grad = None
    ref = peftops.dora_linear(**args, scaling=0.5)
    ref.square().sum().backward()
    assert_close("y", y, ref, 1e-6)
    for k, g in zip(names, got):
        assert_close(f"d{k}", g, args[k].grad, 1e-6)


def test_e2e_dora_bench_case_small_parity():
    """The e2e bench's DoRA training step (tiny Llama, DoRA on every linear layer): loss and
    every LoRA / magnitude gradient equal to peft's, the DoRA kernels ran in every layer."""
    from peftops.benchmarks import e2e
    from peftops.benchmarks.core import rel_err as bench_rel_err

    (case,) = [c for c in e2e.cases(DEVICE, torch.float32, small=True) if c.op == "e2e_llama_dora_train_step"]
    ref = case.providers["peft"]()()
    got = case.providers["peftops"]()()
    assert len(got) == len(ref) == 1 + 3 * 14  # loss + A, B and the magnitude of 14 layers
    assert bench_rel_err(got, ref) <= 1e-4
    c = peftops.dispatch_counts()
    assert c.get("launch.dora_norm", 0) >= 14 and c.get("launch.dora_grad", 0) >= 14, c


@pytest.mark.cuda_only("GPU-sized shapes: hours in the CPU interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["kernel", "cublas"])
def test_gpu_sized(path, dtype):
    """T = 4096 rows (2 x 2048), d = 1024, r = 16, each path: output and every gradient."""
    with peftops.force_path("dora", path):
        run_op_parity((2, 2048), 1024, 1024, 16, dtype)


@pytest.mark.parametrize("dtype,rows,wide", [(torch.bfloat16, 300, True), (torch.float16, 300, True),
                                             (torch.bfloat16, 300, False), (torch.float32, 300, True),
                                             (torch.bfloat16, 100, True)],
                         ids=["tma-bf16", "tma-fp16", "tma-bf16-128x128", "fp32", "M<=256"])
def test_large_tile_regimes_with_column_scale(dtype, rows, wide, monkeypatch):
    """The big GEMM tiles a GPU takes with m / n in the epilogue (a 4-SM target reaches them at
    small shapes: 128x256 on the TMA GEMM for a half base, 128x256 / 64x128 on lora_gemm_kernel
    for fp32 / <= 256 rows), and plain LoRA at the same tiles, so compile-check compares the
    registers of the column-scale variants with the LoRA ones they extend."""
    from peftops.ops import lora as lora_ops
    from test_lora import lora_args, run_parity

    from peftops.kernels import lora as lora_kernels

    monkeypatch.setattr(lora_ops, "TARGET_SMS", 4)
    monkeypatch.setattr(lora_kernels, "TMA_COLSCALE_WIDE", wide)
    if DEVICE.type == "cuda":
        monkeypatch.setattr(lora_ops, "num_sms", lambda device: 4)
    with peftops.force_path("dora", "kernel"), peftops.force_path("lora", "kernel"):
        run_op_parity((rows,), 16, 264, 4, dtype)
        run_parity(lora_args((rows,), 16, 264, 4), dtype)
    counts = peftops.dispatch_counts()
    tma = dtype != torch.float32 and rows > 256
    assert counts.get("launch.lora_gemm_tma" if tma else "launch.lora_gemm", 0) >= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accelerated_fp32_adapters_over_half_base(dtype):
    """peft's default (autocast_adapter_dtype): A, B and the magnitude in fp32 over a half base;
    the kernels read them as they are. Bounded by peft's own error in that set-up."""
    torch.manual_seed(0)
    base = nn.Linear(67, 37).to(DEVICE, dtype)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=7, lora_alpha=14, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        for n, p_ in model.named_parameters():
            if "lora_B" in n:
                p_.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p_.mul_(1 + 0.1 * torch.randn_like(p_))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    m64 = copy.deepcopy(model).double()
    ours = peftops.accelerate(copy.deepcopy(model))
    x64 = randn(13, 67)
    dy = randn(13, 37)
    res = {}
    for key, m, dt in (("ref", m64, torch.float64), ("low", model, dtype), ("ours", ours, dtype)):
        x = x64.detach().to(dt).clone().requires_grad_()
        y = m(x)
        y.backward(dy.to(y.dtype))
        res[key] = [y, x.grad] + [p_.grad for n, p_ in sorted(m.named_parameters()) if p_.requires_grad]
    assert len(res["ref"]) == 5
    for i, (o, e, r_) in enumerate(zip(res["ours"], res["low"], res["ref"])):
        assert_close(f"output {i}", o, r_, eager_bound(BOUNDS[dtype], e, r_))
    assert peftops.dispatch_counts().get("dora.triton", 0) == 1


def test_trainable_base_weight_and_bias():
    """A base that trains too: dW = (c dY)^T x (the norm is detached), db = sum_t dY."""
    x, w, b, a, bb = dora_args((15,), 33, 21, 4)
    m = magnitude_for(w, a, bb, 0.5)
    ref_in = [t.clone().requires_grad_() for t in (x, w, b, a, bb, m)]
    y_ref = reference.dora_linear(*ref_in[:6], 0.5)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    ours = [copy_as(t, torch.float32, True) for t in (x, w, b, a, bb, m)]
    peftops.dora_linear(*ours, 0.5).backward(dy.float())
    for name, o, r_ in zip(("x", "weight", "bias", "lora_A", "lora_B", "magnitude"), ours, ref_in):
        assert_close(name, o.grad, r_.grad, 1e-5)
