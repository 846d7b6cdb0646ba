"""Mixed-adapter LoRA kernels (peft's ``adapter_names=``; punica's SGMV / BGMV idea).

Row t uses adapter a(t) of a stack (A [n, r_max, in], B [n, out, r_max], ranks zero-padded
to r_max, scaling s_a), or none (a(t) outside [0, n): base only):

Forward   y_t  = x_t W^T + b + s_a S_t B_a^T,   S_t = x_t A_a^T           (S saved, fp32)
Backward  G_t  = dY_t B_a                                                   [T, r]
          dx_t = dY_t W + s_a G_t A_a
          dA_a = s_a sum_{t: a(t) = a} G_t^T x_t                            [r, in]
          dB_a = s_a sum_{t: a(t) = a} dY_t^T S_t                           [out, r]

Three kernels, whatever the number of adapters in the batch (the frozen GEMMs are cuBLAS),
and a fourth for the ``fused`` path (``multi_gemm_tma_kernel``: the frozen GEMM on the
shared TMA main loop with the grouped expand in its epilogue, many rows of a half base on
sm_90):
* ``multi_shrink_kernel``: P_t = X_t E_{a(t)} for E_a [K, r] given by strides (A_a^T for S,
  B_a for G). A program takes BLOCK_M row *positions*; with ``HAS_PERM`` position i is row
  perm[i] of a stable sort by adapter (SGMV: a block holds one or two adapters' segments),
  without it rows as they come (BGMV: decode, one row per sequence). The program loops over
  the distinct adapters among its rows (a device-side loop: the smallest adapter id not yet
  done, then the rows holding it), each pass a K loop over that adapter's E with the other
  rows masked out (masked loads fetch nothing), so x is read once and E_a once per (row
  block, adapter in it). K may be split across programs (fp32 partials summed on the host).
* ``multi_expand_kernel``: out_t += s_a P_t F_a in place (F_a [r, N] by strides: B_a^T for
  y, A_a for dx), out next to a cuBLAS GEMM's output; the same row blocks and adapter loop.
* ``multi_wgrad_kernel``: G_a = s_a sum_{t in segment a} X_t^T F_t  ([N, r] per adapter)
  over the sorted order: program (a, column block, split) walks its part of adapter a's
  segment (offsets from a device-side searchsorted); partials per split summed on the host.

Out-of-range indices: rows whose a(t) is outside [0, n) are base only in every kernel (the
index is masked before any adapter load), so no index value reads out of bounds; the host
validates indices it can see without a device sync (CPU tensors, Python lists).
"""
import triton
import triton.language as tl

from . import FP32, HALF, SIZES, cdiv, enumerates, variant
from .gemm import tile_of, tma_mainloop


