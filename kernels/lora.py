"""LoRA kernels.

Forward   y  = x W^T + b + g * s * (drop(x) A^T) B^T          (g: gate per row, s: scaling)
          (up to FUSE_S_MAX_ROWS rows, S = drop(x) A^T is made inside the GEMM: one launch)
Backward  (W frozen; S = drop(x) A^T is saved, [T, r] fp32)
          dYB = dY B                                          [T, r]   -- rank r
          dB  = (g s dY)^T S                                  [out, r] -- reduce over T
          dS  = g s dYB                                       [T, r]
          dA  = dS^T drop(x)                                  [r, in]  -- reduce over T
          dx  = dY W + drop'(dS A)                            [T, in]
          dg  = s * rowsum(dYB * S)                           [T]

Four kernels cover all of it:
* ``lora_gemm_kernel``: out = X @ W (+ bias) + scale * rowscale * keep * (S @ E).
  Forward: X = x, W = weight^T, S = drop(x) A^T, E = B^T, rowscale = gate.
  Backward dx: X = dY, W = weight, S = dS, E = A, keep = the forward's dropout mask.
  One accumulator: after the X @ W main loop the rank-r term is BLOCK_R more K-steps of
  the same MMA (rowscale and scale folded into S first). Only the dx dropout epilogue
  needs the product on its own (the mask is elementwise on dS A).
* ``lora_gemm_tma_kernel``: the same, on the shared Hopper main loop (kernels/gemm.py:
  persistent grid, grouped tiles, TMA in and out, wgmma) for > 256 rows of a bf16 / fp16
  base on sm_90+; without dropout it also makes S from the x tiles of its main loop, so
  the forward is one launch at every row count.
* ``lora_rank_add_kernel``: out += scale * rowscale * keep * (S @ E) in place, beside a
  cuBLAS GEMM (the ``cublas`` path of peftops/ops/lora.py).
* ``lora_skinny_kernel``: one pass over a [M, N] matrix X (x or dY) computing
  P1 = drop(X) @ E   ([M, r], partial over column splits) and/or
  P2 = drop(X)^T @ F ([N, r], partial per row block).
  Forward S: X = x, E = A^T.  Backward: X = dY, E = B -> dYB, F = g s S -> dB (one pass
  over dY).  dA: X = x with the dropout mask, F = dS.
Partials are summed on the host in a fixed order: no atomics, repeatable results.

Dropout: keep(m, n) = rand(seed, m * n_cols + n) >= p, scaled by 1 / (1 - p); the same
(seed, row, column) gives the same mask in every kernel, so nothing [T, in] is stored.
"""
import triton
import triton.language as tl

from . import FP32, HALF, SIZES, cdiv, enumerates, next_pow2, variant
from .gemm import block_of, tile_of, tma_mainloop


@triton.jit
def _dropout(tile, rows, cols, n_cols, seed, p, inv_keep):
    """Inverted dropout on a tile whose elements sit at (rows, cols) of a [*, n_cols] matrix."""
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    keep = tl.rand(seed, offs) >= p
    return tl.where(keep, tile * inv_keep, 0.0)


