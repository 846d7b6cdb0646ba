"""Prefix-aware attention kernels (flash-attention style, online softmax).

    O = softmax([Q (gk Pk)^T ; Q K^T] * scale) [gv Pv ; V]

Q [B, Hq, T, D]; K, V [B, Hkv, T, D] (grouped-query: q head h reads kv head h // GROUP);
Pk, Pv [Hkv, L, D] shared by the batch (batch stride 0) or [B, Hkv, L, D]; gk, gv the
prefix key / value gates, per sample or per query row (an fp32 [B, T or 1, 2] table, row
stride 0 for a per-sample gate; ones without a gate): row i's prefix scores are
scale * gk_i (q_i . Pk_p) and its prefix values gv_i Pv_p. Causal masking applies inside
the sequence only: query i sees prefix 0..L-1 and keys 0..i. An optional key padding mask
[B, T] (nonzero = attend) hides padded sequence keys; the prefix is always visible, so no
row is ever empty.

The prefix is never concatenated: each program first loops over prefix blocks (reading
the shared prefix tile, no per-sample copy), then over sequence blocks, with one online
softmax across both. Scores live in the log2 domain (multiplied by scale * log2(e)) so the
kernels use exp2; ``lse`` is saved per row in that base-2 domain: lse2 = log2(sum 2^s2).

Backward (flash-attention-2), with S the natural-domain scores and P = softmax(S):
    delta_i = rowsum(dO_i * O_i)                                   (preprocess kernel)
    dP_ip   = gv_i dO_i . Pv_p (prefix),   dO_i . V_j (sequence)
    dS      = P * (dP - delta)
    dQ_i    = scale * (gk_i sum_p dS_ip Pk_p + sum_j dS_ij K_j)    (dq kernel, per query block)
    d gk_i  = scale * sum_p dS_ip (q_i . Pk_p)                      (dq kernel: row sums, per
    d gv_i  = sum_p P_ip (dO_i . Pv_p)                               q head, summed on the host)
    dK      = scale * dS_seq^T Q,      dV = P_seq^T dO              (dkdv kernel, per key block)
    dPk     = scale * (gk dS_pre)^T Q, dPv = P_pre^T (gv dO)
dK/dV programs own one key block of one (batch, kv head) and loop over the GROUP query
heads that read it, so no atomics. Prefix blocks are extra programs of the same kernel; they
write fp32 partials dPk, dPv per (batch, kv head), reduced on the host in a fixed order (over
the batch when the prefix is shared); the gate gradients per (batch, q head, row) are reduced
there too (over heads, and over rows for a per-sample gate).
"""
import triton
import triton.language as tl

from . import FP32, HALF, SIZES, enumerates, variant


