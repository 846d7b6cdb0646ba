"""QLoRA decode kernel: a fused dequantise-GEMV over a 4-bit base plus the rank-r LoRA term.

    y = x W^T + b + s * S B^T,   W = dequant(packed, absmax)   (kernels/dequant.py)

For few rows (decode, T <= 64) reading W is the whole cost: this kernel reads the 4-bit W once
(0.5 B per element + the absmax, 4x fewer bytes than a bf16 W) and never writes it anywhere.
Each program owns BLOCK_N rows of W (output columns) and all BLOCK_M rows of x; its main loop
dequantises a [BLOCK_N, BLOCK_K] tile in registers (``dequant_tile``, bitsandbytes' values
bit for bit, rounded to x's dtype as bitsandbytes' own forward rounds W) and accumulates
x W^T in fp32; the epilogue adds s * S B^T (S = drop(x) A^T, [T, r] fp32, made beforehand by
the LoRA skinny pass) as BLOCK_R more K-steps of the same accumulator, and the bias.
"""
import triton
import triton.language as tl

from . import FP32, HALF, SIZES, enumerates, variant
from .dequant import dequant_tile, round_to


@triton.jit
def qlora_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                      bias_ptr, s_ptr, b_ptr, out_ptr,
                      M, N, K, R, stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_om,
                      scale,
                      HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, SOFT_BF16: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      EPI_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xt = tl.load(x_rows + (k0 + rk)[None, :] * stride_xk, mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K),
                     other=0.0)
        w = dequant_tile(packed_ptr, absmax_ptr, code_ptr, qabs_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                         rn, k0, N, K, NESTED, NESTED_BLOCKSIZE, BLOCKSIZE, BLOCK_N, BLOCK_K)
        w = round_to(w, xt.dtype, SOFT_BF16)      # W as bitsandbytes' forward has it: rounded to x's dtype
        if UPCAST:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=PRECISION)
    # rank-r epilogue: acc += (s * S) B^T, r padded to BLOCK_R >= 16
    rr = tl.arange(0, BLOCK_R)
    s = tl.load(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(tl.float32) * scale
    bt = tl.load(b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
                 mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0).to(tl.float32)
    acc = tl.dot(s, bt, acc, input_precision=EPI_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


GEMV_MAX_ROWS = 64   # the op's decode path: at most this many rows of x


def gemv_config(M: int, N: int, interpret: bool, sms: int, half: bool = True) -> dict:
    """BLOCK_N small enough that N / BLOCK_N programs fill the GPU (one W row block each).
    fp32 x (IEEE / tf32 dots on fp32 tiles) takes BLOCK_K = 64: at 128-256 its x and W tiles
    spilled 0.3-3.4 KB on sm_90 (compile-check); half precision is spill-free at 128-256."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if interpret:
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)
    # 32-wide column blocks where out / 32 still fills the SMs, from 17 rows: at 16 rows the
    # 16 x 32 tile (with 256- or 128-deep K) spilled 8-152 B under triton 3.6 / 3.9 (compile-
    # check's enumeration), so decode keeps 16 x 16 x 256 (64-128 registers, no spill).
    block_n = 32 if M > 16 and -(-N // 32) >= sms else 16
    if not half:
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=256 if block_m <= 16 else 128, num_warps=4,
                num_stages=3)


@enumerates(gemv_config)
def gemv_config_variants():
    """Every config gemv_config returns (rows up to GEMV_MAX_ROWS, widths on both sides of the
    SM count, H100 / H200 and A100), for compile-check."""
    for M in (m for m in SIZES if m <= GEMV_MAX_ROWS):
        for N in (256, 1024, 4096, 16384):
            for sms in (132, 108):
                for half in (True, False):
                    yield variant("qlora_gemv_kernel", gemv_config(M, N, False, sms, half=half),
                                  dtypes=HALF if half else FP32)
