"""Prefix attention's dispatch paths (peftops/ops/prefix_attention.py ``PATHS``): each path
forced, output and every gradient (q, k, v, prefix, gate) vs the float64 reference; the sdpa
path's causal form (dummy query rows), its key-padding-mask form, torch.compile; the table.

tests/test_prefix_attention.py runs the default path of the test device; here every path runs."""
import pytest
import torch

import peftops
from peftops import reference
from peftops.ops.prefix_attention import PATHS
from parity import BOUNDS, DEVICE, DTYPES, TF32_BOUND, assert_close, path_fixture, randn
from test_prefix_attention import CASES, GRADS, pa_args, run_parity

pytestmark = pytest.mark.usefixtures("seed_per_test")

PATH_NAMES = list(PATHS.paths)


path = path_fixture("prefix_attention", PATH_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,T,L,D,causal,shared,gate", CASES)
def test_parity(path, B, Hq, Hkv, T, L, D, causal, shared, gate, dtype):
    run_parity(pa_args(B, Hq, Hkv, T, L, D, shared=shared, gate=gate), dtype, causal)
    assert peftops.dispatch_counts().get(f"prefix_attention.path:{path}") == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,Hq,Hkv,T,L,D", [(1, 8, 2, 67, 13, 16), (2, 3, 3, 1, 37, 8), (1, 2, 1, 129, 5, 12)])
def test_parity_sdpa_odd_shapes(B, Hq, Hkv, T, L, D, causal, dtype):
    """GQA 4, MHA with T = 1 and L > T, T = 129 past a block edge, D = 12: causal and not."""
    with peftops.force_path("prefix_attention", "sdpa"):
        run_parity(pa_args(B, Hq, Hkv, T, L, D, shared=False, gate=2), dtype, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_noncontiguous(path, dtype):
    args = pa_args(2, 4, 2, 13, 11, 16, gate=2, noncontig=True)
    assert not args["q"].is_contiguous() and not args["prefix_k"].is_contiguous()
    run_parity(args, dtype, True)


def test_parity_bthd_layout(path):
    """q, k, v as transposed views of [B, T, H, D] (what attention modules produce)."""
    B, T, Hq, Hkv, D, L = 2, 21, 4, 2, 16, 10
    args = dict(q=randn(B, T, Hq, D).transpose(1, 2), k=randn(B, T, Hkv, D).transpose(1, 2),
                v=randn(B, T, Hkv, D).transpose(1, 2), prefix_k=randn(Hkv, L, D), prefix_v=randn(Hkv, L, D),
                prefix_gate=torch.rand(B, 2, dtype=torch.float64, device=DEVICE) + 0.2)
    out, _ = run_parity(args, torch.float32, True)
    assert out.shape == (B, Hq, T, D)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_length_sequence(path, causal):
    args = {n: t.float().requires_grad_() for n, t in pa_args(2, 2, 1, 0, 5, 16, gate=2).items()}
    out = peftops.prefix_attention(**args, is_causal=causal)
    assert out.shape == (2, 2, 0, 16)
    out.sum().backward()
    for n in GRADS + ["prefix_gate"]:
        assert args[n].grad is not None and args[n].grad.abs().sum() == 0, n


def test_only_some_gradients(path):
    """A frozen model with a trainable prefix and gate (the prefix-tuning case)."""
    run_parity(pa_args(2, 2, 1, 15, 10, 16, gate=2), torch.float32, True, grads=["prefix_k", "prefix_v", "prefix_gate"])


def test_zero_gate_and_custom_scale(path):
    """gk = 0 makes the prefix keys score 0 (they still take softmax mass); gv = 0 drops
    their values. No division by a gate anywhere."""
    args = pa_args(2, 2, 2, 9, 5, 16, gate=2)
    args["prefix_gate"] = torch.tensor([[0.0, 0.7], [0.5, 0.0]], dtype=torch.float64, device=DEVICE)
    run_parity(args, torch.float32, False, scale=0.3)
    run_parity(args, torch.float32, True, scale=0.3)


def test_fp32_gate_with_bf16_inputs(path):
    """An fp32 gate over bf16 inputs, on each path (the body: tests/test_prefix_attention.py)."""
    import test_prefix_attention

    test_prefix_attention.test_fp32_gate_with_bf16_inputs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(path, causal, dtype):
    """Padded keys get no weight, the prefix stays visible (a fully padded sample is defined);
    on the sdpa path an explicit mask."""
    B, T = 3, 19
    args = pa_args(B, 4, 2, T, 10, 16, gate=2)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[0, 13:] = 0
    mask[1, :5] = 0
    mask[2, :] = 0
    run_parity(args, dtype, causal, key_padding_mask=mask)
    run_parity(args, dtype, causal, key_padding_mask=mask.bool())


def test_tf32_follows_matmul_precision(path):
    torch.set_float32_matmul_precision("high")
    run_parity(pa_args(1, 2, 1, 19, 10, 32, gate=2), torch.float32, True, bound=TF32_BOUND)


def test_inference_no_autograd(path):
    a = {n: t.float() for n, t in pa_args(2, 4, 2, 17, 6, 16, gate=1).items()}
    with torch.no_grad():
        out = peftops.prefix_attention(**a, is_causal=True)
    assert out.grad_fn is None
    want = reference.prefix_attention(**{n: t.double() for n, t in a.items()}, is_causal=True)
    assert_close("output", out, want, BOUNDS[torch.float32])


def test_sdpa_rejects_per_row_gate_clearly():
    args = {n: t.float() for n, t in pa_args(2, 2, 1, 7, 3, 8, gate=2, row_gate=True).items()}
    with peftops.force_path("prefix_attention", "sdpa"):
        with pytest.raises(ValueError, match="cannot take a per-query-row prefix_gate"):
            peftops.prefix_attention(**args)


def test_sdpa_runs_no_kernel():
    with peftops.force_path("prefix_attention", "sdpa"):
        run_parity(pa_args(1, 2, 1, 9, 3, 16, gate=2), torch.float32, True)
    c = peftops.dispatch_counts()
    assert c.get("prefix_attention.triton") == 1 and c.get("prefix_attention.path:sdpa") == 1
    assert not any(k.startswith("launch.") for k in c), c


def test_head_dim_over_kernel_limit():
    """head_dim > 256: the kernel path falls back to the reference visibly; the sdpa path takes it."""
    a = {n: t.float() for n, t in pa_args(1, 2, 1, 5, 3, 264).items()}
    want = reference.prefix_attention(**{n: t.double() for n, t in a.items()}, is_causal=True)
    with peftops.force_path("prefix_attention", "kernel"):
        assert_close("kernel fallback", peftops.prefix_attention(**a, is_causal=True), want, 1e-5)
    assert peftops.dispatch_counts().get("prefix_attention.fallback:head_dim>256") == 1
    with peftops.force_path("prefix_attention", "sdpa"):
        assert_close("sdpa", peftops.prefix_attention(**a, is_causal=True), want, 1e-5)
    assert peftops.dispatch_counts().get("prefix_attention.path:sdpa") == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_compile_fullgraph_sdpa(causal, masked):
    masters = pa_args(2, 4, 2, 9, 5, 16, gate=2, shared=False)
    a = {k: v.float().requires_grad_(True) for k, v in masters.items()}
    m64 = {k: v.detach().requires_grad_(True) for k, v in masters.items()}
    kpm = None
    if masked:
        kpm = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
        kpm[1, 6:] = False
    torch._dynamo.reset()
    with peftops.force_path("prefix_attention", "sdpa"):
        fn = lambda **t: peftops.prefix_attention(**t, is_causal=causal, key_padding_mask=kpm)  # noqa: E731
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(**a)
        grads = torch.autograd.grad(out.square().sum(), list(a.values()))
    torch._dynamo.reset()
    want = reference.prefix_attention(**m64, is_causal=causal, key_padding_mask=kpm)
    want_grads = torch.autograd.grad(want.square().sum(), list(m64.values()))
    assert_close("output", out, want, BOUNDS[torch.float32])
    for name, got, ref in zip(a, grads, want_grads):
        assert_close(f"d{name}", got, ref, BOUNDS[torch.float32])


# ------------------------------------------------------------------------------ the table
def _shape(**over):
    s = dict(B=4, Hq=32, Hkv=8, T=2048, L=32, D=128, causal=False, row_gate=False, mask=False, half=True, train=True)
    s.update(over)
    return s


@pytest.mark.parametrize("over,want", [
    (dict(), "sdpa"),                                        # fwd+bwd full: 1.14x vs ours 2.9x
    (dict(causal=True), "sdpa"),                             # causal: dummy query rows keep flash
    (dict(B=1, T=8192), "sdpa"),                             # 1.03x vs 3.0x
    (dict(train=False), "sdpa"),                             # GQA inference: bounded by the fwd+bwd totals
    (dict(B=8, Hkv=32, T=1024, L=64, train=False), "kernel"),  # MHA fwd measured: ours 0.488 vs 0.693
    (dict(B=8, Hkv=32, T=1024, L=64), "sdpa"),               # MHA training
    (dict(row_gate=True), "kernel"),                         # per-query-row gates
    (dict(mask=True, causal=True), "kernel"),                # explicit mask: 3.96 vs ours 3.44 at T=2048
    (dict(mask=True, causal=True, T=512), "sdpa"),           # explicit mask: 0.61 vs ours 1.28 at T=512
    (dict(mask=True, T=512, half=False), "kernel"),          # ... but fp32 stays on the kernel
    (dict(half=False), "kernel"),                            # fp32: no flash
    (dict(D=512), "sdpa"),                                   # beyond the kernel's head_dim
    (dict(D=512, row_gate=True), "kernel"),                  # neither: the kernel path falls back visibly
], ids=str)
def test_table_on_cuda(over, want):
    assert PATHS.pick(True, **_shape(**over)) == want
    assert PATHS.pick(False, **_shape(**over)) == "kernel"     # the interpreter proves our kernel
    c = peftops.dispatch_counts()
    assert c[f"prefix_attention.path:{want}"] == (2 if want == "kernel" else 1)


def test_every_row_has_evidence():
    for _rule, path_name, evidence in PATHS.rows:
        assert path_name in PATHS.paths and len(evidence) > 40


def test_forced_path_overrides_and_bad_name(monkeypatch):
    with peftops.force_path("prefix_attention", "kernel"):
        assert PATHS.pick(True, **_shape()) == "kernel"
    monkeypatch.setenv("PEFTOPS_PATH_PREFIX_ATTENTION", "flash")
    with pytest.raises(ValueError, match="PEFTOPS_PATH_PREFIX_ATTENTION='flash'"):
        PATHS.pick(True, **_shape())


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_bad_input_checked_on_every_path(path_name):
    a = {n: t.float() for n, t in pa_args(2, 4, 2, 5, 3, 8, gate=2).items()}
    a["prefix_gate"] = torch.rand(2, 3, device=DEVICE)
    with peftops.force_path("prefix_attention", path_name), pytest.raises(ValueError, match="prefix_gate has shape"):
        peftops.prefix_attention(**a)


@pytest.mark.parametrize("causal", [False, True])
def test_autocast_does_not_recast(path, causal):
    """Like the kernels, every path computes in its inputs' dtype under autocast."""
    m = pa_args(2, 4, 2, 11, 5, 16, gate=2)
    a = {n: t.float().requires_grad_(n == "q") for n, t in m.items()}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = peftops.prefix_attention(**a, is_causal=causal)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert a["q"].grad.dtype == torch.float32
    assert_close("output", out, reference.prefix_attention(**m, is_causal=causal), BOUNDS[torch.float32])
