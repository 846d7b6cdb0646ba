"""AdapterFusion kernels: the per-token score / softmax / mix pass over the N adapter outputs.

The op (peftops/ops/fusion.py) is, per token t (u_n = adapter output n, [d]; q the query):

    Q    = q Wq^T + bq                       [d]      (cuBLAS, host)
    qk   = Q Wk          (= Wk^T Q)          [d]      (cuBLAS, host)
    s_n  = (u_n . qk) / tau                  [N]      <- this file
    a    = softmax_n(s)                      [N]      <- this file
    m    = sum_n a_n u_n                     [d]      <- this file
    out  = m Wv^T + residual                 [d]      (cuBLAS, host)

because Q.(Wk u_n + bk) = u_n.(Wk^T Q) + Q.bk and Q.bk is the same for every n (it cancels
in the softmax), and sum_n a_n (Wv u_n) = Wv (sum_n a_n u_n).

Backward of the pass (dm = dL/dm, given; a saved from the forward):
    dL/da_n   = u_n . dm
    ds_n      = a_n (dL/da_n - sum_k a_k dL/da_k)          (softmax Jacobian)
    du_n      = a_n dm + (ds_n / tau) qk                    (through m, and through s_n)
    dqk       = sum_n (ds_n / tau) u_n

Both kernels run one program per token over a [BLOCK_N, BLOCK_D] tile of that token's
adapter outputs (no tl.dot: the products are elementwise and reduced with tl.sum, so N
needs no padding to 16, only to a power of two, with masked loads). Each needs two sweeps
over d (the scores need the whole of d before the mix can start): when the whole
[N, d] block fits in registers (``ONE_PASS``) it is read once and reused; otherwise it is
read twice, in chunks of BLOCK_D (the second read of a token's ~N*d elements follows the
first closely, so it mostly hits L2).
"""
import triton
import triton.language as tl

from . import SIZES, enumerates, variant

# Largest [BLOCK_N, BLOCK_D] tile kept whole in registers (one read of u per token), and
# the chunk size of the two-sweep path. Module-level so tests can shrink them to exercise
# the looped path on small shapes.
ONE_PASS_MAX_FWD = 8192
ONE_PASS_MAX_BWD = 4096
CHUNK_ELEMS = 4096


def _pow2(n: int, minimum: int) -> int:
    p = minimum
    while p < n:
        p *= 2
    return p


def config(N: int, D: int, backward: bool) -> dict:
    """Block sizes for one token's [N, D] block."""
    block_n = _pow2(N, 2)
    full_d = _pow2(D, 16)
    limit = ONE_PASS_MAX_BWD if backward else ONE_PASS_MAX_FWD
    if block_n * full_d <= limit:
        block_d, one_pass = full_d, True
    else:
        block_d, one_pass = max(16, min(full_d, CHUNK_ELEMS // block_n)), False
    tile = block_n * block_d
    num_warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "ONE_PASS": one_pass, "num_warps": num_warps}


# Up to this many fused adapters is enumerated for compile-check (AdapterFusion fuses a few).
ENUMERATED_MAX_N = 64


@enumerates(config)
def config_variants():
    """Per regime config distinguishes (direction, one pass or chunked, warps): its tiles with
    the fewest and the most rows (no tl.dot here: registers go with the tile's elements a
    thread, which the regime bounds; the extremes bound the layouts)."""
    for backward in (False, True):
        regimes: dict = {}
        for n in (n for n in SIZES if 2 <= n <= ENUMERATED_MAX_N):
            for d in (d for d in SIZES if 16 <= d <= 2 * ONE_PASS_MAX_FWD):
                cfg = config(n, d, backward)
                regimes.setdefault((cfg["ONE_PASS"], cfg["num_warps"]), []).append(cfg)
        for cfgs in regimes.values():
            by_rows = sorted(cfgs, key=lambda c: (c["BLOCK_N"], c["BLOCK_D"]))
            for cfg in (by_rows[0], by_rows[-1]):
                yield variant("fusion_bwd_kernel" if backward else "fusion_fwd_kernel", cfg)


@triton.jit
def _softmax(s, n_ok):
    s = tl.where(n_ok, s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0))
    e = tl.where(n_ok, e, 0.0)
    return e / tl.sum(e, axis=0)


