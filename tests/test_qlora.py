"""QLoRA: the 4-bit dequantiser bit for bit against bitsandbytes, our quantiser against
bitsandbytes', ``qlora_linear`` (both forward paths) against the float64 formula on the
dequantised weights, the accelerated peft ``lora.bnb.Linear4bit`` against peft's own layer,
a tiny Llama loaded in 4-bit through transformers, memory (nothing W-sized saved for
backward), bad input and visible fallbacks.

Tests that compare with bitsandbytes itself skip (``pytest.importorskip``) where it is not
installed (the GPU image); the op, its kernels and the quantiser are tested without it.
"""
import copy
import math

import pytest
import torch

import peftops
from peftops import reference
from peftops._launch import new_seed
from peftops.ops import dequant as dq_ops
from peftops.ops import qlora as qlora_ops
from peftops.ops.dequant import BLOCKSIZES, Quant4bit
from peftops.ops.lora import dropout_mask
from parity import BOUNDS, DEVICE, DTYPES, assert_close, check_parity, randn, rel_err

pytestmark = pytest.mark.usefixtures("seed_per_test")

QTYPES = ["nf4", "fp4"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns, signed zeros made one (bitsandbytes itself writes fp4's code -0
    as -0.0 in its C / CUDA kernels and as +0.0 in its PyTorch path, taken for odd in-features)."""
    t = t + 0.0
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_bits_equal(name, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    diff = bits(got) != bits(want)
    assert not diff.any(), (f"{name}: {int(diff.sum())} of {diff.numel()} elements differ, e.g. "
                            f"{got[diff][:4].tolist()} vs {want[diff][:4].tolist()}")


# ----------------------------------------------------------------------------- dequantiser vs bitsandbytes
@pytest.mark.parametrize("shape", [(37, 67), (48, 256)], ids=["odd-37x67", "48x256"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QTYPES)
def test_dequant_bit_exact_vs_bitsandbytes(quant_type, blocksize, double_quant, shape, device):
    """Our Triton dequantiser == ``bitsandbytes.functional.dequantize_4bit`` bit for bit, on
    bitsandbytes' own storage, for every state dtype; and == bitsandbytes' forward
    (dequantised straight into x's dtype) for every other compute dtype. 37 x 67 = 2479:
    odd (the last byte half used) and not a multiple of any blocksize (a short last block)."""
    bF = pytest.importorskip("bitsandbytes.functional")
    for wdt in DTYPES:
        w = torch.randn(shape, dtype=wdt, device=device)
        packed, qs = bF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        q = Quant4bit.from_bnb(packed, qs)
        assert q.nested == double_quant
        assert_bits_equal(f"{wdt} state", peftops.dequantize_4bit(q), bF.dequantize_4bit(packed, qs))
        absmax = qs.absmax if not double_quant else bF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        for cdt in DTYPES:
            want = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax.float(), blocksize, quant_type,
                                                                  list(shape), cdt)
            assert_bits_equal(f"{wdt} state into {cdt}", peftops.dequantize_4bit(q, cdt), want)


def test_dequant_counts_and_out(device):
    w = torch.randn(40, 64, device=device)
    q = peftops.quantize_4bit(w, blocksize=64)
    out = torch.empty(40, 64, dtype=torch.bfloat16, device=device)
    peftops.reset_dispatch_counts()
    got = peftops.dequantize_4bit(q, torch.bfloat16, out=out)
    assert got is out
    assert peftops.dispatch_counts().get("launch.dequant_4bit") == 1
    assert_bits_equal("out=", out, reference.dequantize_4bit(q, torch.bfloat16))


# ----------------------------------------------------------------------------- quantiser (no bitsandbytes needed)
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "nested"])
@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_own_quantiser_and_dequantiser_agree_with_reference(blocksize, quant_type, double_quant, device):
    """Without bitsandbytes: our quantiser's storage, dequantised by the kernel == the plain
    PyTorch reference bit for bit (every compute dtype), and close to the weight it came from."""
    w = torch.randn(37, 67, device=device)
    q = peftops.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    assert q.packed.shape == (math.ceil(37 * 67 / 2), 1) and q.packed.dtype == torch.uint8
    for dt in DTYPES:
        assert_bits_equal(str(dt), peftops.dequantize_4bit(q, dt), reference.dequantize_4bit(q, dt))
    err = rel_err(peftops.dequantize_4bit(q, torch.float32), w)
    assert err < (0.12 if quant_type == "nf4" else 0.2), err  # 4-bit rounding, not a wrong layout (~1.0)


@pytest.mark.parametrize("quant_type", QTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantiser_equals_bitsandbytes(quant_type, blocksize, device):
    """Our quantiser writes bitsandbytes' bytes: packed nibbles and absmax bit-equal to
    ``bitsandbytes.functional.quantize_4bit`` (odd size, short last block, every dtype).
    Double quantisation: offset, nested absmax and code bit-equal; the 8-bit absmax indices
    are the nearest code value (ours, always) where bitsandbytes' CPU library's search gives
    a farther one on a few entries, so there: ours is never farther, and both dequantise
    to within one code step."""
    bF = pytest.importorskip("bitsandbytes.functional")
    for dt in DTYPES:
        w = torch.randn(37, 67, dtype=dt, device=device)
        packed, qs = bF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        ours = peftops.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, qs.absmax), dt
        assert ours.dtype == qs.dtype and ours.shape == tuple(qs.shape)
        packed, qs = bF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        ours = peftops.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=True)
        assert torch.equal(ours.packed, packed)
        assert torch.equal(ours.offset.reshape(()), qs.offset.reshape(()))
        assert torch.equal(ours.absmax2, qs.state2.absmax) and torch.equal(ours.code2, qs.state2.code)
        assert ours.nested_blocksize == qs.state2.blocksize == 256
        # the fp32 absmax both quantised to 8 bits, centred
        full = bF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)[1].absmax - qs.offset
        scaled = full / ours.absmax2.repeat_interleave(256)[:full.numel()].clamp(min=1e-38)
        d_ours = (scaled - ours.code2[ours.absmax.long()]).abs()
        d_bnb = (scaled - qs.state2.code[qs.absmax.long()]).abs()
        assert (d_ours <= d_bnb).all(), "our 8-bit absmax index is not the nearest code value"
        if full.numel() >= 16:  # most indices are bitsandbytes' own (its search errs on a few)
            same = (ours.absmax == qs.absmax).float().mean().item()
            assert same > 0.75, same


# ----------------------------------------------------------------------------- the op vs float64
def qlora_case(lead, n_in, n_out, r, *, blocksize=64, quant_type="nf4", double_quant=False, bias=True,
               noncontig=False):
    w = torch.randn(n_out, n_in, device=DEVICE) * n_in ** -0.5
    q = peftops.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    args = dict(x=randn(*lead, n_in, noncontig=noncontig), weight=q, bias=randn(n_out) if bias else None,
                lora_A=randn(r, n_in, scale=n_in ** -0.5), lora_B=randn(n_out, r, scale=r ** -0.5))
    return args


def run_parity(args, dtype, scaling=0.75, grads=("x", "lora_A", "lora_B"), ref_kwargs=None, op_kwargs=None, **kw):
    """The op in ``dtype`` vs the float64 LoRA formula on W dequantised into ``dtype`` (the
    values bitsandbytes' forward multiplies by), so the error is the op's arithmetic."""
    def ref(x, weight, **rest):
        return reference.lora_linear(x, reference.dequantize_4bit(weight, dtype).double(), **rest)
    return check_parity(peftops.qlora_linear, ref, args, list(grads), dtype,
                        op_kwargs=op_kwargs or dict(scaling=scaling), ref_kwargs=ref_kwargs or dict(scaling=scaling),
                        **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r", [
    ((1,), 64, 37, 1), ((5,), 128, 67, 7), ((2, 9), 256, 129, 16),     # gemv (decode) path
    ((3, 33), 64, 67, 12), ((129,), 128, 37, 7),                        # dequant + LoRA path
], ids=["T1", "T5", "T18-3d", "T99-3d", "T129"])
def test_qlora_linear_parity(dtype, lead, n_in, n_out, r):
    counts_path = "gemv" if math.prod(lead) <= 64 else "dequant"
    peftops.reset_dispatch_counts()
    run_parity(qlora_case(lead, n_in, n_out, r), dtype, grads=("x", "lora_A", "lora_B", "bias"))
    counts = peftops.dispatch_counts()
    assert counts.get(f"qlora.path:{counts_path}") == 1 and counts.get("qlora.triton") == 1, counts
    launched = ("launch.qlora_gemv",) if counts_path == "gemv" else \
        ("launch.lora_gemm", "launch.lora_gemm_tma", "launch.lora_rank_add")  # the LoRA path its table picks
    assert any(counts.get(k, 0) >= 1 for k in launched), counts
    assert counts.get("launch.dequant_4bit") == (1 if counts_path == "gemv" else 2), counts  # bwd (+ fwd)


@pytest.mark.parametrize("path_rows", [(7,), (80,)], ids=["gemv", "dequant"])
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [
    ("nf4", 32, True), ("fp4", 128, False), ("fp4", 4096, True), ("nf4", 256, False)])
def test_qlora_linear_quant_variants(quant_type, blocksize, double_quant, path_rows):
    """Every storage variant through both forward paths (fp32: exact to 1e-5); K = 4096 so
    blocksize 4096 still takes the GEMV (one quant block per row)."""
    n_in = 4096 if blocksize == 4096 else 256
    run_parity(qlora_case(path_rows, n_in, 24, 5, blocksize=blocksize, quant_type=quant_type,
                          double_quant=double_quant, bias=False), torch.float32)


def test_qlora_linear_noncontiguous_fp32_adapters_and_odd_in():
    """Strided bf16 x with fp32 adapters (peft's default), both paths; an odd in-features
    (37: a row starts mid-byte, so no GEMV) takes the dequantise path even at T = 3."""
    for rows in ((6,), (70,)):
        args = qlora_case(rows, 96, 40, 7, noncontig=True)
        x = args["x"].to(torch.bfloat16)
        x = torch.empty(*rows, 192, dtype=torch.bfloat16, device=DEVICE)[..., ::2].copy_(x).requires_grad_()
        assert not x.is_contiguous()
        a, b = args["lora_A"].float().requires_grad_(), args["lora_B"].float().requires_grad_()
        bias = args["bias"].to(torch.bfloat16)
        y = peftops.qlora_linear(x, args["weight"], bias, a, b, 0.5)
        dy = torch.randn_like(y)
        y.backward(dy)
        x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
        w64 = reference.dequantize_4bit(args["weight"], torch.bfloat16).double()
        y64 = reference.lora_linear(x64, w64, bias.double(), a64, b64, 0.5)
        y64.backward(dy.double())
        assert y.dtype == torch.bfloat16 and a.grad.dtype == torch.float32
        for name, got, want in (("y", y, y64), ("dx", x.grad, x64.grad), ("dA", a.grad, a64.grad),
                                ("dB", b.grad, b64.grad)):
            assert_close(f"{name} T={rows}", got, want, BOUNDS[torch.bfloat16])
    peftops.reset_dispatch_counts()
    run_parity(qlora_case((3,), 37, 20, 4, blocksize=32), torch.float32)
    assert peftops.dispatch_counts().get("qlora.path:dequant") == 1


@pytest.mark.parametrize("rows", [(2, 7), (70,)], ids=["gemv", "dequant"])
def test_qlora_dropout_same_mask(rows):
    p = 0.3
    args = qlora_case(rows, 64, 23, 5)
    torch.manual_seed(99)
    seed = int(new_seed())
    mask = dropout_mask(seed, (math.prod(rows), 64), p, DEVICE).view(*rows, 64).double()
    torch.manual_seed(99)  # the op draws the same seed
    run_parity(args, torch.float32, op_kwargs=dict(scaling=0.75, dropout_p=p),
               ref_kwargs=dict(scaling=0.75, dropout_p=p, dropout_mask=mask))


def test_qlora_zero_rows_and_no_grad():
    args = qlora_case((0,), 64, 16, 4)
    y = peftops.qlora_linear(args["x"].float(), args["weight"], None, args["lora_A"].float(),
                             args["lora_B"].float(), 1.0)
    assert y.shape == (0, 16)
    args = qlora_case((4,), 64, 16, 4)
    with torch.no_grad():
        y = peftops.qlora_linear(args["x"].float(), args["weight"], args["bias"].float(), args["lora_A"].float(),
                                 args["lora_B"].float(), 1.0)
    ref = reference.qlora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 1.0)
    assert_close("no-grad", y, ref, BOUNDS[torch.float32])


# ----------------------------------------------------------------------------- memory
class SavedTensors:
    """Every tensor autograd saves for backward while active (saved_tensors_hooks)."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def _pack(self, t):
        self.saved.append((tuple(t.shape), t.dtype, t.numel()))
        return t

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def w_sized(self, n_out, n_in):
        return [s for s in self.saved if s[1].is_floating_point and s[2] >= n_out * n_in]


@pytest.mark.parametrize("rows", [(8,), (96,)], ids=["gemv", "dequant"])
def test_nothing_w_sized_saved_for_backward(rows):
    """qlora_linear saves x, S [T, r], the adapters and the 4-bit storage (uint8, half W's
    element count): no floating tensor of W's size. The same check on the eager formula
    (dequantise, then F.linear, which saves W for dx) finds W: the check can fail."""
    n_out, n_in = 128, 128  # W has more elements than x (96 x 128), S, A or B
    args = qlora_case(rows, n_in, n_out, 4)
    x = args["x"].to(torch.bfloat16).requires_grad_()
    a = args["lora_A"].to(torch.bfloat16).requires_grad_()
    b = args["lora_B"].to(torch.bfloat16).requires_grad_()
    with SavedTensors() as ours:
        y = peftops.qlora_linear(x, args["weight"], None, a, b, 0.5)
    assert ours.saved and not ours.w_sized(n_out, n_in), ours.saved
    y.sum().backward()
    with SavedTensors() as eager:
        reference.qlora_linear(x, args["weight"], None, a, b, 0.5)
    assert eager.w_sized(n_out, n_in), "the check missed the dequantised W the eager formula saves"


def test_workspace_reused_not_reallocated():
    """The dequantise workspace is allocated once per device / dtype and reused by every
    call and layer after that (here two layers of different shapes, forward + backward)."""
    layers = [qlora_case((80,), 128, 64, 4), qlora_case((80,), 64, 96, 4)]
    for args in layers + layers:
        args["x"] = args["x"].float().requires_grad_()
        peftops.qlora_linear(args["x"], args["weight"], None, args["lora_A"].float(), args["lora_B"].float(),
                             1.0).sum().backward()
    peftops.reset_dispatch_counts()
    for args in layers:
        peftops.qlora_linear(args["x"], args["weight"], None, args["lora_A"].float(), args["lora_B"].float(),
                             1.0).sum().backward()
    counts = peftops.dispatch_counts()
    assert counts.get("launch.dequant_4bit") == 4 and not counts.get("dequant.workspace_alloc"), counts


# ----------------------------------------------------------------------------- bad input, fallback
def test_bad_input():
    args = qlora_case((4,), 64, 16, 4)
    q = args["weight"]
    x, a, b = args["x"].float(), args["lora_A"].float(), args["lora_B"].float()
    with pytest.raises(ValueError, match=r"absmax has shape \(15,\).*needs \[16\]"):
        peftops.qlora_linear(x, Quant4bit(q.packed, q.absmax[:-1], q.shape, 64, "nf4"), None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"packed has shape \(512, 1\).*\(16, 48\) weight needs 384"):
        peftops.qlora_linear(x[:, :48], Quant4bit(q.packed, q.absmax, (16, 48), 64, "nf4"), None, a[:, :48], b, 1.0)
    with pytest.raises(ValueError, match="blocksize 16 is not supported"):
        peftops.dequantize_4bit(Quant4bit(q.packed, q.absmax, q.shape, 16, "nf4"))
    with pytest.raises(ValueError, match="quant_type 'int4' is not supported"):
        peftops.dequantize_4bit(Quant4bit(q.packed, q.absmax, q.shape, 64, "int4"))
    with pytest.raises(ValueError, match="x has 32 features"):
        peftops.qlora_linear(x[:, :32], q, None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B has shape \(16, 3\)"):
        peftops.qlora_linear(x, q, None, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="weight.absmax is on meta"):
        peftops.qlora_linear(x, Quant4bit(q.packed, q.absmax.to("meta"), q.shape, 64, "nf4"), None, a, b, 1.0)
    with pytest.raises(ValueError, match="weight.packed is on meta"):
        peftops.qlora_linear(x, Quant4bit(q.packed.to("meta"), q.absmax.to("meta"), q.shape, 64, "nf4"), None, a, b,
                             1.0)
    with pytest.raises(TypeError, match="must be a peftops Quant4bit"):
        peftops.qlora_linear(x, torch.zeros(16, 64), None, a, b, 1.0)
    nested = peftops.quantize_4bit(torch.randn(16, 64, device=DEVICE), double_quant=True)
    with pytest.raises(ValueError, match=r"absmax2 is .*needs a contiguous float32 \[1\]"):
        peftops.dequantize_4bit(Quant4bit(nested.packed, nested.absmax, nested.shape, 64, "nf4",
                                          absmax2=nested.absmax2[:0], code2=nested.code2, offset=nested.offset))


def test_float64_falls_back_visibly():
    args = qlora_case((4,), 64, 16, 4)
    peftops.reset_dispatch_counts()
    y = peftops.qlora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 1.0)
    assert y.dtype == torch.float64
    counts = peftops.dispatch_counts()
    assert counts.get("qlora.fallback") == 1 and counts.get("qlora.fallback:float64") == 1, counts


# ----------------------------------------------------------------------------- peft's lora.bnb.Linear4bit
def bnb_layer(n_in, n_out, *, quant_type, blocksize, double_quant, compute_dtype, bias, device):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(n_out, n_in) * n_in ** -0.5
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=compute_dtype, compress_statistics=double_quant,
                            quant_type=quant_type)
    lin.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, quant_type=quant_type,
                                   compress_statistics=double_quant, blocksize=blocksize)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(n_out).to(compute_dtype), requires_grad=False)
    return lin.to(device)


def peft_qlora(base, r, *, adapters=("default",)):
    """peft's own ``lora.bnb.Linear4bit`` with random A and non-zero B (fp32, peft's default)."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False)
    layer = Linear4bit(base, adapters[0], cfg, r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False)
    for name in adapters[1:]:
        layer.update_layer(name, r, lora_alpha=r, config=cfg, lora_dropout=0.0, init_lora_weights=False)
    return layer


@pytest.mark.parametrize("rows", [(2, 5), (80,)], ids=["gemv", "dequant"])
@pytest.mark.parametrize("quant_type,blocksize,double_quant,bias", [
    ("nf4", 64, True, True), ("fp4", 128, False, False), ("nf4", 32, False, True), ("fp4", 256, True, False)])
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_accelerated_layer_vs_peft(compute_dtype, quant_type, blocksize, double_quant, bias, rows, device):
    """peft's lora.bnb.Linear4bit, accelerated: output and LoRA gradients (and dx) against
    peft's own layer and against float64 on the dequantised weights; ours <= 1.5x peft's
    error (+ a small eps). fp32 adapters over a bf16 / fp16 x, as peft keeps them."""
    n_in, n_out, r = 128, 48, 8
    base = bnb_layer(n_in, n_out, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                     compute_dtype=compute_dtype, bias=bias, device=device)
    peft_layer = peft_qlora(base, r)
    ours = peftops.accelerate(copy.deepcopy(peft_layer))
    assert type(ours).__name__ == "PeftopsLoraLinear4bit" and repr(ours).startswith("lora.Linear4bit(")
    x = torch.randn(*rows, n_in, device=device).to(compute_dtype)
    dy = torch.randn(*rows, n_out, device=device).to(compute_dtype)

    def run(layer, xx, dyy):
        xx = xx.detach().clone().requires_grad_()
        y = layer(xx)
        y.backward(dyy)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return y, xx.grad, a.grad, b.grad

    peftops.reset_dispatch_counts()
    got = run(ours, x, dy)
    counts = peftops.dispatch_counts()
    assert counts.get("qlora.triton") == 1 and not counts.get("accelerate.qlora.peft_forward"), counts
    want = run(peft_layer, x, dy)
    # float64 model on the dequantised weights
    w64 = peftops.dequantize_4bit(Quant4bit.from_bnb(base.weight), compute_dtype).double()
    b64 = base.bias.double() if bias else None
    f64 = torch.nn.Linear(n_in, n_out, bias=bias).double().to(device)
    f64.weight.data.copy_(w64)
    if bias:
        f64.bias.data.copy_(b64)
    ref_layer = copy.deepcopy(peft_layer)
    x64 = x.double().requires_grad_()
    a64 = ref_layer.lora_A["default"].weight.detach().double().requires_grad_()
    b64l = ref_layer.lora_B["default"].weight.detach().double().requires_grad_()
    y64 = reference.lora_linear(x64, w64, b64, a64, b64l, ref_layer.scaling["default"])
    y64.backward(dy.double())
    for name, g, p, ref in zip(("y", "dx", "dA", "dB"), got, want, (y64, x64.grad, a64.grad, b64l.grad)):
        err_ours, err_peft = rel_err(g, ref), rel_err(p, ref)
        bound = max(BOUNDS[torch.float32], 1.5 * err_peft + 1e-3 * (compute_dtype != torch.float32))
        assert err_ours <= bound, f"{name}: ours {err_ours:.3e} vs peft {err_peft:.3e} off float64 (bound {bound:.3e})"
        assert g.dtype == p.dtype, (name, g.dtype, p.dtype)


def test_accelerated_layer_falls_back_visibly(device):
    """A case the kernels do not take at run time (x in another dtype than the layer's
    compute dtype; peft's mixed-batch adapter_names) runs peft's own forward, counted."""
    base = bnb_layer(64, 32, quant_type="nf4", blocksize=64, double_quant=False, compute_dtype=torch.float16,
                     bias=False, device=device)
    base.compute_type_is_set = True  # a later call: bitsandbytes fixed its compute dtype to fp16
    layer = peftops.accelerate(peft_qlora(base, 4))
    peftops.reset_dispatch_counts()
    y = layer(torch.randn(3, 64, device=device))  # fp32 input, fp16 compute: bitsandbytes casts, we do not
    assert y.dtype == torch.float32
    counts = peftops.dispatch_counts()
    assert counts.get("accelerate.qlora.peft_forward") == 1 and not counts.get("qlora.triton"), counts
    assert counts.get("accelerate.qlora.peft_forward:input dtype differs from the 4-bit layer's compute dtype") == 1


def test_accelerate_leaves_unreadable_4bit_layer_named(device):
    base = bnb_layer(64, 32, quant_type="nf4", blocksize=64, double_quant=False, compute_dtype=torch.float32,
                     bias=False, device=device)
    base.weight.quant_state.packing_format_for_cpu = True  # bitsandbytes' AVX512 repacking (CPU inference)
    layer = peft_qlora(base, 4)
    _, summary = peftops.accelerate(layer, return_summary=True)
    assert not summary.swapped and "packing_format_for_cpu" in summary.left[""], summary


def test_qlora_module_standalone(device):
    """``peftops.QLoraLinear`` over a bitsandbytes Linear4bit: the same numbers as peft's layer."""
    base = bnb_layer(64, 40, quant_type="fp4", blocksize=64, double_quant=True, compute_dtype=torch.float32,
                     bias=True, device=device)
    mod = peftops.QLoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert (mod.out_features, mod.in_features) == (40, 64)
    peft_layer = peft_qlora(base, 4)
    peft_layer.lora_A["default"].weight.data.copy_(mod.lora_A["default"].weight)
    peft_layer.lora_B["default"].weight.data.copy_(mod.lora_B["default"].weight)
    x = torch.randn(2, 3, 64, device=device)
    assert_close("QLoraLinear", mod(x), peft_layer(x), BOUNDS[torch.float32])
    with pytest.raises(NotImplementedError):
        mod.merge()


# ----------------------------------------------------------------------------- tiny Llama in 4-bit
@pytest.mark.parametrize("double_quant,quant_type,use_dora", [(True, "nf4", False), (False, "fp4", False),
                                                              (True, "nf4", True)], ids=["nf4-dq", "fp4", "qdora"])
def test_tiny_llama_4bit_accelerated_equals_peft(tmp_path, double_quant, quant_type, use_dora, device):
    """A small random Llama saved and loaded back through transformers' BitsAndBytesConfig
    (4-bit), LoRA on every linear layer (B non-zero), accelerated: every 4-bit LoRA layer
    swapped, logits and every LoRA gradient equal to peft's, at a decode-sized and a
    prefill-sized batch (both forward paths)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    models = []
    for _ in range(2):  # peft's and ours: the same checkpoint, the same LoRA init (seeded)
        model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, dtype=torch.float32,
                                                 device_map={"": str(device)})
        torch.manual_seed(1)
        models.append(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False, use_dora=use_dora)))
    peft_model, ours = models
    for (n, p), (n2, p2) in zip(peft_model.named_parameters(), ours.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    ours, summary = peftops.accelerate(ours, return_summary=True)
    assert len(summary.swapped) == 2 * len(targets) and not summary.left, summary
    assert set(summary.swapped.values()) == {"PeftopsLoraLinear4bit"}
    for ids_shape, path in (((2, 7), "gemv"), ((2, 40), "dequant")):
        ids = torch.randint(0, 96, ids_shape, device=device)
        results = []
        for m in (peft_model, ours):
            m.zero_grad()
            peftops.reset_dispatch_counts()
            logits = m(ids).logits
            (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=device)).sum().backward()
            grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
            results.append((logits, grads, peftops.dispatch_counts()))
        (want, want_g, _), (got, got_g, counts) = results
        assert_close(f"logits ({path})", got, want, 2e-5)
        assert want_g.keys() == got_g.keys() and len(got_g) == (6 if use_dora else 4) * len(targets)
        for name in want_g:
            assert_close(f"{name} ({path})", got_g[name], want_g[name], 2e-5)
        op = "qdora" if use_dora else "qlora"
        assert counts.get(f"{op}.triton") == 2 * len(targets), counts
        if not use_dora:
            assert counts.get(f"qlora.path:{path}") == 2 * len(targets), counts
        assert counts.get("launch.dequant_4bit", 0) > 0 and not counts.get("accelerate.qlora.peft_forward"), counts
        if path == "gemv" and not use_dora:
            assert counts.get("launch.qlora_gemv") == 2 * len(targets), counts


# ----------------------------------------------------------------------------- QDoRA: DoRA over a 4-bit base
def test_qdora_linear_parity_and_memory():
    """``qdora_linear`` (our quantiser, no bitsandbytes) vs the float64 DoRA formula on the
    dequantised W: output and dx, dA, dB, dm; nothing W-sized saved for backward; W
    dequantised once in forward (the norm pass and the GEMM share it), once in backward."""
    n_out, n_in, r = 96, 128, 5
    for rows, dtype in (((2, 5), torch.float32), ((80,), torch.float32), ((7,), torch.bfloat16)):
        args = qlora_case(rows, n_in, n_out, r, blocksize=64, double_quant=True)
        args["magnitude"] = (torch.rand(n_out, dtype=torch.float64, device=DEVICE) + 0.5)

        def ref(x, weight, **rest):
            return reference.dora_linear(x, reference.dequantize_4bit(weight, dtype).double(), **rest)
        peftops.reset_dispatch_counts()
        check_parity(peftops.qdora_linear, ref, args, ["x", "lora_A", "lora_B", "magnitude", "bias"], dtype,
                     op_kwargs=dict(scaling=0.75), ref_kwargs=dict(scaling=0.75))
        counts = peftops.dispatch_counts()
        assert counts.get("qdora.triton") == 1 and counts.get("launch.dequant_4bit") == 2, counts
        x = args["x"].to(dtype).requires_grad_()
        with SavedTensors() as saved:
            peftops.qdora_linear(x, args["weight"], None, args["lora_A"].to(dtype).requires_grad_(),
                                 args["lora_B"].to(dtype), args["magnitude"].float().requires_grad_(), 0.75)
        assert saved.saved and not saved.w_sized(n_out, n_in), saved.saved


def test_qdora_dropout_and_float64_fall_back_visibly():
    args = qlora_case((6,), 64, 16, 4)
    m = torch.rand(16, device=DEVICE) + 0.5
    x, a, b = args["x"].float(), args["lora_A"].float(), args["lora_B"].float()
    peftops.reset_dispatch_counts()
    peftops.qdora_linear(x, args["weight"], None, a, b, m, 1.0, dropout_p=0.1)
    peftops.qdora_linear(args["x"], args["weight"], None, args["lora_A"], args["lora_B"], m.double(), 1.0)
    counts = peftops.dispatch_counts()
    assert counts.get("qdora.fallback:dropout") == 1 and counts.get("qdora.fallback:float64") == 1, counts
    with pytest.raises(ValueError, match=r"magnitude has shape \(15,\) but weight \(16, 64\)"):
        peftops.qdora_linear(x, args["weight"], None, a, b, m[:15], 1.0)


@pytest.mark.parametrize("rows", [(5,), (80,)], ids=["T5", "T80"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_accelerated_qdora_layer_vs_peft(compute_dtype, rows, device):
    """peft's lora.bnb.Linear4bit with use_dora=True, accelerated: output and dx, dA, dB, dm
    against peft's own layer and float64 on the dequantised weights (ours <= 1.5x peft's error)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    n_in, n_out, r = 128, 48, 4
    base = bnb_layer(n_in, n_out, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=compute_dtype,
                     bias=True, device=device)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)
    peft_layer = Linear4bit(base, "default", cfg, r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        peft_layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(n_out, device=device) + 0.5)
    ours, summary = peftops.accelerate(copy.deepcopy(peft_layer), return_summary=True)
    assert summary.swapped and not summary.left, summary
    x = torch.randn(*rows, n_in, device=device).to(compute_dtype)
    dy = torch.randn(*rows, n_out, device=device).to(compute_dtype)

    def run(layer):
        xx = x.detach().clone().requires_grad_()
        y = layer(xx)
        y.backward(dy)
        return (y, xx.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                layer.lora_magnitude_vector["default"].weight.grad)

    peftops.reset_dispatch_counts()
    got = run(ours)
    assert peftops.dispatch_counts().get("qdora.triton") == 1, peftops.dispatch_counts()
    want = run(peft_layer)
    w64 = peftops.dequantize_4bit(Quant4bit.from_bnb(base.weight), compute_dtype).double()
    x64 = x.double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in (peft_layer.lora_A["default"].weight,
                                                          peft_layer.lora_B["default"].weight,
                                                          peft_layer.lora_magnitude_vector["default"].weight)]
    y64 = reference.dora_linear(x64, w64, base.bias.double(), p64[0], p64[1], p64[2], peft_layer.scaling["default"])
    y64.backward(dy.double())
    for name, g, p, ref in zip(("y", "dx", "dA", "dB", "dm"), got, want, (y64, x64.grad, *(t.grad for t in p64))):
        err_ours, err_peft = rel_err(g, ref), rel_err(p, ref)
        bound = max(BOUNDS[torch.float32], 1.5 * err_peft + 1e-3 * (compute_dtype != torch.float32))
        assert err_ours <= bound, f"{name}: ours {err_ours:.3e} vs peft {err_peft:.3e} off float64 (bound {bound:.3e})"


