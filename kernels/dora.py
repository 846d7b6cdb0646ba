"""DoRA kernels: what DoRA adds to the LoRA kernels (kernels/lora.py).

    y = c * (x W^T + s (x A^T) B^T) + b,    c = m / n,   n_i = ||W_i + s (B A)_i||  (detached)

The forward is the LoRA forward with ``c`` as a per-output-column scale in the epilogue of
the LoRA GEMM / rank-r add (kernels/lora.py ``_rank_r_epilogue``, ``lora_rank_add_kernel``:
``HAS_COLSCALE``), plus one pass over W here for the row norms:

* ``dora_norm_kernel``: n_i^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T,
  so no [out, in] tensor exists: one read of W gives the [out, r] product W A^T and (first
  use) the row sums ||W_i||^2 from the same tiles; the r x r Gram A A^T is accumulated from
  the A tiles the loop loads anyway; the epilogue assembles n and c = m / n per row.
* ``dora_grad_kernel`` (backward): one pass over dY and the saved output y giving
  dY' = c * dY (the LoRA backward's input, written once) and the column sums
  sum_t dY (y - b) = sum_t dY c u (u = x W^T + s S B^T), so dm = that / m needs no saved u.
"""
import triton
import triton.language as tl

from . import SIZES, enumerates, variant


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, m_ptr, wsq_ptr, n_ptr, c_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scale,
    ROW_SQ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program pid: rows [pid * BLOCK_N, +BLOCK_N) of W [N, K] (any strides: a Conv1D weight
    # [in, out] is read through its transposed view). Operands are upcast to fp32: W's bf16 /
    # fp16 values are exact in tf32, so the tf32 dots round only A (fp32 W under "highest":
    # IEEE). The pass is bound by reading W once; its MMA work is 2 N K r.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                         # (W A^T)[rows]
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)                       # A A^T
    wsq = tl.zeros((BLOCK_N,), dtype=tl.float32)                                # ||W_i||^2
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        w = tl.load(w_ptr + rn64[:, None] * stride_wn + (k0 + rk)[None, :].to(tl.int64) * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        at = tl.load(a_ptr + rr[None, :] * stride_ar + (k0 + rk)[:, None].to(tl.int64) * stride_ak,
                     mask=k_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)  # A^T [BLOCK_K, BLOCK_R]
        wa = tl.dot(w, at, wa, input_precision=PRECISION)
        gram = tl.dot(tl.trans(at), at, gram, input_precision=PRECISION)
        if ROW_SQ:
            wsq += tl.sum(w * w, axis=1)
    if ROW_SQ:
        tl.store(wsq_ptr + rn, wsq, mask=n_ok)
    else:
        wsq = tl.load(wsq_ptr + rn, mask=n_ok, other=0.0)
    b = tl.load(b_ptr + rn64[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
    cross = tl.sum(b * wa, axis=1)                                              # B_i . (W A^T)_i
    quad = tl.sum(tl.dot(b, gram, input_precision=PRECISION) * b, axis=1)       # B_i (A A^T) B_i^T
    n2 = wsq + 2.0 * scale * cross + scale * scale * quad
    n = tl.sqrt(tl.maximum(n2, 0.0))
    m = tl.load(m_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + rn, n, mask=n_ok)
    tl.store(c_ptr + rn, m / tl.where(n_ok, n, 1.0), mask=n_ok)


@triton.jit
def dora_grad_kernel(
    dy_ptr, y_ptr, c_ptr, bias_ptr, dyc_ptr, part_ptr,
    M, N, rows_per_split,
    stride_dm, stride_dn, stride_ym, stride_yn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pid_n, pid_s): columns [pid_n * BLOCK_N, +BLOCK_N), rows of split pid_s.
    #   dyc[t, j]        = c_j dY[t, j]                       (written in dY's dtype)
    #   part[pid_s, j]   = sum_{t in split} dY[t, j] (y[t, j] - b_j)
    # (y - b = c u, so sum over splits / m_j = sum_t dY u / n_j = dm_j.) Partials are summed
    # on the host in split order: no atomics, repeatable.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    c = tl.load(c_ptr + rn, mask=n_ok, other=0.0)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    col = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_stop = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask = (rm < m_stop)[:, None] & n_ok[None, :]
        rm64 = rm.to(tl.int64)
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dm + rn[None, :] * stride_dn, mask=mask, other=0.0)
        y = tl.load(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0)
        dyf = dy.to(tl.float32)
        col += tl.sum(tl.where(mask, dyf * (y.to(tl.float32) - b[None, :]), 0.0), axis=0)
        tl.store(dyc_ptr + rm64[:, None] * stride_cm + rn[None, :], (dyf * c[None, :]).to(dy.dtype), mask=mask)
    tl.store(part_ptr + pid_s.to(tl.int64) * N + rn, col, mask=n_ok)


def norm_config(N, K, interpret):
    """Launch config for ``dora_norm_kernel``: 32 rows a program (128 programs at N = 4096:
    one per SM streaming W), 128-deep K tiles, 4 warps. Not yet tuned on a GPU."""
    if interpret:
        return dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)
    return dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)


def grad_config(M, N, want_programs, interpret):
    """Launch config for ``dora_grad_kernel`` (memory-bound: reads dY and y, writes dY'):
    64 x 128 tiles, row splits enough to give ``want_programs`` programs."""
    block_m, block_n = (32, 64) if interpret else (64, 128)
    n_blocks = -(-N // block_n)
    m_blocks = max(1, -(-M // block_m))
    splits = 1 if interpret else max(1, min(m_blocks, want_programs // n_blocks))
    rows_per_split = -(-m_blocks // splits) * block_m
    splits = max(1, -(-M // rows_per_split))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, splits=splits, rows_per_split=rows_per_split, num_warps=4)


@enumerates(norm_config)
def norm_config_variants():
    """Every config norm_config returns (one: it does not depend on the shape), for compile-check."""
    yield variant("dora_norm_kernel", norm_config(4096, 4096, False))


@enumerates(grad_config)
def grad_config_variants():
    """Every config grad_config returns (its tiles do not depend on the shape; row splits are
    run-time integers), for compile-check."""
    yield variant("dora_grad_kernel", grad_config(max(SIZES), 4096, 264, False))