@triton.jit
def fusion_fwd_kernel(
    u_ptr, qk_ptr, mix_ptr, a_ptr,
    N, D,
    stride_ut, stride_un, stride_ud, stride_qt, stride_qd, stride_mt, stride_md,
    inv_temp,
    ONE_PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Token t: s = (U qk) / tau, a = softmax(s), m = a^T U, with U = u[t] ([N, D]).
    # Writes m (input dtype) and a (fp32, saved for backward).
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N
    u_base = u_ptr + t * stride_ut + rn.to(tl.int64)[:, None] * stride_un
    qk_base = qk_ptr + t * stride_qt
    mix_base = mix_ptr + t * stride_mt
    if ONE_PASS:
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        u = tl.load(u_base + rd[None, :] * stride_ud, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        qk = tl.load(qk_base + rd * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        a = _softmax(tl.sum(u * qk[None, :], axis=1) * inv_temp, n_ok)
        mix = tl.sum(u * a[:, None], axis=0)
        tl.store(mix_base + rd * stride_md, mix.to(mix_ptr.dtype.element_ty), mask=d_ok)
    else:
        # Sweep 1: elementwise partial products, reduced over d once at the end.
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            u = tl.load(u_base + rd[None, :] * stride_ud, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.load(qk_base + rd * stride_qd, mask=d_ok, other=0.0)
            acc += u.to(tl.float32) * qk.to(tl.float32)[None, :]
        a = _softmax(tl.sum(acc, axis=1) * inv_temp, n_ok)
        # Sweep 2: the mix, one d-chunk at a time.
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            u = tl.load(u_base + rd[None, :] * stride_ud, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            mix = tl.sum(u.to(tl.float32) * a[:, None], axis=0)
            tl.store(mix_base + rd * stride_md, mix.to(mix_ptr.dtype.element_ty), mask=d_ok)
    tl.store(a_ptr + t * N + rn, a, mask=n_ok)


@triton.jit
def fusion_bwd_kernel(
    u_ptr, qk_ptr, a_ptr, dm_ptr, du_ptr, dqk_ptr,
    N, D,
    stride_ut, stride_un, stride_ud, stride_qt, stride_qd, stride_gt, stride_gd,
    stride_dut, stride_dun, stride_dud, stride_dqt, stride_dqd,
    inv_temp,
    ONE_PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Token t, with U = u[t] [N, D], a [N] (saved), dm [D] (= dL/dm = dOut Wv):
    #   g_n   = U_n . dm                      (dL/da_n)
    #   ds_n  = a_n (g_n - sum_k a_k g_k)     (back through the softmax)
    #   w_n   = ds_n / tau                    (back through s_n = U_n . qk / tau)
    #   dU_n  = a_n dm + w_n qk
    #   dqk   = sum_n w_n U_n
    t = tl.program_id(0).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N
    a = tl.load(a_ptr + t * N + rn, mask=n_ok, other=0.0)
    u_base = u_ptr + t * stride_ut + rn.to(tl.int64)[:, None] * stride_un
    du_base = du_ptr + t * stride_dut + rn.to(tl.int64)[:, None] * stride_dun
    qk_base = qk_ptr + t * stride_qt
    dm_base = dm_ptr + t * stride_gt
    dqk_base = dqk_ptr + t * stride_dqt
    if ONE_PASS:
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        m2 = n_ok[:, None] & d_ok[None, :]
        u = tl.load(u_base + rd[None, :] * stride_ud, mask=m2, other=0.0).to(tl.float32)
        dm = tl.load(dm_base + rd * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
        qk = tl.load(qk_base + rd * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        g = tl.sum(u * dm[None, :], axis=1)
        w = a * (g - tl.sum(a * g, axis=0)) * inv_temp
        du = a[:, None] * dm[None, :] + w[:, None] * qk[None, :]
        tl.store(du_base + rd[None, :] * stride_dud, du.to(du_ptr.dtype.element_ty), mask=m2)
        dqk = tl.sum(u * w[:, None], axis=0)
        tl.store(dqk_base + rd * stride_dqd, dqk.to(dqk_ptr.dtype.element_ty), mask=d_ok)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            u = tl.load(u_base + rd[None, :] * stride_ud, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            dm = tl.load(dm_base + rd * stride_gd, mask=d_ok, other=0.0)
            acc += u.to(tl.float32) * dm.to(tl.float32)[None, :]
        g = tl.sum(acc, axis=1)
        w = a * (g - tl.sum(a * g, axis=0)) * inv_temp
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            m2 = n_ok[:, None] & d_ok[None, :]
            u = tl.load(u_base + rd[None, :] * stride_ud, mask=m2, other=0.0).to(tl.float32)
            dm = tl.load(dm_base + rd * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
            qk = tl.load(qk_base + rd * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
            du = a[:, None] * dm[None, :] + w[:, None] * qk[None, :]
            tl.store(du_base + rd[None, :] * stride_dud, du.to(du_ptr.dtype.element_ty), mask=m2)
            dqk = tl.sum(u * w[:, None], axis=0)
            tl.store(dqk_base + rd * stride_dqd, dqk.to(dqk_ptr.dtype.element_ty), mask=d_ok)