@triton.jit
def _rank_r_epilogue(acc, s, rm, rn, M, N, R, store_s, s_ptr, stride_sm, stride_sr, e_ptr, stride_er, stride_en,
                     rowscale_ptr, colscale_ptr, bias_ptr, scale, seed, p, inv_keep, op_ty: tl.constexpr,
                     FUSE_S: tl.constexpr, HAS_ROWSCALE: tl.constexpr, HAS_COLSCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DROP_EPI: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     EPI_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """Both GEMMs' epilogue: colscale * (acc + scale * rowscale * drop(S @ E)) + bias for the
    tile at rows rm, columns rn (colscale: DoRA's m / n per output column, applied before
    the bias, which DoRA does not scale). S [BLOCK_M, r] (r padded to BLOCK_R >= 16) is the fused one (stored for
    backward where ``store_s``) or read from s_ptr; the row gate and the scaling are folded
    into S first (a [BLOCK_M, BLOCK_R] multiply, not a [BLOCK_M, BLOCK_N] one). Rows /
    columns past the edge are wrapped (the caller masks or clips the store)."""
    rr = tl.arange(0, BLOCK_R)
    rm_in = (rm % M).to(tl.int64)
    rn_in = rn % N
    s_ptrs = s_ptr + rm_in[:, None] * stride_sm + rr[None, :] * stride_sr
    if FUSE_S:
        if store_s:
            tl.store(s_ptrs, s, mask=(rm[:, None] < M) & (rr[None, :] < R))
    else:
        s = tl.load(s_ptrs, mask=rr[None, :] < R, other=0.0).to(tl.float32)
    s = s * scale
    if HAS_ROWSCALE:
        s = s * tl.load(rowscale_ptr + rm_in).to(tl.float32)[:, None]
    e = tl.load(e_ptr + rr[:, None] * stride_er + rn_in[None, :].to(tl.int64) * stride_en,
                mask=rr[:, None] < R, other=0.0)
    if DROP_EPI:
        # dx with dropout: the mask acts elementwise on (dS A), so this product needs its own
        # tile before it joins the accumulator (launch configs keep the pair spill-free).
        low = tl.dot(s, e.to(tl.float32), input_precision=EPI_PRECISION)
        acc += _dropout(low, rm_in, rn, N, seed, p, inv_keep)
    elif UPCAST:
        acc = tl.dot(s, e.to(tl.float32), acc, input_precision=PRECISION)
    else:
        # One accumulator: BLOCK_R more K-steps of the same MMA, operands in the main loop's
        # dtype (S rounded to it, as the eager formula rounds x A^T; fp32 adapters cast here).
        acc = tl.dot(s.to(op_ty), e.to(op_ty), acc, input_precision=PRECISION)
    if HAS_COLSCALE:
        acc = acc * tl.load(colscale_ptr + rn_in)[None, :]                      # fp32 [N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    return acc


@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, e_ptr, rowscale_ptr, colscale_ptr, a_ptr, out_ptr, part_ptr, part_s_ptr,
    arrived_ptr,
    M, N, K, R, k_per_split,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr,
    stride_er, stride_en, stride_ar, stride_ak, stride_om, stride_on,
    scale, seed, p, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_ROWSCALE: tl.constexpr, HAS_COLSCALE: tl.constexpr, FUSE_S: tl.constexpr,
    STORE_S: tl.constexpr, DROP_S: tl.constexpr, DROP_EPI: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # FUSE_S (few rows, e.g. decode): S = drop(x) A^T is computed here from the x tiles the
    # main loop loads anyway (A^T read from L2 by every column block; with STORE_S the
    # pid_n == 0 blocks store S for backward; inference stores nothing): one launch instead
    # of three. Otherwise S is read from s_ptr.
    # DROP_S: dropout on the x tiles feeding S. DROP_EPI: dropout on the rank-r term (dx).
    # Grouped tile order: GROUP_M row blocks share each column block of W while in L2.
    # SPLIT_K (decode with fewer column tiles than SMs): program (tile, j) runs the main loop
    # over K columns [j * k_per_split, +k_per_split) and stores its fp32 partials (acc and
    # S); the last split of a tile to arrive (one counter per tile) sums every split's
    # partials in split order, so the result does not depend on which one is last, runs the
    # epilogue and resets the counter for the next launch. One launch, no atomics on data.
    pid = tl.program_id(0)
    pid_m, pid_n = block_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_lo = 0
    k_hi = K
    if SPLIT_K:
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
    # Rows / columns past the edge are wrapped (their results are masked at the store),
    # so the main loop only masks K.
    rm_in = (rm % M).to(tl.int64)
    rn_in = rn % N
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + (k_lo + rk)[None, :] * stride_xk
    w_ptrs = w_ptr + (k_lo + rk)[:, None] * stride_wk + rn_in[None, :].to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                          # read from s_ptr unless FUSE_S
    if FUSE_S:
        a_ptrs = a_ptr + (k_lo + rk)[:, None] * stride_ak + rr[None, :] * stride_ar  # A^T tile [BLOCK_K, BLOCK_R]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_left = k_hi - k0
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if FUSE_S:
            at = tl.load(a_ptrs, mask=(rk[:, None] < k_left) & (rr[None, :] < R), other=0.0)
            xs = a
            if DROP_S:
                xs = _dropout(a.to(tl.float32), rm_in, k0 + rk, K, seed, p, inv_keep).to(a.dtype)
            s = tl.dot(xs, at.to(a.dtype), s, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    store_s = False
    if STORE_S:
        store_s = pid_n == 0
    rows_out = M                                                                # rows this program writes
    if SPLIT_K:
        acc, s, last = _sum_splits(acc, s, pid, part_ptr, part_s_ptr, arrived_ptr, FUSE_S,
                                   BLOCK_M, BLOCK_N, BLOCK_R)
        if STORE_S:
            store_s = pid_n + (1 - last) == 0
        rows_out = M * last                                                     # (a mask the interpreter takes too)
    acc = _rank_r_epilogue(acc, s, rm, rn, M, N, R, store_s, s_ptr, stride_sm, stride_sr, e_ptr, stride_er,
                           stride_en, rowscale_ptr, colscale_ptr, bias_ptr, scale, seed, p, inv_keep,
                           x_ptr.dtype.element_ty, FUSE_S, HAS_ROWSCALE, HAS_COLSCALE, HAS_BIAS, DROP_EPI, UPCAST, PRECISION, EPI_PRECISION, BLOCK_R)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < rows_out) & (rn[None, :] < N))


