"""LoRA's dispatch paths (peftops/ops/lora.py ``PATHS``): each path forced, output and every
gradient vs the float64 reference; fp32 adapters over a half base on both paths; the table.

tests/test_lora.py runs the default path of the test device; here every path runs on it."""
import math

import pytest
import torch

import peftops
from peftops import reference
from peftops.ops.lora import PATHS, dropout_mask
from peftops._launch import new_seed
from parity import BOUNDS, DEVICE, DTYPES, assert_close, copy_as, path_fixture, randn
from test_lora import SHAPES, lora_args, run_parity

PATH_NAMES = list(PATHS.paths)


path = path_fixture("lora", PATH_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
def test_parity_shapes(path, lead, n_in, n_out, r, dtype):
    run_parity(lora_args(lead, n_in, n_out, r), dtype)
    assert peftops.dispatch_counts().get(f"lora.path:{path}") == 1


@pytest.mark.parametrize("gate", ["token", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(3, 13), (90,), (3, 100)], ids=["decode-rows", "mid-rows", "large-rows"])
def test_parity_gate(path, gate, dtype, lead):
    run_parity(lora_args(lead, 45, 29, 6, gate=gate), dtype)


def test_parity_noncontiguous_no_bias(path):
    args = lora_args((2, 41), 40, 52, 5, bias=False, noncontig=True)
    run_parity(args, torch.bfloat16)


@pytest.mark.parametrize("lead", [(0,), (1,), (1, 1)], ids=str)
def test_zero_and_one_rows(path, lead):
    # Seeded: with one row, dgate is one sum of r = 3 products, and about one unseeded draw in
    # a few hundred cancels it enough (5e-5 relative in fp32, seen once) to fail 1e-5; this
    # test is about the row-count edges, not that conditioning.
    torch.manual_seed(1)
    run_parity(lora_args(lead, 20, 24, 3, gate="token"), torch.float32)


@pytest.mark.parametrize("lead", [(2, 17), (75,), (3, 100)], ids=["S-in-GEMM", "S-skinny-pass", "large-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_same_mask_forward_and_backward(path, dtype, lead):
    """Both paths regenerate the same Philox mask in backward (dx's dropout epilogue in our
    GEMM, or in the in-place rank-r add after cuBLAS). Row counts reach each launch config
    (decode, <= 256, large) so compile-check sees every variant."""
    p = 0.3
    args = lora_args(lead, 41, 23, 5, gate="token")
    torch.manual_seed(99)
    seed = int(new_seed())
    mask = dropout_mask(seed, (math.prod(lead), 41), p, DEVICE).view(*lead, 41).double()
    torch.manual_seed(99)
    run_parity(args, dtype, op_kwargs=dict(scaling=0.75, dropout_p=p),
               ref_kwargs=dict(scaling=0.75, dropout_p=p, dropout_mask=mask))


# ------------------------------------------------------- fp32 adapters over a half base
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(2, 9), (3, 40)], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fp32_adapters_over_half_base(path, dtype, lead, dropout):
    """peft's default (autocast_adapter_dtype): A, B in fp32, x and W in half. The op reads
    them as they are, returns y in x's dtype and dA, dB in fp32."""
    m = lora_args(lead, 52, 37, 6, gate="token")
    op = {k: copy_as(v, torch.float32 if k in ("lora_A", "lora_B", "gate") else dtype, k != "weight" and k != "bias")
          for k, v in m.items()}
    ref = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in op.items()}
    torch.manual_seed(5)
    seed = int(new_seed())
    mask = dropout_mask(seed, (math.prod(lead), 52), dropout, DEVICE).view(*lead, 52).double() if dropout else None
    torch.manual_seed(5)
    y = peftops.lora_linear(**op, scaling=0.5, dropout_p=dropout)
    want = reference.lora_linear(**ref, scaling=0.5, dropout_p=dropout, dropout_mask=mask)
    assert y.dtype == dtype
    assert_close("y", y, want, BOUNDS[dtype])
    dy = torch.randn_like(want)
    y.backward(dy.to(dtype))
    want.backward(dy)
    for name in ("x", "lora_A", "lora_B", "gate"):
        assert op[name].grad.dtype == op[name].dtype, f"d{name} dtype {op[name].grad.dtype}"
        assert_close(f"d{name}", op[name].grad, ref[name].grad, BOUNDS[dtype])


def test_adapter_dtype_must_be_x_or_fp32():
    m = lora_args((4,), 8, 6, 2)
    x, w = m["x"].half(), m["weight"].half()
    with pytest.raises(TypeError, match="lora_A / lora_B have dtype torch.bfloat16"):
        peftops.lora_linear(x, w, None, m["lora_A"].bfloat16(), m["lora_B"].bfloat16(), 1.0)
    with pytest.raises(TypeError, match="lora_B has dtype"):
        peftops.lora_linear(x, w, None, m["lora_A"].float(), m["lora_B"].half(), 1.0)


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("T", [1, 16, 64, 512, 8192])
def test_table_on_cuda_picks_the_measured_fastest(T):
    # H100 2026-11-23: cuBLAS + rank-r add 1.22-1.47x base; our GEMM (before the
    # single-accumulator redesign) 7.7-10x. Until a GPU run measures the new kernel faster,
    # every shape takes cublas.
    assert PATHS.pick(True, T=T, d_in=4096, d_out=4096, r=16) == "cublas"
    assert PATHS.pick(False, T=T, d_in=4096, d_out=4096, r=16) == "kernel"  # the interpreter proves our kernel
    assert peftops.dispatch_counts()["lora.path:cublas"] == 1


def test_forced_path_overrides_and_bad_name(monkeypatch):
    with peftops.force_path("lora", "kernel"):
        assert PATHS.pick(True, T=8192, d_in=64, d_out=64, r=4) == "kernel"
    monkeypatch.setenv("PEFTOPS_PATH_LORA", "nonsense")
    with pytest.raises(ValueError, match="PEFTOPS_PATH_LORA='nonsense'"):
        PATHS.pick(True, T=1, d_in=64, d_out=64, r=4)


def test_masters_live_on_the_test_device():
    assert randn(2, 3).device.type == DEVICE.type


# ----------------------------------------------- gated LoRA (UniPELT): the same two paths
gated_path = path_fixture("gated_lora", PATH_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("lead,n_in,n_out,r", [((2, 7), 33, 40, 5), ((3, 100), 20, 37, 8)])
def test_gated_lora_paths(gated_path, lead, n_in, n_out, r, mode, dtype):
    from test_unipelt import gl_args, gl_parity

    gl_parity(gl_args(lead, n_in, n_out, r), dtype, mode)
    assert peftops.dispatch_counts().get(f"gated_lora.path:{gated_path}") == 1


def test_gated_lora_table_on_cuda():
    from peftops.ops.unipelt import PATHS as GATED

    assert GATED.pick(True, T=8192, d_in=4096, d_out=4096, r=8) == "cublas"
    assert GATED.pick(False, T=8192, d_in=4096, d_out=4096, r=8) == "kernel"


@pytest.mark.parametrize("path_name", PATH_NAMES)
def test_custom_ops_opcheck_each_path(path_name):
    from peftops.ops import lora as lo

    m = {k: copy_as(v, torch.float32) for k, v in lora_args((9,), 16, 12, 4, gate="token").items()}
    g = m["gate"].reshape(-1).contiguous()
    fwd = (m["x"], m["weight"], m["bias"], m["lora_A"], m["lora_B"], g, 0.5, 0.0, None, path_name)
    torch.library.opcheck(lo.lora_fwd, fwd)
    torch.library.opcheck(lo.lora_fwd, (*fwd, False))                                 # inference: no S kept
    y, s = lo.lora_fwd(*fwd)
    torch.library.opcheck(lo.lora_bwd, (torch.randn_like(y), m["x"], m["weight"], m["lora_A"], m["lora_B"], s, g,
                                        0.5, 0.0, None, True, path_name))


# ------------------------------------- the persistent TMA GEMM (kernel path, many rows)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain", "gate-no-bias", "dropout", "fp32-adapters"])
def test_tma_gemm_many_rows(case, dtype):
    """Above TMA_MIN_ROWS rows a TMA-readable half base runs lora_gemm_tma_kernel for y and dx:
    S fused into the forward's main loop without dropout (backward's two passes only), the
    skinny S pass and the dx dropout epilogue with it; both weight layouts (y reads W as
    [out, in], dx as [in, out])."""
    from peftops.kernels.lora import TMA_FUSE_S, TMA_MIN_ROWS

    lead = (3, 100)
    assert math.prod(lead) >= TMA_MIN_ROWS
    args = lora_args(lead, 48, 40, 6, bias=case != "gate-no-bias", gate="token" if case != "plain" else None)
    op_kwargs, ref_kwargs = dict(scaling=0.75), dict(scaling=0.75)
    if case == "dropout":
        torch.manual_seed(7)
        mask = dropout_mask(int(new_seed()), (math.prod(lead), 48), 0.3, DEVICE).view(*lead, 48).double()
        torch.manual_seed(7)
        op_kwargs, ref_kwargs = dict(scaling=0.75, dropout_p=0.3), dict(scaling=0.75, dropout_p=0.3, dropout_mask=mask)
    with peftops.force_path("lora", "kernel"):
        if case == "fp32-adapters":
            op = {k: copy_as(v, torch.float32 if k in ("lora_A", "lora_B", "gate") else dtype,
                             k not in ("weight", "bias")) for k, v in args.items()}
            ref = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in op.items()}
            y = peftops.lora_linear(**op, **op_kwargs)
            want = reference.lora_linear(**ref, **ref_kwargs)
            assert_close("y", y, want, BOUNDS[dtype])
            dy = torch.randn_like(want)
            y.backward(dy.to(dtype))
            want.backward(dy)
            for name in ("x", "lora_A", "lora_B", "gate"):
                assert op[name].grad.dtype == op[name].dtype
                assert_close(f"d{name}", op[name].grad, ref[name].grad, BOUNDS[dtype])
        else:
            run_parity(args, dtype, op_kwargs=op_kwargs, ref_kwargs=ref_kwargs)
    c = peftops.dispatch_counts()
    assert c.get("launch.lora_gemm_tma") == 2 and "launch.lora_gemm" not in c, c   # y and dx
    fused = TMA_FUSE_S and case != "dropout"                                         # else S's own pass
    assert c.get("launch.lora_skinny") == (2 if fused else 3), c


@pytest.mark.parametrize("why", ["odd-features", "fp32", "few-rows"])
def test_tma_gemm_only_where_tma_reads(why):
    """Rows whose features TMA cannot read (45 bf16 = 90 B, not 16-byte aligned), fp32, or
    too few rows run lora_gemm_kernel: same math, counted under its own name."""
    n_in, dtype, lead = {"odd-features": (45, torch.bfloat16, (300,)), "fp32": (48, torch.float32, (300,)),
                         "few-rows": (48, torch.bfloat16, (200,))}[why]
    with peftops.force_path("lora", "kernel"):
        run_parity(lora_args(lead, n_in, 40, 6), dtype)
    c = peftops.dispatch_counts()
    assert c.get("launch.lora_gemm") == 2 and "launch.lora_gemm_tma" not in c, c


# ------------------------------------------- decode split-K (kernel path, <= 64 rows)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_decode_split_k(dropout, dtype, monkeypatch):
    """Few rows and fewer column tiles than SMs: lora_gemm_kernel splits K and the last split
    of each tile sums the partials. With splits at least 128 deep (GPUs: 512, the same code
    at 4x the depth) and 64-deep K tiles, y's 520 columns take 3 splits (192, 192, 136) and
    dx's 300 take 2 (192, 108). The forward's S (and its dropout) is summed the same way; dx's dropout epilogue
    runs after the sum. Twice: the arrival counters are left at zero for the next launch."""
    from peftops.kernels import lora as lora_kernels
    from peftops.ops import lora as lora_ops

    monkeypatch.setattr(lora_kernels, "DECODE_SPLIT_MIN_K", 128)
    lead, n_in, n_out = (2, 7), 520, 300
    for attempt in range(2):
        peftops.reset_dispatch_counts()
        args = lora_args(lead, n_in, n_out, 6, gate="token")
        kw, ref_kw = dict(scaling=0.5), dict(scaling=0.5)
        if dropout:
            torch.manual_seed(11 + attempt)
            mask = dropout_mask(int(new_seed()), (14, n_in), dropout, DEVICE).view(*lead, n_in).double()
            torch.manual_seed(11 + attempt)
            kw, ref_kw = dict(kw, dropout_p=dropout), dict(ref_kw, dropout_p=dropout, dropout_mask=mask)
        with peftops.force_path("lora", "kernel"):
            run_parity(args, dtype, op_kwargs=kw, ref_kwargs=ref_kw)
        c = peftops.dispatch_counts()
        assert c.get("launch.lora_gemm") == 2 and c.get("variant.lora_gemm:split_k") == 2, c
        assert all(int(t[2].count_nonzero()) == 0 for t in lora_ops._SPLIT_SCRATCH.values())


def test_decode_splits_config():
    """Splits fill the SMs, each at least DECODE_SPLIT_MIN_K deep, none empty."""
    from peftops.kernels.lora import DECODE_SPLIT_MIN_K, decode_splits

    assert decode_splits(128, 4096, 64, 132) == dict(splits=2, k_per_split=2048)    # d = 4096: 128 tiles
    assert decode_splits(8, 2048, 64, 132) == dict(splits=4, k_per_split=512)       # 256-wide k / v
    assert decode_splits(132, 4096, 64, 132)["splits"] == 1                           # every SM has a tile
    assert decode_splits(8, DECODE_SPLIT_MIN_K - 1, 64, 132)["splits"] == 1           # too shallow
    for tiles, K in [(1, 1600), (35, 1100), (3, 5000), (20, 777)]:
        cfg = decode_splits(tiles, K, 64, 132)
        assert cfg["k_per_split"] % 64 == 0 and (cfg["splits"] - 1) * cfg["k_per_split"] < K, cfg


@pytest.mark.parametrize("rows,dtype", [(14, torch.float32), (14, torch.bfloat16), (300, torch.bfloat16),
                                        (300, torch.float16)], ids=str)
def test_inference_keeps_s_on_chip(rows, dtype):
    """A no-grad call makes S inside the GEMM (decode; the TMA GEMM of a half base without
    dropout) and neither stores nor allocates it: one launch, the output alone."""
    from peftops.ops import lora as lo

    args = {k: copy_as(v, dtype) for k, v in lora_args((rows,), 48, 40, 6, gate="token").items()}
    with peftops.force_path("lora", "kernel"), torch.no_grad():
        y = peftops.lora_linear(**args, scaling=0.5)
        _, s = lo._lora_fwd(lo.rows(args["x"]), args["weight"], args["bias"], args["lora_A"], args["lora_B"],
                            args["gate"].reshape(-1).float(), 0.5, 0.0, None, "kernel", False)
    want = reference.lora_linear(**{k: v.double() for k, v in args.items()}, scaling=0.5)
    assert_close("y", y, want, BOUNDS[dtype])
    assert s.shape == (0, 6)
    c = peftops.dispatch_counts()
    assert "launch.lora_skinny" not in c and c.get("launch.lora_gemm", 0) + c.get("launch.lora_gemm_tma", 0) == 2, c