def test_dequant_reads_bnb_quant_storage_other_than_uint8(device):
    """bitsandbytes' ``quant_storage`` option (e.g. bf16, for FSDP) keeps the same bytes in
    another dtype: read in place (a uint8 view), bit-exact."""
    bF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(32, 64, device=device)
    packed, qs = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    q = Quant4bit.from_bnb(packed, qs)
    assert q.packed.dtype == torch.uint8 and q.packed.data_ptr() == packed.data_ptr()
    assert_bits_equal("bf16 storage", peftops.dequantize_4bit(q), bF.dequantize_4bit(packed, qs))


def test_accelerated_layer_merge_unmerge_are_peft_s(device):
    """peft owns merging a 4-bit layer (dequantise, add s B A, requantise: a new 4-bit weight):
    merged, the accelerated layer gives peft's merged output; unmerged, our kernels run again
    on the new weight and agree with peft's unmerged layer."""
    base = bnb_layer(64, 32, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32,
                     bias=True, device=device)
    peft_layer = peft_qlora(base, 4)
    ours = peftops.accelerate(copy.deepcopy(peft_layer))
    x = torch.randn(5, 64, device=device)
    for layer in (peft_layer, ours):
        layer.merge()
        assert layer.merged
    assert_close("merged", ours(x), peft_layer(x), BOUNDS[torch.float32])
    for layer in (peft_layer, ours):
        layer.unmerge()
    peftops.reset_dispatch_counts()
    assert_close("unmerged", ours(x), peft_layer(x), BOUNDS[torch.float32])
    assert peftops.dispatch_counts().get("qlora.triton") == 1