@triton.jit
def _online_softmax_step(s, vt, m_i, l_i, acc, v_scale, PRECISION: tl.constexpr):
    """Fold one block of log2-domain scores s [M, N] and values vt [N, D] (their
    contribution scaled by v_scale: the prefix value gate, or 1) into the running row max
    m_i, row sum l_i and output accumulator acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION) * v_scale
    return m_new, l_i, acc


@triton.jit
def _rows(base, r, rd, stride_r, stride_d, r_ok, d_ok, UPCAST: tl.constexpr):
    """The [R, D] tile of rows r at base (row stride stride_r, feature stride stride_d), zeros
    outside r_ok x d_ok; fp32 where UPCAST. Sequence rows come as int64 (T x stride can pass
    2^31), prefix rows as int32 (L is small; int64 there costs registers)."""
    t = tl.load(base + r[:, None] * stride_r + rd[None, :] * stride_d,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _rows_t(base, r, rd, stride_r, stride_d, r_ok, d_ok, UPCAST: tl.constexpr):
    """``_rows`` loaded transposed: [D, R] (the K^T / V^T operands)."""
    t = tl.load(base + r[None, :] * stride_r + rd[:, None] * stride_d,
                mask=r_ok[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _row_gates(gate_ptr, b, sgb, sgt, rm64, m_ok):
    """(gk, gv) of query rows rm: the fp32 [B, T or 1, 2] gate table (row stride 0 for a
    per-sample gate; ones without a gate)."""
    g_rows = gate_ptr + b * sgb + rm64 * sgt
    return tl.load(g_rows, mask=m_ok, other=1.0), tl.load(g_rows + 1, mask=m_ok, other=1.0)


@triton.jit
def prefix_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, gate_ptr, mask_ptr, o_ptr, lse_ptr,
    T, L, D, HQ, GROUP, smb, sgb, sgt,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    spkb, spkh, spkl, spkd,
    spvb, spvh, spvl, spvd,
    sob, soh, sot, sod,
    qk_scale2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    hq = (pid_bh % HQ).to(tl.int64)
    hk = hq // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < T
    d_ok = rd < D
    rm64 = rm.to(tl.int64)

    q = _rows(q_ptr + b * sqb + hq * sqh, rm64, rd, sqt, sqd, m_ok, d_ok, UPCAST)
    gk, gv = _row_gates(gate_ptr, b, sgb, sgt, rm64, m_ok)                   # per query row (or sample)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # 1) the prefix: keys gk * Pk, values gv * Pv, no causal mask.
    pk_base = pk_ptr + b * spkb + hk * spkh
    pv_base = pv_ptr + b * spvb + hk * spvh
    pre_scale = (qk_scale2 * gk)[:, None]
    for start in range(0, L, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < L
        kt = _rows_t(pk_base, rn, rd, spkl, spkd, n_ok, d_ok, UPCAST)           # [D, N]
        vt = _rows(pv_base, rn, rd, spvl, spvd, n_ok, d_ok, UPCAST)             # [N, D]
        s = tl.dot(q, kt, input_precision=PRECISION) * pre_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, gv[:, None], PRECISION)

    # 2) the sequence (causal: only key blocks that start at or before this query block ends).
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < T
        rn64 = rn.to(tl.int64)
        kt = _rows_t(k_base, rn64, rd, skt, skd, n_ok, d_ok, UPCAST)
        vt = _rows(v_base, rn64, rd, svt, svd, n_ok, d_ok, UPCAST)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(rn[None, :] <= rm[:, None], s, float("-inf"))
        if HAS_MASK:  # key padding: masked sequence keys get no weight (the prefix is never masked)
            keep = tl.load(mask_ptr + b * smb + rn64, mask=n_ok, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        # m_i is finite here (every row saw >= 1 prefix key), so fully masked rows are safe.
        m_i, l_i, acc = _online_softmax_step(s, vt, m_i, l_i, acc, 1.0, PRECISION)

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + hq * soh + rm64[:, None] * sot + rd[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + rm64, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def prefix_attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, T, D, HQ,
    sob, soh, sot, sod, sdob, sdoh, sdot, sdod,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO * O (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < T
    rm64 = rm.to(tl.int64)
    o = _rows(o_ptr + b * sob + h * soh, rm64, rd, sot, sod, m_ok, rd < D, True)
    do = _rows(do_ptr + b * sdob + h * sdoh, rm64, rd, sdot, sdod, m_ok, rd < D, True)
    delta = tl.sum(o * do, 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + rm64, delta, mask=rm < T)


@triton.jit
def prefix_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, gate_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dg_ptr,
    T, L, D, HQ, GROUP, smb, sgb, sgt,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    spkb, spkh, spkl, spkd,
    spvb, spvh, spvl, spvd,
    sdob, sdoh, sdot, sdod,
    sdqb, sdqh, sdqt, sdqd,
    sm_scale, qk_scale2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query block: scale * (gk * dS_pre Pk + dS_seq K), dS = P (dP - delta)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    hq = (pid_bh % HQ).to(tl.int64)
    hk = hq // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < T
    d_ok = rd < D
    rm64 = rm.to(tl.int64)
    md = m_ok[:, None] & d_ok[None, :]
    q = _rows(q_ptr + b * sqb + hq * sqh, rm64, rd, sqt, sqd, m_ok, d_ok, UPCAST)
    do = _rows(do_ptr + b * sdob + hq * sdoh, rm64, rd, sdot, sdod, m_ok, d_ok, UPCAST)
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + rm64, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + rm64, mask=m_ok, other=0.0)
    gk, gv = _row_gates(gate_ptr, b, sgb, sgt, rm64, m_ok)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dgk = tl.zeros((BLOCK_M,), tl.float32)
    dgv = tl.zeros((BLOCK_M,), tl.float32)

    pk_base = pk_ptr + b * spkb + hk * spkh
    pv_base = pv_ptr + b * spvb + hk * spvh
    pre_scale = (qk_scale2 * gk)[:, None]
    for start in range(0, L, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < L
        kt = _rows_t(pk_base, rn, rd, spkl, spkd, n_ok, d_ok, UPCAST)           # Pk^T [D, N]
        vt = _rows_t(pv_base, rn, rd, spvl, spvd, n_ok, d_ok, UPCAST)           # Pv^T [D, N]
        qk = tl.dot(q, kt, input_precision=PRECISION)                         # q Pk^T (ungated, unscaled)
        p = tl.exp2(qk * pre_scale - lse2[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        dpv = tl.dot(do, vt, input_precision=PRECISION)                       # dO Pv^T
        ds = p * (dpv * gv[:, None] - delta[:, None])                         # dP = gv dO Pv^T
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION) * gk[:, None]
        dgk += tl.sum(ds * qk, 1)                                             # d gk_i = scale sum_p dS (q Pk)
        dgv += tl.sum(p * dpv, 1)                                             # d gv_i = sum_p P (dO Pv)

    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < T
        rn64 = rn.to(tl.int64)
        kt = _rows_t(k_base, rn64, rd, skt, skd, n_ok, d_ok, UPCAST)
        vt = _rows_t(v_base, rn64, rd, svt, svd, n_ok, d_ok, UPCAST)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale2 - lse2[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        if CAUSAL:
            p = tl.where(rn[None, :] <= rm[:, None], p, 0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * smb + rn64, mask=n_ok, other=0)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(dq_ptr + b * sdqb + hq * sdqh + rm64[:, None] * sdqt + rd[None, :] * sdqd,
             dq.to(dq_ptr.dtype.element_ty), mask=md)
    # gate gradient partials per (b, q head, row): dg [B, HQ, T, 2] fp32, summed on the host
    dg_rows = dg_ptr + (pid_bh.to(tl.int64) * T + rm64) * 2
    tl.store(dg_rows, dgk * sm_scale, mask=m_ok)
    tl.store(dg_rows + 1, dgv, mask=m_ok)


@triton.jit
def _kv_block_bwd(
    q_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr, k, v, rn, n_ok, b, hk, T, HQ, GROUP, D,
    sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod, sgb, sgt,
    s_scale2, lo,
    CAUSAL_MASK: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For one key block (k, v [N, D], key scale s_scale2 in the log2 domain) sum over the
    GROUP query heads and the query blocks from ``lo`` (transposed scores: no transpose of P):
        dv_acc = P^T dO,              dk_acc = dS^T Q                  (sequence keys)
        dv_acc = P^T (gv * dO),       dk_acc = (dS * gk)^T Q           (GATED: prefix keys, with
                                       per-query-row gates gk, gv; S = s_scale2 gk (q . k))"""
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        row = (b * HQ + hq) * T
        for start in range(lo, T, BLOCK_M):
            rm = start + tl.arange(0, BLOCK_M)
            m_ok = rm < T
            rm64 = rm.to(tl.int64)
            q = _rows(q_ptr + b * sqb + hq * sqh, rm64, rd, sqt, sqd, m_ok, d_ok, UPCAST)
            do = _rows(do_ptr + b * sdob + hq * sdoh, rm64, rd, sdot, sdod, m_ok, d_ok, UPCAST)
            lse2 = tl.load(lse_ptr + row + rm64, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + row + rm64, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * s_scale2       # S^T [N, M]
            if GATED:
                gk, gv = _row_gates(gate_ptr, b, sgb, sgt, rm64, m_ok)
                st = st * gk[None, :]
            valid = n_ok[:, None] & m_ok[None, :]
            if CAUSAL_MASK:
                valid = valid & (rm[None, :] >= rn[:, None])
            pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)                 # P^T
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)                # (dO V^T)^T
            if GATED:
                dv += tl.dot((pt * gv[None, :]).to(do.dtype), do, input_precision=PRECISION)  # P^T (gv dO)
                dst = pt * (dpt * gv[None, :] - delta[None, :])                     # dS^T
                dk += tl.dot((dst * gk[None, :]).to(q.dtype), q, input_precision=PRECISION)   # (gk dS)^T Q
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)        # P^T dO
                dst = pt * (dpt - delta[None, :])                                   # dS^T
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)         # dS^T Q
    return dk, dv