@triton.jit
def _rows_of(pid, M, idx_ptr, perm_ptr, n_adapters, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr):
    """(rows as int64, their adapter ids, which of them use an adapter) for the BLOCK_M row
    positions of block ``pid``; ids outside [0, n_adapters) count as "no adapter"."""
    pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_ok = pos < M
    if HAS_PERM:
        rows = tl.load(perm_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    a = tl.load(idx_ptr + rows, mask=pos_ok, other=-1).to(tl.int32)
    used = pos_ok & (a >= 0) & (a < n_adapters)
    return rows, a, used


@triton.jit
def multi_shrink_kernel(
    x_ptr, e_ptr, idx_ptr, perm_ptr, p_ptr,
    M, K, R, n_adapters, k_per_split,
    stride_xm, stride_xk, stride_ea, stride_ek, stride_er,
    HAS_PERM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # p[split, row, :R] = X[row, split's K range] @ E[a(row)][split's K range, :R]  (fp32);
    # rows without an adapter get zeros.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows, a, used = _rows_of(pid, M, idx_ptr, perm_ptr, n_adapters, HAS_PERM, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    todo = used
    while tl.max(todo.to(tl.int32), 0) > 0:
        cur = tl.min(tl.where(todo, a, n_adapters), 0)                          # next adapter among the rows
        seg = todo & (a == cur)
        e_base = e_ptr + cur.to(tl.int64) * stride_ea
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=seg[:, None] & k_ok[None, :], other=0.0)
            et = tl.load(e_base + kk[:, None].to(tl.int64) * stride_ek + rr[None, :] * stride_er,
                         mask=k_ok[:, None] & (rr[None, :] < R), other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
            acc = tl.dot(xt, et.to(xt.dtype), acc, input_precision=PRECISION)
        todo = todo & (a != cur)
    p_ptrs = p_ptr + (split * M + rows)[:, None] * R + rr[None, :]
    pos_ok = (pid * BLOCK_M + tl.arange(0, BLOCK_M)) < M
    tl.store(p_ptrs, acc, mask=pos_ok[:, None] & (rr[None, :] < R))


@triton.jit
def multi_expand_kernel(
    out_ptr, p_ptr, f_ptr, scale_ptr, idx_ptr, perm_ptr,
    M, N, R, n_adapters,
    stride_om, stride_pm, stride_pr, stride_fa, stride_fr, stride_fn,
    HAS_PERM: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[row, cols] += s[a] * P[row, :R] @ F[a][:R, cols], in place (unit column stride);
    # rows without an adapter are neither read nor written.
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, a, used = _rows_of(pid, M, idx_ptr, perm_ptr, n_adapters, HAS_PERM, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rr = tl.arange(0, BLOCK_R)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    todo = used
    while tl.max(todo.to(tl.int32), 0) > 0:
        cur = tl.min(tl.where(todo, a, n_adapters), 0)
        seg = todo & (a == cur)
        s = tl.load(p_ptr + rows[:, None] * stride_pm + rr[None, :] * stride_pr,
                    mask=seg[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        s = s * tl.load(scale_ptr + cur).to(tl.float32)
        f = tl.load(f_ptr + cur.to(tl.int64) * stride_fa + rr[:, None] * stride_fr + rn[None, :].to(tl.int64) * stride_fn,
                    mask=(rr[:, None] < R) & n_ok[None, :], other=0.0).to(tl.float32)
        low = tl.dot(s, f, low, input_precision=EPI_PRECISION)
        todo = todo & (a != cur)
    mask = used[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + low).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def multi_wgrad_kernel(
    x_ptr, f_ptr, scale_ptr, perm_ptr, offsets_ptr, g_ptr,
    C, R, n_adapters,
    stride_xm, stride_xc, stride_fm, stride_fr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # g[split, a, cols, :R] = s[a] * X[rows, cols]^T @ F[rows, :R] over this split's part of
    # adapter a's segment (sorted positions offsets[a] .. offsets[a + 1]); zeros if empty.
    a = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    start = tl.load(offsets_ptr + a)
    end = tl.load(offsets_ptr + a + 1)
    chunk = tl.cdiv(tl.cdiv(end - start, splits), BLOCK_M) * BLOCK_M
    lo = start + split * chunk
    hi = tl.minimum(end, lo + chunk)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    rr = tl.arange(0, BLOCK_R)
    bm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_M):
        pos_ok = (p0 + bm) < hi
        rows = tl.load(perm_ptr + p0 + bm, mask=pos_ok, other=0).to(tl.int64)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + rc[None, :] * stride_xc,
                     mask=pos_ok[:, None] & c_ok[None, :], other=0.0)
        ft = tl.load(f_ptr + rows[:, None] * stride_fm + rr[None, :] * stride_fr,
                     mask=pos_ok[:, None] & (rr[None, :] < R), other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(tl.trans(xt), ft.to(xt.dtype), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + a).to(tl.float32)
    g_ptrs = g_ptr + ((split * n_adapters + a) * C + rc).to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(g_ptrs, acc, mask=c_ok[:, None] & (rr[None, :] < R))


@triton.jit
def multi_gemm_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr, s_ptr, e_ptr, scale_ptr, idx_ptr,
    M, N, K, R, n_adapters,
    stride_sm, stride_sr, stride_ea, stride_er, stride_en,
    HAS_BIAS: tl.constexpr, W_NK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # out = X @ W (+ bias) + s_a S_t E_a per row t, on the shared persistent TMA main loop
    # (kernels/gemm.py): the grouped expand rides in the epilogue, so y is written once.
    # Rows keep their order (a prefill tile of one sequence holds one adapter); the epilogue
    # loops over the distinct adapters among the tile's rows, each BLOCK_R more K-steps of the
    # single accumulator with the other rows' S masked to zero. Forward: X = x, W = weight^T,
    # S = x A_a^T, E_a = B_a^T; backward dx: X = dY, W = weight, S = G = dY B_a, E_a = A_a.
    op_ty = x_desc.dtype
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        off_m, off_n = tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc, _ = tma_mainloop(x_desc, w_desc, x_desc, off_m, off_n, K, W_NK, False, UPCAST, PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        rn_in = rn % N
        m_ok = rm < M
        a = tl.load(idx_ptr + rm, mask=m_ok, other=-1).to(tl.int32)
        todo = m_ok & (a >= 0) & (a < n_adapters)
        rm64 = rm.to(tl.int64)
        while tl.max(todo.to(tl.int32), 0) > 0:
            cur = tl.min(tl.where(todo, a, n_adapters), 0)
            seg = todo & (a == cur)
            s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                        mask=seg[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
            s = s * tl.load(scale_ptr + cur).to(tl.float32)
            e = tl.load(e_ptr + cur.to(tl.int64) * stride_ea + rr[:, None] * stride_er
                        + rn_in[None, :].to(tl.int64) * stride_en, mask=rr[:, None] < R, other=0.0)
            if UPCAST:
                acc = tl.dot(s, e.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(s.to(op_ty), e.to(op_ty), acc, input_precision=PRECISION)
            todo = todo & (a != cur)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


MIN_ARCH = {"multi_gemm_tma_kernel": 90}  # read by the launcher and by compile-check


# --------------------------------------------------------------------------- launch configs
DECODE_ROWS = 64  # up to here a row block is 16 rows (decode: one row per sequence)


def shrink_config(M, K, interpret, want_programs):
    """``multi_shrink_kernel``: row blocks of 16 (decode) or 64 rows, 64-deep K tiles, and K
    split across programs until about ``want_programs`` run: decode has 4 row blocks at 64
    sequences, and its bytes are the adapters' A (64 x 128 KiB at r = 16, k = 4096), so its
    splits go down to 128 columns (128 programs); prefill's to 512."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_K=64, splits=1, k_per_split=K, num_warps=4, num_stages=1)
    block_m = 16 if M <= DECODE_ROWS else 64
    m_blocks = cdiv(M, block_m)
    splits = max(1, min(want_programs // max(m_blocks, 1), K // (128 if M <= DECODE_ROWS else 512)))
    k_per_split = cdiv(cdiv(K, 64), splits) * 64
    return dict(BLOCK_M=block_m, BLOCK_K=64, splits=cdiv(K, k_per_split) if K else 1, k_per_split=k_per_split,
                num_warps=4, num_stages=3)


def expand_config(M, N, interpret, ieee=False):
    """``multi_expand_kernel``: memory-bound (one read + write of the rows' outputs). fp32 at
    full precision (an IEEE ``tl.dot``) takes 32x64 tiles: at 64x128 compile-check found
    768-2848 B of spills on sm_90."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    if M <= DECODE_ROWS:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)
    if ieee:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)


def wgrad_config(T, C, n, interpret, want_programs):
    """``multi_wgrad_kernel``: 64 rows a step, 64 columns a program; each adapter's segment
    split until about ``want_programs`` programs run (one adapter over many rows: a few
    column blocks alone leave SMs idle), at most 16 splits and none under 4 row steps."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_C=64, splits=1, num_warps=4, num_stages=1)
    block_m, block_c = 64, 64
    programs = n * cdiv(C, block_c)
    splits = max(1, min(16, want_programs // max(programs, 1), cdiv(T, 4 * block_m)))
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, splits=splits, num_warps=4, num_stages=3)


def tma_config(M, N, interpret, num_sms):
    """``multi_gemm_tma_kernel``: the single-adapter TMA GEMM's tiles (kernels/lora.py
    ``tma_config``: 128x256x64 / 8 warps / 3 stages while that fills the SMs, then 128x128,
    then 64x128); its epilogue holds the same S / E tiles, once per adapter in the tile."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    if cdiv(M, 128) * cdiv(N, 256) >= num_sms:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if cdiv(M, 128) * cdiv(N, 128) >= num_sms:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


# ------------------------------------------- every config the functions above can return
# (compile-check compiles each over the recorded flag paths: tests/test_config_variants.py)
_ENUM_SMS = (132, 108)                 # H100 / H200, A100
_ENUM_WIDTHS = (256, 1024, 4096, 16384)


@enumerates(shrink_config)
def shrink_config_variants():
    for M in SIZES:
        for K in _ENUM_WIDTHS:
            for sms in _ENUM_SMS:
                yield variant("multi_shrink_kernel", shrink_config(M, K, False, 2 * sms))


@enumerates(expand_config)
def expand_config_variants():
    for M in SIZES:
        yield variant("multi_expand_kernel", expand_config(M, 4096, False), dtypes=HALF)
        # fp32 at full precision (torch's default, what the suite runs); fp32 under tf32 takes
        # the half-precision tiles above
        yield variant("multi_expand_kernel", expand_config(M, 4096, False, ieee=True), dtypes=FP32,
                      where=dict(EPI_PRECISION="ieee"))


@enumerates(wgrad_config)
def wgrad_config_variants():
    for T in SIZES:
        for n in (1, 4, 64):
            for sms in _ENUM_SMS:
                yield variant("multi_wgrad_kernel", wgrad_config(T, 4096, n, False, 2 * sms))


def _tma_descs(c):
    """multi_gemm_tma_kernel's TMA descriptor boxes (ops/lora_multi.py) for constexprs ``c``."""
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    return {"x_desc": [bm, bk], "w_desc": [bn, bk] if c["W_NK"] else [bk, bn], "out_desc": [bm, bn]}


@enumerates(tma_config)
def tma_config_variants():
    for M in SIZES:
        for N in _ENUM_WIDTHS:
            yield variant("multi_gemm_tma_kernel", tma_config(M, N, False, 132), dtypes=HALF, descs=_tma_descs)
