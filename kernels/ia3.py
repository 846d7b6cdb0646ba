"""(IA)^3 kernels.

Output scaling (k / v projections, l [out]):   y = l * (x W^T + b)
Input scaling  (feed-forward, l [in]):         y = (x * l) W^T + b

Backward (W frozen; dW / db, when asked for, are plain GEMMs on the host side):
  input scaling   G  = dY W                       [T, in]   (the dx GEMM)
                  dx = G * l                      -- epilogue column scale
                  dl = colsum(x * G)              -- epilogue partials over row blocks
  output scaling  dx = (dY * l) W                 -- l scales the dY tile as it is loaded
                  dl = colsum(dY * z), z = x W^T + b
                     = colsum(dY * y) / l         -- mainloop partials from the dY tiles the
                                                     dx GEMM already loads, plus y
                                                     (read once, spread over the programs)
                  columns with |l| <= guard: z recomputed (``GUARD`` launch), see below.

All of it is one GEMM kernel, ``ia3_gemm_kernel``: out = (A * in_scale) @ B (+ bias)
(* out_scale), with optional column-sum partials
  EPI_COLSUM:  part[pid_m, n] = sum_rows (A @ B + bias)[rows, n] * Y[rows, n]   (epilogue)
  LOOP_COLSUM: part[pid_m, k] = sum_rows A[rows, k] * Y[rows, k]               (mainloop;
               K tile kt is done by the program of column block kt % (column blocks))
and ``ia3_colsum_kernel`` for the partials alone (dl without dx).
Partials are [row blocks, columns] fp32 buffers summed on the host in a fixed order:
no atomics, repeatable results.

Why the output-scaling dl divides the saved output by l instead of saving z or
recomputing it: y is the op's output (alive anyway, nothing extra written in forward);
saving z would add a [T, out] write to every training forward (the target is <= 1.02x the
base GEMM) and recomputing z is a whole extra GEMM in backward (+50% over the frozen
layer's fwd+bwd). y / l is exact algebra and loses only y's own rounding (one ulp of the
output dtype, the same as a saved z would carry). It fails only where l is (nearly) zero,
so a second launch of the same GEMM (``GUARD``) recomputes z for exactly those column
blocks: its programs load l first and run zero K iterations unless a column of theirs has
|l| <= guard, so without such columns it costs one launch and no host synchronisation.
"""
import triton
import triton.language as tl

from . import SIZES, enumerates, variant
from .gemm import block_of


@triton.jit
def ia3_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, in_scale_ptr, out_scale_ptr, y_ptr, out_ptr, part_ptr,
    M, N, K, guard,
    stride_am, stride_ak, stride_bk, stride_bn, stride_ym, stride_yn, stride_om, stride_on,
    A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_SCALE: tl.constexpr,
    EPI_COLSUM: tl.constexpr, LOOP_COLSUM: tl.constexpr, GUARD: tl.constexpr, STORE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share each column block of B while in L2.
    pid_m, pid_n = block_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    num_n = tl.cdiv(N, BLOCK_N)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # Rows / columns past the edge are wrapped in the GEMM (results masked at the store and
    # in every column sum), so the main loop only masks K.
    rm_in = (rm % M).to(tl.int64)
    rn_in = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + rm_in[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_in[None, :] * stride_bn

    k_tiles = tl.cdiv(K, BLOCK_K)
    if GUARD:
        # Recompute only where some column of this block has |l| <= guard.
        lg = tl.load(out_scale_ptr + rn_in, mask=n_ok, other=1.0).to(tl.float32)
        gcol = (tl.abs(lg) <= guard) & n_ok
        k_tiles = k_tiles * tl.max(gcol.to(tl.int32), axis=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, k_tiles):
        k0 = kt * BLOCK_K
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if LOOP_COLSUM:
            # Each K tile's partial is made by one program of the row block (round robin
            # over the column blocks, so the extra loads are spread evenly).
            if kt % num_n == pid_n:
                yv = tl.load(y_ptr + rm_in[:, None] * stride_ym + (k0 + rk)[None, :] * stride_yn,
                             mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                part = tl.sum(tl.where(m_ok[:, None], a.to(tl.float32) * yv.to(tl.float32), 0.0), axis=0)
                tl.store(part_ptr + pid_m.to(tl.int64) * K + k0 + rk, part, mask=k_ok)
        if A_SCALE:
            s = tl.load(in_scale_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(a.dtype)  # rounded like (x * l).to(x.dtype)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    if EPI_COLSUM:
        y_mask = m_ok[:, None] & n_ok[None, :]
        if GUARD:  # only guarded columns are read: no pass over Y when l has none
            y_mask = y_mask & gcol[None, :]
        yv = tl.load(y_ptr + rm_in[:, None] * stride_ym + rn_in[None, :] * stride_yn,
                     mask=y_mask, other=0.0).to(tl.float32)
        part = tl.sum(tl.where(m_ok[:, None], acc * yv, 0.0), axis=0)
        if GUARD:
            part = tl.where(gcol, part, 0.0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part, mask=n_ok)
    if OUT_SCALE:
        acc = acc * tl.load(out_scale_ptr + rn_in).to(tl.float32)[None, :]
    if STORE:
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def ia3_colsum_kernel(
    a_ptr, y_ptr, part_ptr, M, N,
    stride_am, stride_an, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """part[pid_m, n] = sum over the rows of block pid_m of A[m, n] * Y[m, n] (fp32)."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rm64 = rm.to(tl.int64)
    a = tl.load(a_ptr + rm64[:, None] * stride_am + rn[None, :] * stride_an, mask=mask, other=0.0)
    y = tl.load(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0)
    part = tl.sum(a.to(tl.float32) * y.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, part, mask=rn < N)


def gemm_config(M, N, K, interpret, colsum=False, in_scale=False):
    """Launch config for ``ia3_gemm_kernel`` (a heuristics table by row count).

    GPU values are the usual Hopper bf16 choices (128x256x64 tiles, 8 warps, 3 stages for
    large M; 16-row tiles for decode). Not yet tuned on a lent GPU.
    """
    if interpret:  # few, large programs: the interpreter's cost is per program and op
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:  # scaling the x tiles on load spilled 24 B on sm_80 at 4 warps
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if in_scale else 4, num_stages=4)
    if colsum:  # the column-sum epilogue at 128x256 spilled 272-328 B (compile-check, sm_90)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@enumerates(gemm_config)
def gemm_config_variants():
    for M in SIZES:
        # the column-sum epilogue is output scaling's (ops/ia3.py): never with A_SCALE
        for colsum, in_scale in ((False, False), (True, False), (False, True)):
            yield variant("ia3_gemm_kernel", gemm_config(M, 4096, 4096, False, colsum=colsum, in_scale=in_scale),
                          where=dict(EPI_COLSUM=colsum, A_SCALE=in_scale))


def colsum_config(M, N, interpret):
    if interpret:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)


@enumerates(colsum_config)
def colsum_config_variants():
    yield variant("ia3_colsum_kernel", colsum_config(4096, 4096, False))