@triton.jit
def _sum_splits(acc, s, tile, part_ptr, part_s_ptr, arrived_ptr, FUSE_S: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split-K: store this split's fp32 partials (acc, and S with FUSE_S) of ``tile``, count
    the arrival; the last split returns (sum of every split's partials in split order, 1),
    the others (their own partials, 0: their epilogue's stores are masked off)."""
    splits = tl.num_programs(1)
    tiles = tl.num_programs(0)
    bm = tl.arange(0, BLOCK_M)
    tile_off = bm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    s_off = bm[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    mine = (tl.program_id(1) * tiles + tile).to(tl.int64)
    tl.store(part_ptr + mine * (BLOCK_M * BLOCK_N) + tile_off, acc)
    if FUSE_S:
        tl.store(part_s_ptr + mine * (BLOCK_M * BLOCK_R) + s_off, s)
    # Every thread's partial is written before one thread releases the count (barrier, then
    # a gpu-scope acq_rel atomic); the last split's reads come after its acquire, from L2.
    tl.debug_barrier()
    last = (tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel", scope="gpu") == splits - 1).to(tl.int32)
    if last == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, splits):
            q = (j * tiles + tile).to(tl.int64)
            acc += tl.load(part_ptr + q * (BLOCK_M * BLOCK_N) + tile_off, cache_modifier=".cg")
            if FUSE_S:
                s += tl.load(part_s_ptr + q * (BLOCK_M * BLOCK_R) + s_off, cache_modifier=".cg")
        tl.atomic_xchg(arrived_ptr + tile, 0, sem="relaxed", scope="gpu")     # ready for the next launch
    return acc, s, last


@triton.jit
def lora_gemm_tma_kernel(
    x_desc, w_desc, a_desc, out_desc, bias_ptr, s_ptr, e_ptr, rowscale_ptr, colscale_ptr,
    M, N, K, R,
    stride_sm, stride_sr, stride_er, stride_en,
    scale, seed, p, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_ROWSCALE: tl.constexpr, HAS_COLSCALE: tl.constexpr, FUSE_S: tl.constexpr,
    STORE_S: tl.constexpr, W_NK: tl.constexpr, DROP_EPI: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # lora_gemm_kernel's math on the shared Hopper main loop (kernels/gemm.py): persistent
    # programs (one per SM) walk the tiles in grouped order; X, W (and A^T with FUSE_S) come
    # in by TMA, the output leaves by TMA. FUSE_S at any row count (no dropout): S = x A^T
    # is accumulated from the x tiles of the main loop, so the separate pass over x goes
    # (every column block redoes it: BLOCK_R / BLOCK_N more MMA work, 6 % at 256 columns);
    # with STORE_S the blocks at column 0 store S for backward.
    op_ty = x_desc.dtype
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        off_m, off_n = tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc, s = tma_mainloop(x_desc, w_desc, a_desc, off_m, off_n, K, W_NK, FUSE_S, UPCAST, PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        store_s = False
        if STORE_S:
            store_s = off_n == 0
        acc = _rank_r_epilogue(acc, s, rm, rn, M, N, R, store_s, s_ptr, stride_sm, stride_sr, e_ptr, stride_er,
                               stride_en, rowscale_ptr, colscale_ptr, bias_ptr, scale, seed, p, inv_keep, op_ty,
                               FUSE_S, HAS_ROWSCALE, HAS_COLSCALE, HAS_BIAS, DROP_EPI, UPCAST, PRECISION, EPI_PRECISION, BLOCK_R)
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def lora_rank_add_kernel(
    out_ptr, s_ptr, e_ptr, rowscale_ptr, colscale_ptr, bias_ptr,
    M, N, R,
    stride_om, stride_sm, stride_sr, stride_er, stride_en,
    scale, seed, p, inv_keep,
    HAS_ROWSCALE: tl.constexpr, HAS_COLSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    EPI_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out += scale * rowscale * drop(S @ E), in place: the small fused kernel beside a cuBLAS
    # GEMM (the ``cublas`` path). With HAS_COLSCALE / HAS_BIAS (DoRA over a bias-free cuBLAS
    # x W^T): out = colscale * (out + scale * S @ E) + bias. One read and one write of out; S [M, r] fp32, E [r, N] in
    # any float dtype (fp32 adapters over a half base are read as they are). Unit column
    # stride for out (the launcher makes sure).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rowscale = scale
    if HAS_ROWSCALE:
        rowscale = tl.load(rowscale_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) * scale
    if EPI_PRECISION == "ieee":
        # fp32 at full precision: r rank-1 updates on the FMA units (an IEEE tl.dot
        # spills kilobytes of stack here on sm_90).
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, R):
            s_j = tl.load(s_ptr + rm64 * stride_sm + j * stride_sr, mask=m_ok, other=0.0).to(tl.float32)
            e_j = tl.load(e_ptr + j * stride_er + rn.to(tl.int64) * stride_en, mask=n_ok, other=0.0).to(tl.float32)
            low += s_j[:, None] * e_j[None, :]
        if HAS_ROWSCALE:
            low = low * rowscale[:, None]
        else:
            low = low * scale
    else:
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=m_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        if HAS_ROWSCALE:
            s = s * rowscale[:, None]
        else:
            s = s * scale
        e = tl.load(e_ptr + rr[:, None] * stride_er + rn[None, :].to(tl.int64) * stride_en,
                    mask=(rr[:, None] < R) & n_ok[None, :], other=0.0).to(tl.float32)
        low = tl.dot(s, e, input_precision=EPI_PRECISION)
    if DROPOUT:
        low = _dropout(low, rm, rn, N, seed, p, inv_keep)
    out_ptrs = out_ptr + rm64[:, None] * stride_om + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32) + low
    if HAS_COLSCALE:
        out = out * tl.load(colscale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lora_skinny_kernel(
    x_ptr, e_ptr, f_ptr, f_rowscale_ptr, p1_ptr, p2_ptr,
    M, N, R, n_per_split,
    stride_xm, stride_xn, stride_en, stride_er, stride_fm, stride_fr,
    f_scale, seed, p, inv_keep,
    DO_P1: tl.constexpr, DO_P2: tl.constexpr, F_ROWSCALE: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program (pid_m, pid_s) reads rows [pid_m * BLOCK_M, +BLOCK_M) and the columns of
    # split pid_s of X once, and writes
    #   p1[pid_s, rows, :]   = drop(X)[rows, split] @ E[split, :]      (sum over splits = P1)
    #   p2[pid_m, cols, :]   = drop(X)[rows, cols]^T @ F[rows, :]      (sum over pid_m = P2)
    # F is scaled as it is loaded: f_scale * f_rowscale[row] * F (the gate and the scaling of
    # g s S and of dS = g s dY B, so the host makes no [T, r] product for them).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    rm64 = rm.to(tl.int64)

    if DO_P2:
        f = tl.load(f_ptr + rm64[:, None] * stride_fm + rr[None, :] * stride_fr,
                    mask=m_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32) * f_scale
        if F_ROWSCALE:
            f = f * tl.load(f_rowscale_ptr + rm64, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_stop
        xt = tl.load(x_ptr + rm64[:, None] * stride_xm + rn[None, :] * stride_xn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DROPOUT:
            xt = _dropout(xt.to(tl.float32), rm, rn, N, seed, p, inv_keep).to(xt.dtype)
        if UPCAST:
            xt = xt.to(tl.float32)
        if DO_P1:
            e = tl.load(e_ptr + rn[:, None] * stride_en + rr[None, :] * stride_er,
                        mask=n_ok[:, None] & (rr[None, :] < R), other=0.0)
            acc1 = tl.dot(xt, e.to(xt.dtype), acc1, input_precision=PRECISION)
        if DO_P2:
            part = tl.dot(tl.trans(xt), f.to(xt.dtype), input_precision=PRECISION)
            p2_ptrs = p2_ptr + (pid_m * N + rn).to(tl.int64)[:, None] * R + rr[None, :]
            tl.store(p2_ptrs, part, mask=n_ok[:, None] & (rr[None, :] < R))
    if DO_P1:
        p1_ptrs = p1_ptr + (pid_s * M + rm64)[:, None] * R + rr[None, :]
        tl.store(p1_ptrs, acc1, mask=m_ok[:, None] & (rr[None, :] < R))


# Up to this many rows the forward computes S inside the GEMM (FUSE_S): one launch, and the
# redundant S work (every column block redoes drop(x) A^T for its rows) stays negligible.
FUSE_S_MAX_ROWS = 64


def gemm_config(M, N, K, interpret, num_sms, drop_epi=False, drop_s=False):
    """Launch config for ``lora_gemm_kernel`` by row count. Each choice is spill-free on
    sm_90 by ``python -m peftops compile-check`` (registers a thread in brackets).

    Large M: 128x256x64 tiles, 8 warps, 3 stages, wgmma (194): the single accumulator is
    128 of them. The dx dropout epilogue holds a second tile plus the Philox state, which
    spills at 128x128 (255 + 184 B), so it runs 64x128 on 8 warps (169). Up to 64 rows
    (decode) the GEMM streams W once: narrow column tiles give a program per 32 columns
    (128 programs at N = 4096) and deep K tiles keep loads in flight; with dropout on the
    fused S pass K tiles are 64 deep (128 at 128 deep: 8 B spill) on 8 warps (the Philox state:
    fp16 32-row tiles spilled 8 B on 4 warps, at a 128-register cap). Where that leaves SMs
    without a program (N / 32 < SMs: every N <= 4096 on an H100), K is split (``splits``,
    ``k_per_split``; see ``decode_splits``) in 64-deep K tiles (the fused-S split variant
    spills 8 B on sm_80 at 128; more programs keep as many loads in flight). Not yet tuned
    on a lent GPU (bench provider ``peftops[kernel]``).
    """
    if interpret:  # few, large programs: the interpreter's cost is per program and op
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1,
                    splits=1, k_per_split=K)
    if M <= 64:
        block_m = max(16, next_pow2(M))
        split = decode_splits(cdiv(M, block_m) * cdiv(N, 32), K, 64, num_sms)
        block_k = 64 if drop_s or split["splits"] > 1 else 128
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=1, num_warps=8 if drop_s else 4,
                    num_stages=4, **(split if split["splits"] > 1 else dict(splits=1, k_per_split=K)))
    one = dict(splits=1, k_per_split=K)
    if drop_epi:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, **one)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, **one)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, **one)


# The SM counts compile-check enumerates the SM-dependent configs for: an H100 / H200 (132), an A100 (108).
ENUMERATED_SMS = (132, 108)
# Output widths / reduction depths the enumerations evaluate the split-K and tile choices at.
_ENUM_WIDTHS = (256, 1024, 4096, 16384)


@enumerates(gemm_config)
def gemm_config_variants():
    for M in SIZES:
        for N in _ENUM_WIDTHS:
            for sms in ENUMERATED_SMS:
                for drop_epi, drop_s in ((False, False), (True, False), (False, True))[:3 if M <= FUSE_S_MAX_ROWS else 2]:
                    cfg = gemm_config(M, N, 4096, False, sms, drop_epi=drop_epi, drop_s=drop_s)
                    # > 64 rows S comes in made (FUSE_S only up to FUSE_S_MAX_ROWS; beyond, the TMA kernel)
                    # SPLIT_K selects the arguments too (fp32 partials, counters): a flag to match, not to set
                    where = dict(DROP_EPI=drop_epi, DROP_S=drop_s, SPLIT_K=cfg["splits"] > 1,
                                 **({} if M <= FUSE_S_MAX_ROWS else dict(FUSE_S=False)))
                    yield variant("lora_gemm_kernel", cfg, where=where)


# Decode split-K (lora_gemm_kernel's SPLIT_K): on (DECODE_SPLIT_K), each split at least this
# many K columns deep (4 K-steps of 128: the 4-stage pipeline stays full).
DECODE_SPLIT_K = True
DECODE_SPLIT_MIN_K = 512


def decode_splits(tiles, K, block_k, num_sms):
    """K splits for the decode GEMM's ``tiles`` programs: enough to give every SM a program
    (decode is bound by streaming W; an SM without a program is bandwidth left unused: a
    1.1B Llama's 256-wide k / v projection has 8 column tiles for 132 SMs), none shallower
    than DECODE_SPLIT_MIN_K. The partials cost 2 x splits x BLOCK_M x N x 4 bytes through L2
    (0.5 MB at N = 4096, 16 rows, 2 splits, against 33.5 MB of W)."""
    splits = 1
    if DECODE_SPLIT_K and tiles < num_sms:
        splits = max(1, min(cdiv(num_sms, tiles), K // DECODE_SPLIT_MIN_K))
    k_per_split = cdiv(cdiv(K, block_k), splits) * block_k
    return dict(splits=cdiv(K, k_per_split) if K else 1, k_per_split=k_per_split)


# The persistent TMA GEMM (lora_gemm_tma_kernel) takes over above this many rows, on sm_90+
# (its tiles are sized for wgmma; sm_80 keeps lora_gemm_kernel, where 128x256 tiles on
# mma.sync spill 3-4 KB), for bf16 / fp16 operands whose strides TMA can read (fp32 keeps
# lora_gemm_kernel).
TMA_MIN_ROWS = 257
MIN_ARCH = {"lora_gemm_tma_kernel": 90}  # read by the launcher and by compile-check
# Without dropout the TMA GEMM makes S = x A^T in its main loop (BLOCK_R / BLOCK_N more MMA
# work on n = 16 instructions) instead of the skinny pass over x first (0.040 ms at T = 8192
# on an H100); bench/MODEL.md weighs the two, a GPU run of peftops[kernel] decides.
TMA_FUSE_S = True


# DoRA's column scale (m / n) in the TMA GEMM's epilogue at 128x256 tiles: 248 registers a
# thread on sm_90 (202 without it), 0 spills. False: such launches take 128x128 tiles instead
# (bench provider peftops[kernel:colscale_128] times the alternative).
TMA_COLSCALE_WIDE = True


def tma_config(M, N, K, interpret, num_sms, drop_epi=False, colscale=False):
    """Launch config for ``lora_gemm_tma_kernel`` (registers a thread, shared KiB on sm_90 by
    compile-check; none spills). The largest tile that still gives every SM a tile:
    128x256x64, 8 warps, 3 stages (two warpgroups of 64x256 wgmma, 48 KiB a stage: 190-218
    regs, 220-224 KiB); then 128x128 (4 stages), then 64x128 on 4 warps (narrow outputs such
    as a 1.1B Llama's k / v projections, 256 wide). The dx dropout epilogue holds a second
    fp32 tile and the Philox state, so it runs 64x128 tiles on 8 warps at every size (139-142
    regs under triton 3.6 and 3.9; 4 warps spilled 24-32 B once dx took the row gate as a
    rowscale; 128x128 on 8 warps, 197 regs under 3.9, spilled 8 B under 3.6 at 255, and on 16
    warps 72 B under 3.9 at the 128 a thread 16 warps allow). Not yet timed on a GPU."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    def tiles(bm, bn):
        return cdiv(M, bm) * cdiv(N, bn)
    if drop_epi:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if not (colscale and not TMA_COLSCALE_WIDE) and tiles(128, 256) >= num_sms:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if tiles(128, 128) >= num_sms:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


def _tma_descs(c):
    """lora_gemm_tma_kernel's TMA descriptor boxes (ops/lora.py ``_gemm``) for constexprs ``c``."""
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    return {"x_desc": [bm, bk], "w_desc": [bn, bk] if c["W_NK"] else [bk, bn],
            "a_desc": [c["BLOCK_R"], bk] if c["FUSE_S"] else [bm, bk], "out_desc": [bm, bn]}


@enumerates(tma_config)
def tma_config_variants():
    for M in (m for m in SIZES if m >= TMA_MIN_ROWS):
        for N in _ENUM_WIDTHS:
            for drop_epi in (False, True):
                yield variant("lora_gemm_tma_kernel", tma_config(M, N, 4096, False, 132, drop_epi=drop_epi),
                              dtypes=HALF, where=dict(DROP_EPI=drop_epi), descs=_tma_descs)


def rank_add_config(M, N, interpret, dropout=False):
    """Launch config for ``lora_rank_add_kernel`` (memory-bound: one read + one write of
    out); 8 warps with dropout (the Philox state: 254 registers a thread at 4)."""
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8 if dropout else 4)


@enumerates(rank_add_config)
def rank_add_config_variants():
    for dropout in (False, True):
        yield variant("lora_rank_add_kernel", rank_add_config(4096, 4096, False, dropout), where=dict(DROPOUT=dropout))


def skinny_config(M, N, want_programs, interpret, half=True, p1=True):
    """Launch config for ``lora_skinny_kernel``: tile sizes and the number of column
    splits (enough programs to fill the GPU when M is small). Up to 16 rows, P2 alone (dA)
    takes 128-wide tiles: at 256 its half-precision variant spills 16 B on sm_80."""
    warps = 4
    if interpret:
        block_m, block_n = 32, 64
    elif M <= 16:
        block_m, block_n = 16, 256 if p1 else 128
    elif M < SKINNY_TALL_ROWS or not half:
        block_m, block_n = 64, 128
    else:  # P2's fp32 partials are one [N, r] per row block: 256-row blocks write 4x fewer
        block_m, block_n, warps = 256, 64, 8  # (T = 8192, d = 4096, r = 16: 8.4 MB, not 33.5);
        # bf16 / fp16 only: fp32 tiles this tall spill 0.6-1.5 KB with dropout
    m_blocks = cdiv(M, block_m)
    n_blocks = cdiv(N, block_n)
    splits = 1 if interpret else max(1, min(n_blocks, want_programs // max(m_blocks, 1)))
    n_per_split = cdiv(n_blocks, splits) * block_n
    splits = cdiv(N, n_per_split)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, splits=splits, n_per_split=n_per_split,
                num_warps=warps, num_stages=3)


SKINNY_TALL_ROWS = 2048  # from here on lora_skinny_kernel takes 256-row blocks


@enumerates(skinny_config)
def skinny_config_variants():
    for M in SIZES:
        for half in (True, False):
            for p1 in (True, False):  # p1: the pass makes P1 = drop(x) e (DO_P1)
                yield variant("lora_skinny_kernel", skinny_config(M, 4096, 264, False, half=half, p1=p1),
                              dtypes=HALF if half else FP32, where=dict(DO_P1=p1))


@triton.jit
def dropout_mask_kernel(out_ptr, M, N, seed, p, inv_keep, BLOCK: tl.constexpr):
    """Writes the 0/1 keep mask ``_dropout`` applies over a [M, N] matrix (tests read it)."""
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ones = tl.full((BLOCK, BLOCK), 1.0, tl.float32)
    keep = _dropout(ones, rm, rn, N, seed, p, inv_keep) != 0.0
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], keep.to(tl.float32),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
