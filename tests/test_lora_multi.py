"""Mixed-adapter LoRA (``peftops.lora_linear_multi``) vs the per-row float64 reference:
output and every gradient (x, W, b, every adapter's A and B), both paths, all dtypes."""
import pytest
import torch

import peftops
from peftops import reference
from peftops.ops import lora_multi
from peftops.ops.lora_multi import lora_linear_multi
from parity import DEVICE, check_parity, path_fixture, randn

pytestmark = pytest.mark.usefixtures("seed_per_test")

path = path_fixture("lora_multi", lora_multi.PATHS.paths)


def stacks(ranks, d_in, d_out, device=DEVICE):
    """float64 A [n, r_max, in], B [n, out, r_max], adapter i of rank ranks[i] (zero-padded)."""
    n, r_max = len(ranks), max(ranks)
    a = torch.zeros(n, r_max, d_in, dtype=torch.float64, device=device)
    b = torch.zeros(n, d_out, r_max, dtype=torch.float64, device=device)
    for i, r in enumerate(ranks):
        a[i, :r] = randn(r, d_in, scale=d_in ** -0.5)
        b[i, :, :r] = randn(d_out, r, scale=r ** -0.5)   # non-zero B
    return a, b


# (name, leading dims of x, d_in, d_out, ranks, index kind)
CASES = [
    ("mixed_ranks", (37,), 67, 37, [1, 7, 12, 64], "random"),
    ("rows_of_base", (129,), 37, 67, [16, 3, 9, 1, 5], "random"),
    ("single_adapter", (37,), 67, 37, [7], "zeros"),
    ("all_rows_different", (8,), 37, 67, [3, 5, 7, 9, 11, 13, 15, 17], "perm"),
    ("all_base", (13,), 37, 37, [4, 4], "base"),
    ("zero_rows", (0,), 37, 67, [7, 12], "random"),
    ("one_row", (1,), 67, 37, [12, 1], "random"),
    ("3d_per_token", (3, 13), 67, 37, [1, 12, 7], "random"),
    ("3d_per_sequence", (4, 9), 37, 67, [12, 7, 1], "sequence"),
]


