"""Bottleneck adapter kernels.

Forward   z   = h Wd^T + bd                        [T, m]   (m = bottleneck width, on chip)
          a   = act(z)                             [T, m]
          out = residual (+ residual2) + G * (a Wu^T + bu)   [T, d]   G = scaling * gate (per row)
Backward  (z [T, m] fp32 is saved; a is recomputed from it)
          P   = dY Wu                              [T, m]
          dz  = G * P * act'(z)                    [T, m]
          dh  = dz Wd                              [T, d]
          dg  = scaling * (rowsum(a * P) + dY . bu)   [T]   (gate gradient per row)
          dWu = dY^T (G a)                         [d, m]   -- reduce over T
          dbu = colsum(G dY)                       [d]
          dWd = dz^T h                             [m, d]   -- reduce over T
          dbd = colsum(dz)                         [m]      (host: dz is small)
          dresidual = dresidual2 = dY              (host: no kernel; when residual is h
                                                    itself, dY is added inside dh's store)

Three kernels:
* ``adapter_fwd_kernel``: one program per block of rows. Pass 1 over d: z = h Wd^T (+bd)
  into an fp32 [BLOCK_M, BLOCK_W] accumulator (m padded to a power of two >= 16 with
  masked loads; padded columns of z are exactly 0, and act(0) = 0 for every activation).
  Pass 2 over d: out tile = residual (+ residual2) + G * (act(z) Wu^T + bu). h and the
  residual(s) are read once, out written once; only z ([T, m] fp32, needed by backward)
  leaves the chip besides out.
* ``adapter_bwd_rows_kernel``: one program per block of rows. Pass over dY: P = dY Wu
  (and dY . bu for the gate); then dz, dg; then a pass over d writing dh = dz Wd
  (+ dY when the residual is h). Reads dY once (twice with the residual add), writes dh once.
* ``adapter_bwd_weights_kernel``: one program per (column block of d, split of T): walks
  its rows accumulating dWu^T-chunk = dY^T (G a), dbu, dWd^T-chunk = h^T dz in fp32
  registers; one partial per split, summed on the host in a fixed order (no atomics).
"""
import triton
import triton.language as tl

from . import FP32, HALF, SIZES, cdiv, enumerates, next_pow2, variant

# Activation ids (constexpr): the host maps names to these.
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3

# GELU constants are literals inside the jit functions below: a plain module-level float
# compiles in the interpreter but not on a GPU, and a tl.constexpr global does not mix with
# tiles in the interpreter. sqrt(1/2), 1/sqrt(2 pi), sqrt(2/pi), tanh-GELU's cubic term.


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1 (tl.math has no tanh); stable for large |x|.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) on an fp32 tile."""
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) on an fp32 tile (relu'(0) = 0, as torch)."""
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))