@triton.jit
def prefix_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, gate_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
    T, L, D, HQ, HKV, GROUP, smb, sgb, sgt,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    spkb, spkh, spkl, spkd,
    spvb, spvh, spvl, spvd,
    sdob, sdoh, sdot, sdod,
    sdkb, sdkh, sdkt, sdkd,
    sdvb, sdvh, sdvt, sdvd,
    sm_scale, qk_scale2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs 0 .. cdiv(L, BLOCK_N)-1 of axis 0: prefix blocks -> fp32 partials
    dPk = scale (gk dS)^T Q, dPv = P^T (gv dO), [B, HKV, L, D] contiguous.
    The rest: sequence key blocks -> dK = scale dS^T Q, dV = P^T dO."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    hk = (pid_bk % HKV).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    n_pre = tl.cdiv(L, BLOCK_N)
    if pid_n < n_pre:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < L
        nd = n_ok[:, None] & d_ok[None, :]
        k = _rows(pk_ptr + b * spkb + hk * spkh, rn, rd, spkl, spkd, n_ok, d_ok, UPCAST)
        v = _rows(pv_ptr + b * spvb + hk * spvh, rn, rd, spvl, spvd, n_ok, d_ok, UPCAST)
        dk, dv = _kv_block_bwd(
            q_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr, k, v, rn, n_ok, b, hk, T, HQ, GROUP, D,
            sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod, sgb, sgt,
            qk_scale2, 0,
            False, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        base = (pid_bk.to(tl.int64) * L + rn[:, None].to(tl.int64)) * D + rd[None, :]
        tl.store(dpk_ptr + base, dk * sm_scale, mask=nd)
        tl.store(dpv_ptr + base, dv, mask=nd)
    else:
        n0 = (pid_n - n_pre) * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < T
        rn64 = rn.to(tl.int64)
        nd = n_ok[:, None] & d_ok[None, :]
        k = _rows(k_ptr + b * skb + hk * skh, rn64, rd, skt, skd, n_ok, d_ok, UPCAST)
        v = _rows(v_ptr + b * svb + hk * svh, rn64, rd, svt, svd, n_ok, d_ok, UPCAST)
        lo = 0
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M  # earlier query blocks cannot see this key block
        n_live = n_ok
        if HAS_MASK:  # padded keys: P = 0 in every row, so dK = dV = 0 there
            n_live = n_ok & (tl.load(mask_ptr + b * smb + rn64, mask=n_ok, other=0) != 0)
        dk, dv = _kv_block_bwd(
            q_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr, k, v, rn, n_live, b, hk, T, HQ, GROUP, D,
            sqb, sqh, sqt, sqd, sdob, sdoh, sdot, sdod, sgb, sgt,
            qk_scale2, lo,
            CAUSAL, False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        dk = dk * sm_scale
        tl.store(dk_ptr + b * sdkb + hk * sdkh + rn64[:, None] * sdkt + rd[None, :] * sdkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=nd)
        tl.store(dv_ptr + b * sdvb + hk * sdvh + rn64[:, None] * sdvt + rd[None, :] * sdvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=nd)


def fwd_config(T, D, elt, interpret):
    """Launch config for the forward kernel: flash-attention-style tiles, each spill-free on
    sm_90 by ``python -m peftops compile-check`` (what spilled before is noted). fp32 and
    D = 256 use smaller tiles / fewer stages to stay within registers and shared memory.
    Not yet tuned on a GPU."""
    BD = max(16, D)
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if elt >= 4:
        if BD >= 256:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if BD <= 64 else 8, num_stages=2)
    if BD >= 256:  # 128 x 32 spilled 568 B
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if T <= 64:  # D <= 32 at 64 x 64 spilled 16 B on sm_80
        return dict(BLOCK_M=64, BLOCK_N=32 if BD <= 32 else 64, num_warps=4, num_stages=2)
    if BD >= 128:  # 3 stages spilled 8 B under triton 3.6 (causal, at 255 registers): 2 keep the tile
        # and its wgmma shapes with one K/V block in flight (96 KiB; 244-255 registers, 3.9 / 3.6)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)  # D <= 64 on 4 warps spilled 8 B


def bwd_config(T, D, elt, interpret, dkdv=False):
    """Launch config for the backward kernels (dK, dV, Q, dO tiles on chip): ``dkdv`` for
    ``prefix_attn_bwd_dkdv_kernel`` (BLOCK_N key rows a program, BLOCK_M query rows a step),
    else ``prefix_attn_bwd_dq_kernel`` (the other way round). Spill-free on sm_90 and sm_80
    in half precision under triton 3.6 and 3.9 (all 8 warps): 64 x 64 up to D = 32, 64 x 32 at
    D = 64 (64 x 64 spilled 8-64 B on sm_80; 4 warps 16-56 B on sm_90), 32 x 64 at D = 128
    (64 x 64 spilled 96-176 B), 32 x 32 at D = 256 (32 x 64: 488 B). dK / dV differ (triton
    3.6 spilled them at 255 registers on two stages: 8 B causal at D <= 32, 16 B at D = 128):
    one stage at D <= 32 (84-178 registers, was 122-255), 16-row query steps at D = 128 (the
    key block and its wgmma stay 64 rows; 197-199 registers on two stages, was 255)."""
    BD = max(16, D)
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if BD >= 256:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
    if BD >= 128:
        return dict(BLOCK_M=16 if dkdv else 32, BLOCK_N=64, num_warps=8, num_stages=2)
    if BD == 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1 if dkdv else 2)  # 64 x 32 spilled 8-40 B


# The head dims the launchers block D to (ops/prefix_attention.py: next_pow2(D) >= 16, D <= 256).
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)


@enumerates(fwd_config)
def fwd_config_variants():
    for T in SIZES:
        for D in HEAD_DIM_BLOCKS:
            for elt, dtypes in ((2, HALF), (4, FP32)):
                yield variant("prefix_attn_fwd_kernel", fwd_config(T, D, elt, False), dtypes=dtypes, BLOCK_D=D)


@enumerates(bwd_config)
def bwd_config_variants():
    for T in SIZES:
        for D in HEAD_DIM_BLOCKS:
            for elt, dtypes in ((2, HALF), (4, FP32)):
                for kernel, dkdv in (("prefix_attn_bwd_dq_kernel", False), ("prefix_attn_bwd_dkdv_kernel", True)):
                    yield variant(kernel, bwd_config(T, D, elt, False, dkdv=dkdv), dtypes=dtypes, BLOCK_D=D)