def make_index(kind, lead, n):
    T = 1
    for d in lead:
        T *= d
    if kind == "random":
        return torch.randint(-1, n, lead).tolist() if T else []
    if kind == "zeros":
        return [0] * T
    if kind == "perm":
        return torch.randperm(n)[:T].tolist()
    if kind == "base":
        return [-1] * T
    if kind == "sequence":
        return torch.randint(-1, n, lead[:1]).tolist()
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity(case, dtype, path):
    name, lead, d_in, d_out, ranks, kind = case
    a, b = stacks(ranks, d_in, d_out)
    n = len(ranks)
    idx = make_index(kind, lead, n)
    scal = [0.5 + i for i in range(n)]
    args = dict(x=randn(*lead, d_in), weight=randn(d_out, d_in, scale=d_in ** -0.5), bias=randn(d_out),
                lora_A=a, lora_B=b)
    kw = dict(scalings=scal, adapter_index=idx)
    used = any(v >= 0 for v in torch.tensor(idx).reshape(-1).tolist())  # else the reference's A / B get no grad
    grads = ["x", "weight", "bias"] + (["lora_A", "lora_B"] if used else [])
    check_parity(lora_linear_multi, reference.lora_linear_multi, args, grads, dtype, op_kwargs=kw, ref_kwargs=kw)
    if not used:  # ours: zero gradients for every adapter (not None, not NaN)
        a_, b_ = a.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
        x_ = args["x"].to(dtype).requires_grad_(True)
        lora_linear_multi(x_, args["weight"].to(dtype), None, a_, b_, **kw).sum().backward()
        assert torch.equal(a_.grad, torch.zeros_like(a_)) and torch.equal(b_.grad, torch.zeros_like(b_))
    counts = peftops.dispatch_counts()
    assert counts.get("lora_multi.triton") and not counts.get("lora_multi.fallback"), counts
    if lead[0] and kind != "base":
        assert counts.get("launch.lora_multi_shrink") and counts.get("launch.lora_multi_wgrad"), counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_adapters_over_half_base_noncontiguous(dtype, path):
    """peft's default: fp32 adapters over a half base; x a strided view; index as a tensor."""
    a, b = stacks([5, 16, 2], 67, 37)
    x_master = randn(37, 67, noncontig=True)
    x = x_master.to(dtype).requires_grad_(True)
    w = randn(37, 67, scale=67 ** -0.5)
    a32, b32 = a.float().requires_grad_(True), b.float().requires_grad_(True)
    idx = torch.randint(-1, 3, (37,), device=DEVICE)
    y = lora_linear_multi(x, w.to(dtype), None, a32, b32, torch.tensor([2.0, 0.5, 1.0], device=DEVICE), idx)
    xm, am, bm = x.detach().double().requires_grad_(True), a32.detach().double().requires_grad_(True), \
        b32.detach().double().requires_grad_(True)
    ref = reference.lora_linear_multi(xm, w.to(dtype).double(), None, am, bm, [2.0, 0.5, 1.0], idx)
    assert y.dtype == dtype
    from parity import assert_close
    assert_close("output", y, ref, 2e-2)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    assert a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    assert_close("dx", x.grad, xm.grad, 2e-2)
    assert_close("dA", a32.grad, am.grad, 2e-2)
    assert_close("dB", b32.grad, bm.grad, 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per", ["sequence", "token"])
def test_fused_tma_gemm_prefill(dtype, per):
    """The ``fused`` path's own GEMM (TMA main loop, grouped expand in the epilogue): 300 rows
    of a half base with TMA-readable strides, forward and dx; per-sequence and shuffled per-token ids."""
    a, b = stacks([16, 3, 9, 1], 72, 40)
    lead = (3, 100)
    idx = make_index("sequence" if per == "sequence" else "random", lead, 4)
    args = dict(x=randn(*lead, 72), weight=randn(40, 72, scale=72 ** -0.5), bias=randn(40), lora_A=a, lora_B=b)
    kw = dict(scalings=[0.5, 2.0, 1.0, 3.0], adapter_index=idx)
    with peftops.force_path("lora_multi", "fused"):
        check_parity(lora_linear_multi, reference.lora_linear_multi, args, ["x", "weight", "bias", "lora_A", "lora_B"],
                     dtype, op_kwargs=kw, ref_kwargs=kw)
    counts = peftops.dispatch_counts()
    assert counts.get("launch.lora_multi_gemm_tma") == 2 and not counts.get("launch.lora_multi_expand"), counts


def test_matches_lora_linear_for_one_adapter():
    """Every row on one adapter: the same numbers as ``lora_linear`` (fp32, IEEE)."""
    x = randn(37, 67).float()
    w, bias = randn(37, 67).float(), randn(37).float()
    a, b = randn(7, 67).float(), randn(37, 7).float()
    y1 = peftops.lora_linear(x, w, bias, a, b, 1.5)
    y2 = lora_linear_multi(x, w, bias, a[None], b[None], [1.5], [0] * 37)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_distinct", [2, 8])
def test_launch_count_independent_of_adapters(n_distinct):
    """One call's launches (forward + backward) do not depend on how many adapters the batch holds."""
    counts = {}
    for n in (2, n_distinct):
        peftops.reset_dispatch_counts()
        a, b = stacks([4] * 8, 37, 37)
        x = randn(32, 37).float().requires_grad_(True)
        idx = [i % n for i in range(32)]
        a, b = a.float().requires_grad_(True), b.float().requires_grad_(True)
        y = lora_linear_multi(x, randn(37, 37).float(), None, a, b, [1.0] * 8, idx)
        y.sum().backward()
        counts[n] = {k: v for k, v in peftops.dispatch_counts().items() if k.startswith("launch.")}
    assert counts[2] == counts[n_distinct] and counts[2], counts


@pytest.mark.parametrize("path_name", lora_multi.PATHS.paths)
def test_out_of_range_device_index_is_base_only(path_name):
    """An index the host does not check (a device tensor's): values outside [0, n) are base only
    in the kernels, never an out-of-bounds read (called below the host check)."""
    x = randn(20, 37).float()
    w = randn(37, 37).float()
    a, b = stacks([4, 6], 37, 37)
    a, b = a.float(), b.float()
    idx = torch.tensor([0, 1, 2, -5, 7, 1000000, -1, 1, 0, 0] * 2, dtype=torch.int32, device=DEVICE)
    scale = torch.ones(2, device=DEVICE)
    y = lora_multi._forward(x, w, None, a, b, scale, idx, path_name, need_s=False)[0]
    clean = torch.where((idx >= 0) & (idx < 2), idx, -1)
    ref = reference.lora_linear_multi(x.double(), w.double(), None, a.double(), b.double(), [1.0, 1.0], clean)
    from parity import assert_close
    assert_close("output", y, ref, 1e-5)


def test_torch_compile_fullgraph():
    """The launchers are custom ops with fake kernels: one graph, forward and backward (aot_eager
    checks the fakes' shapes against the real outputs), the same numbers as eager."""
    torch._dynamo.reset()
    w = randn(37, 37).float()
    am, bm = stacks([3, 7], 37, 37)
    idx = torch.tensor([1, -1, 0], device=DEVICE)                       # per sequence, int64, on the device
    sc = torch.tensor([1.0, 2.0], device=DEVICE)
    xm = randn(3, 5, 37).float()
    grads = []
    for compiled in (False, True):
        x = xm.clone().requires_grad_(True)
        a, b = am.float().requires_grad_(True), bm.float().requires_grad_(True)

        def f(x, a, b):
            return lora_linear_multi(x, w, None, a, b, sc, idx)
        fn = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
        y = fn(x, a, b)
        (y * y).sum().backward()
        grads.append((y.detach(), x.grad, a.grad, b.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda_only("CUDA-graph capture needs a GPU")
def test_cuda_graph_capturable():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, 256, 16, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(-1, 4, (64,), device="cuda", dtype=torch.int32)
    sc = torch.ones(4, device="cuda")
    with torch.no_grad():
        for path_name in lora_multi.PATHS.paths:
            with peftops.force_path("lora_multi", path_name):
                want = lora_linear_multi(x, w, None, a, b, sc, idx)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = lora_linear_multi(x, w, None, a, b, sc, idx)
                g.replay()
                torch.cuda.synchronize()
                torch.testing.assert_close(out, want)


@pytest.mark.cuda_only("torch's sync debug mode watches CUDA synchronisations")
def test_no_host_sync_forward_backward():
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(4, 256, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(-1, 4, (300,), device="cuda", dtype=torch.int32)
    sc = torch.ones(4, device="cuda")
    dy = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    for path_name in lora_multi.PATHS.paths:
        with peftops.force_path("lora_multi", path_name):
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = lora_linear_multi(x, w, None, a, b, sc, idx)
                torch.autograd.grad(y, (x, a, b), dy)
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- bad input
def _ok(n=3, r=4, d=37, k=67, T=5):
    return dict(x=torch.randn(T, k, device=DEVICE), weight=torch.randn(d, k, device=DEVICE), bias=None,
                lora_A=torch.randn(n, r, k, device=DEVICE), lora_B=torch.randn(n, d, r, device=DEVICE),
                scalings=[1.0] * n, adapter_index=[0, 1, 2, -1, 0])


@pytest.mark.parametrize("change, err, match", [
    (dict(adapter_index=[0, 1, 3, -1, 0]), ValueError, "adapter_index holds values in \\[-1, 3\\]"),
    (dict(adapter_index=[0, 1, -2, -1, 0]), ValueError, "adapter_index holds values"),
    (dict(adapter_index=torch.tensor([0, 1, 5, 0, 0])), ValueError, "adapter_index holds values"),
    (dict(adapter_index=[0, 1, 2]), ValueError, "adapter_index has shape \\(3,\\)"),
    (dict(adapter_index=torch.zeros(5)), TypeError, "adapter_index must be an int32 / int64 tensor"),
    (dict(adapter_index=[0, 1, 2, True, 0]), TypeError, "adapter_index must hold Python ints"),
    (dict(adapter_index="abc"), TypeError, "adapter_index must be an int tensor"),
    (dict(lora_A=torch.randn(3, 4, 66)), ValueError, "lora_A has shape \\(3, 4, 66\\)"),
    (dict(lora_B=torch.randn(3, 36, 4)), ValueError, "lora_B has shape \\(3, 36, 4\\)"),
    (dict(lora_B=torch.randn(2, 37, 4)), ValueError, "lora_B has shape \\(2, 37, 4\\)"),
    (dict(lora_A=torch.randn(4, 67)), ValueError, "lora_A must have 3 dims"),
    (dict(scalings=[1.0, 2.0]), ValueError, "scalings has 2 values"),
    (dict(scalings=[1.0, float("nan"), 1.0]), ValueError, "must be finite"),
    (dict(scalings=torch.ones(2)), ValueError, "scalings must be a 1-D float tensor of 3"),
    (dict(lora_A=torch.randn(3, 4, 67, dtype=torch.float16)), TypeError, "lora_B has dtype"),
])
def test_bad_input(change, err, match):
    args = _ok()
    for k, v in change.items():
        args[k] = v.to(DEVICE) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    with pytest.raises(err, match=match):
        lora_linear_multi(**args)


def test_bad_per_sequence_index_length():
    args = _ok()
    args["x"] = torch.randn(2, 3, 67, device=DEVICE)
    args["adapter_index"] = [0, 1, 2]
    with pytest.raises(ValueError, match="per sequence \\(2,\\)"):
        lora_linear_multi(**args)


def test_float64_falls_back_to_the_reference_visibly():
    a, b = stacks([3, 5], 37, 29)
    x, w = randn(2, 4, 37), randn(29, 37)
    y = lora_linear_multi(x, w, None, a, b, [1.0, 2.0], [1, -1])                # per sequence
    want = reference.lora_linear_multi(x, w, None, a, b, [1.0, 2.0], [[1] * 4, [-1] * 4])
    assert y.dtype == torch.float64 and torch.equal(y, want)
    assert peftops.dispatch_counts().get("lora_multi.fallback"), peftops.dispatch_counts()