@triton.jit
def adapter_fwd_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, res2_ptr, gate_ptr, out_ptr, z_ptr,
    T, D, MW,
    stride_hm, stride_hd, stride_wdm, stride_wdd, stride_wud, stride_wum,
    stride_rm, stride_rd, stride_r2m, stride_r2d, stride_om, stride_od,
    scale,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_RES2: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < T
    rm64 = rm.to(tl.int64)
    rw = tl.arange(0, BLOCK_W)
    w_ok = rw < MW

    # Pass 1: z = h Wd^T (+ bd), fp32 accumulator kept on chip.
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        ht = tl.load(h_ptr + rm64[:, None] * stride_hm + rd[None, :] * stride_hd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        wdt = tl.load(wd_ptr + rd[:, None] * stride_wdd + rw[None, :] * stride_wdm,
                      mask=d_ok[:, None] & w_ok[None, :], other=0.0)      # Wd^T chunk [BLOCK_D, BLOCK_W]
        if UPCAST:
            ht = ht.to(tl.float32)
            wdt = wdt.to(tl.float32)
        acc = tl.dot(ht, wdt, acc, input_precision=PRECISION)
    if HAS_BD:
        acc += tl.load(bd_ptr + rw, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        tl.store(z_ptr + rm64[:, None] * MW + rw[None, :], acc, mask=m_ok[:, None] & w_ok[None, :])
    a = _act(acc, ACT).to(wu_ptr.dtype.element_ty)   # dot operand in the weights' dtype
    if UPCAST:
        a = a.to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) * scale

    # Pass 2: out = residual (+ residual2) + G * (a Wu^T + bu), one column block at a time.
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        wut = tl.load(wu_ptr + rw[:, None] * stride_wum + rd[None, :] * stride_wud,
                      mask=w_ok[:, None] & d_ok[None, :], other=0.0)      # Wu^T chunk [BLOCK_W, BLOCK_D]
        if UPCAST:
            wut = wut.to(tl.float32)
        u = tl.dot(a, wut, input_precision=PRECISION)
        if HAS_BU:
            u += tl.load(bu_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            u = u * g[:, None]
        else:
            u = u * scale
        mask = m_ok[:, None] & d_ok[None, :]
        r = tl.load(res_ptr + rm64[:, None] * stride_rm + rd[None, :] * stride_rd, mask=mask, other=0.0)
        u += r.to(tl.float32)
        if HAS_RES2:
            r2 = tl.load(res2_ptr + rm64[:, None] * stride_r2m + rd[None, :] * stride_r2d, mask=mask, other=0.0)
            u += r2.to(tl.float32)
        tl.store(out_ptr + rm64[:, None] * stride_om + rd[None, :] * stride_od,
                 u.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_bwd_rows_kernel(
    dy_ptr, z_ptr, wd_ptr, wu_ptr, bu_ptr, gate_ptr, dz_ptr, dg_ptr, dh_ptr,
    T, D, MW,
    stride_ym, stride_yd, stride_wdm, stride_wdd, stride_wud, stride_wum, stride_hm, stride_hd,
    scale,
    ACT: tl.constexpr, HAS_BU: tl.constexpr, HAS_GATE: tl.constexpr, NEED_DH: tl.constexpr,
    ADD_DY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < T
    rm64 = rm.to(tl.int64)
    rw = tl.arange(0, BLOCK_W)
    w_ok = rw < MW

    # P = dY Wu   (and dY . bu per row, for the gate gradient)
    p = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    ybu = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        dyt = tl.load(dy_ptr + rm64[:, None] * stride_ym + rd[None, :] * stride_yd,
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        wut = tl.load(wu_ptr + rd[:, None] * stride_wud + rw[None, :] * stride_wum,
                      mask=d_ok[:, None] & w_ok[None, :], other=0.0)      # Wu chunk [BLOCK_D, BLOCK_W]
        if HAS_GATE:
            if HAS_BU:
                bu = tl.load(bu_ptr + rd, mask=d_ok, other=0.0).to(tl.float32)
                ybu += tl.sum(dyt.to(tl.float32) * bu[None, :], axis=1)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            wut = wut.to(tl.float32)
        p = tl.dot(dyt, wut, p, input_precision=PRECISION)

    zmask = m_ok[:, None] & w_ok[None, :]
    z = tl.load(z_ptr + rm64[:, None] * MW + rw[None, :], mask=zmask, other=0.0)
    if HAS_GATE:
        g = tl.load(gate_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) * scale
        dz = p * g[:, None] * _act_grad(z, ACT)                             # dz = G P act'(z)
        dg = scale * (tl.sum(_act(z, ACT) * p, axis=1) + ybu)               # dg = s (<a, P> + dY . bu)
        tl.store(dg_ptr + rm, dg, mask=m_ok)
    else:
        dz = p * scale * _act_grad(z, ACT)
    tl.store(dz_ptr + rm64[:, None] * MW + rw[None, :], dz, mask=zmask)

    if NEED_DH:                                                            # dh = dz Wd (+ dY)
        dzo = dz.to(wd_ptr.dtype.element_ty)
        if UPCAST:
            dzo = dzo.to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            wdt = tl.load(wd_ptr + rw[:, None] * stride_wdm + rd[None, :] * stride_wdd,
                          mask=w_ok[:, None] & d_ok[None, :], other=0.0)  # Wd chunk [BLOCK_W, BLOCK_D]
            if UPCAST:
                wdt = wdt.to(tl.float32)
            dh = tl.dot(dzo, wdt, input_precision=PRECISION)
            mask = m_ok[:, None] & d_ok[None, :]
            if ADD_DY:  # residual is h: its gradient dY joins dh here, not in a separate pass
                dh += tl.load(dy_ptr + rm64[:, None] * stride_ym + rd[None, :] * stride_yd,
                              mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + rm64[:, None] * stride_hm + rd[None, :] * stride_hd,
                     dh.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_bwd_weights_kernel(
    dy_ptr, h_ptr, z_ptr, dz_ptr, gate_ptr, dwu_ptr, dbu_ptr, dwd_ptr,
    T, D, MW, rows_per_split,
    stride_ym, stride_yd, stride_hm, stride_hd,
    scale,
    ACT: tl.constexpr, HAS_GATE: tl.constexpr, DO_U: tl.constexpr, DO_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Program (pid_d, pid_s): columns [pid_d * BLOCK_D, +BLOCK_D) of d, rows of split pid_s.
    #   dwu[pid_s, cols, :] = sum_rows dY[rows, cols]^T (G a)[rows]      (-> dWu   [d, m])
    #   dbu[pid_s, cols]    = sum_rows G dY[rows, cols]                  (-> dbu   [d])
    #   dwd[pid_s, cols, :] = sum_rows h[rows, cols]^T dz[rows]          (-> dWd^T [d, m])
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rw = tl.arange(0, BLOCK_W)
    w_ok = rw < MW
    acc_u = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_stop = tl.minimum(m_start + rows_per_split, T)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_stop
        rm64 = rm.to(tl.int64)
        tile_mask = m_ok[:, None] & d_ok[None, :]
        zmask = m_ok[:, None] & w_ok[None, :]
        if DO_U:
            dyt = tl.load(dy_ptr + rm64[:, None] * stride_ym + rd[None, :] * stride_yd, mask=tile_mask, other=0.0)
            z = tl.load(z_ptr + rm64[:, None] * MW + rw[None, :], mask=zmask, other=0.0)
            if HAS_GATE:
                g = tl.load(gate_ptr + rm, mask=m_ok, other=0.0).to(tl.float32) * scale
            else:
                g = tl.where(m_ok, scale, 0.0)
            ga = (_act(z, ACT) * g[:, None]).to(dy_ptr.dtype.element_ty)
            acc_b += tl.sum(dyt.to(tl.float32) * g[:, None], axis=0)
            if UPCAST:
                dyt = dyt.to(tl.float32)
                ga = ga.to(tl.float32)
            acc_u = tl.dot(tl.trans(dyt), ga, acc_u, input_precision=PRECISION)
        if DO_D:
            ht = tl.load(h_ptr + rm64[:, None] * stride_hm + rd[None, :] * stride_hd, mask=tile_mask, other=0.0)
            dzt = tl.load(dz_ptr + rm64[:, None] * MW + rw[None, :], mask=zmask, other=0.0).to(h_ptr.dtype.element_ty)
            if UPCAST:
                ht = ht.to(tl.float32)
                dzt = dzt.to(tl.float32)
            acc_d = tl.dot(tl.trans(ht), dzt, acc_d, input_precision=PRECISION)
    out_rows = (pid_s * D + rd).to(tl.int64)
    wmask = d_ok[:, None] & w_ok[None, :]
    if DO_U:
        tl.store(dwu_ptr + out_rows[:, None] * MW + rw[None, :], acc_u, mask=wmask)
        tl.store(dbu_ptr + out_rows, acc_b, mask=d_ok)
    if DO_D:
        tl.store(dwd_ptr + out_rows[:, None] * MW + rw[None, :], acc_d, mask=wmask)


# The forward's 64-row (wgmma-sized) tiles from this many rows of a bottleneck m <= 64 (see
# rows_config); the bench times 32-row tiles beside them (peftops[kernel:rows32]).
FWD_TALL_ROWS = 4096


def rows_config(T, D, MW, interpret, forward=False, half=True):
    """Launch config for the row kernels (forward and backward rows).

    Trade-off (GPU): each program re-reads both weights (4 d m bytes in bf16, from L2), so
    L2 traffic / HBM traffic ~ 2 m / (3 BLOCK_M), which wants tall row tiles; but T / BLOCK_M
    programs must keep enough bytes in flight to saturate HBM, which wants many of them. And
    the [BLOCK_M, BLOCK_W] fp32 accumulator must stay in registers. At T = 8192, d = 4096,
    m = 64, 32-row tiles read 268 MB of weights from L2 beside the 201 MB of HBM traffic (h,
    residual, out): at L2 speed about the 0.100 ms measured there (67 % of HBM). From
    FWD_TALL_ROWS rows a bf16 / fp16 forward takes 64-row tiles on 8 warps (wgmma on sm_90,
    100-120 registers, 0 spills; 128 programs at T = 8192): half the L2 traffic (4 warps:
    186-202 registers; fp32 spills 0.1-2 KB at 64 rows, so it keeps 32). Heuristics, not yet
    tuned on a lent GPU.
    """
    if interpret:  # few, large programs: the interpreter's cost is per program and op
        return dict(BLOCK_M=32, BLOCK_D=64, num_warps=4, num_stages=1)
    block_w = max(16, next_pow2(MW))
    if forward and half and block_w <= 64 and T >= FWD_TALL_ROWS:
        return dict(BLOCK_M=64, BLOCK_D=128, num_warps=8, num_stages=3)
    if T <= 16:  # at m > 128, 128-wide d tiles in fp32 need 280 KiB of shared memory, and 4 warps
        # spilled 592 B (backward, bf16, triton 3.9: GELU / silu without gate; found by the enumeration)
        return dict(BLOCK_M=16, BLOCK_D=128 if block_w <= 128 else 64, num_warps=4 if block_w <= 128 else 8,
                    num_stages=3)
    if block_w <= 16 and not forward:  # 32 x 128 left an 8 B stack frame (triton 3.9, sm_90: GELU, no gate
        # or no up bias, at 56 registers); 32 x 64 keeps the same bytes in flight (two 6 KiB stages
        # ahead, not one of 12) at 44-64 registers, spill-free under 3.6 and 3.9
        return dict(BLOCK_M=32, BLOCK_D=64, num_warps=4, num_stages=3)
    if block_w <= 64:
        return dict(BLOCK_M=32, BLOCK_D=128, num_warps=4, num_stages=3)
    if block_w <= 128:
        return dict(BLOCK_M=32, BLOCK_D=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_D=64, num_warps=8, num_stages=3)  # 64-row tiles spilled 288 B (backward)


# The bottleneck widths the launchers block m to (ops/adapter.py: next_pow2(m) >= 16, m <= 256).
WIDTH_BLOCKS = (16, 32, 64, 128, 256)


@enumerates(rows_config)
def rows_config_variants():
    for T in SIZES:
        for block_w in WIDTH_BLOCKS:
            for half in (True, False):
                yield variant("adapter_fwd_kernel", rows_config(T, 4096, block_w, False, forward=True, half=half),
                              dtypes=HALF if half else FP32, BLOCK_W=block_w)
            yield variant("adapter_bwd_rows_kernel", rows_config(T, 4096, block_w, False), BLOCK_W=block_w)


def weights_config(T, D, MW, want_programs, interpret):
    """Launch config for ``adapter_bwd_weights_kernel``: tiles and the number of T splits
    (enough programs to fill the GPU; each split writes one fp32 partial)."""
    if interpret:
        block_m, block_d = 32, 64
    else:  # two [BLOCK_D, BLOCK_W] fp32 accumulators live in registers: narrow d tiles for wide m
        # 64-row tiles spilled at 32 < m <= 128 (16 B, sm_80) and m > 128 (40 B, sm_90);
        # 32-row tiles spilled at m <= 32 (8 B, sm_80), and so did 64 x 64 tiles for some
        # launches (silu, no gate: 8 B at a 128-register cap); 64 x 32: every recorded launch
        # spill-free on sm_80 and sm_90
        block_m, block_d = (64, 32) if MW <= 32 else (32, 64) if MW <= 128 else (32, 32)
    d_blocks = cdiv(D, block_d)
    m_blocks = cdiv(T, block_m)
    splits = 1 if interpret else max(1, min(m_blocks, want_programs // d_blocks))
    rows_per_split = cdiv(m_blocks, splits) * block_m
    splits = cdiv(T, rows_per_split)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, splits=splits, rows_per_split=rows_per_split,
                num_warps=4 if MW <= 64 else 8, num_stages=2)


@enumerates(weights_config)
def weights_config_variants():
    for block_w in WIDTH_BLOCKS:
        yield variant("adapter_bwd_weights_kernel", weights_config(8192, 4096, block_w, 264, False), BLOCK_W=block_w)
