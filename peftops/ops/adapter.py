"""Bottleneck adapter: ``peftops.bottleneck_adapter`` -- checks, dispatch, autograd, launchers.

    out = residual (+ residual2) + gate * scaling * (act(h Wd^T + bd) Wu^T + bu)

Two paths, picked per shape and grad mode by ``PATHS`` (DESIGN.md, Dispatch), both exact:
* ``kernel``. Forward: one kernel, one program per block of rows: down projection into an
  fp32 tile of width m (on chip), activation, up projection one column block at a time,
  scale, gate, residual add, store. Bytes: h and residual read once, out written once (+ the
  weights, and z = h Wd^T + bd [T, m] fp32 when a backward will need it); an optional
  ``residual2`` is read in the same pass (residual = h + x_in is then never materialised).
  Backward (algebra beside each launch in ``adapter_bwd``): a row kernel (one pass over dY
  gives P = dY Wu, then dz, the gate gradient, and dh = dz Wd) and a column kernel (one more
  pass over dY and h gives dWu, dbu, dWd as per-split fp32 partials summed here). Only h and
  z are saved; act(z) is recomputed.
* ``eager``: cuBLAS GEMMs with everything small folded into the [T, m] side (``_eager_fwd``):
  z = addmm(bd, h, Wd^T); A = [act(z) | 1 | 0] and Wx = [Wu | bu | 0] (the ones column
  carries the up bias into the GEMM, K padded to a multiple of 8); gate and scaling scale
  A's rows; out = addmm(residual, A, Wx^T): the residual is the GEMM's C operand, so h is
  read once, residual once, out written once (+ one [T, d] pass for ``residual2``).
  Backward (``_AdapterEagerFn.backward``): P = dY Wx and dWx = dY^T A (two reads of dY, the
  up bias and gate gradients come out of the ones column), dh = dz Wd (with + dY as the
  GEMM's C operand when the residual is h), dWd = dz^T h.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, next_pow2, num_sms, rows, upcast_dots

__all__ = ["bottleneck_adapter", "ACTIVATIONS", "MAX_KERNEL_WIDTH", "PATHS"]

# Activation names (transformers' ACT2FN spelling, as AdapterHub) -> kernel ids.
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3}
# Widest bottleneck the fused kernels keep on chip; wider ones fall back to the reference.
MAX_KERNEL_WIDTH = 256

# Which path runs on CUDA, first matching row wins. Shapes: T rows, d, m (bottleneck width);
# train: grad enabled and some input requires grad (training and inference differ).
PATHS = PathTable("adapter", paths=("kernel", "eager"), default="kernel", rows=[
    (lambda m, **_: m > MAX_KERNEL_WIDTH, "eager",
     f"m > {MAX_KERNEL_WIDTH}: our kernels do not hold the bottleneck on chip (the reference would run)"),
    (lambda train, d, m, **_: not train and d >= 4096 and m <= 64, "kernel",
     "inference: H100 2026-11-23 (shared/PERF.md) T=8192 d=4096 m=64 fwd: ours 0.100 ms (67 % of HBM) vs "
     "eager 0.137, compile 0.134. d > 4096 at m <= 64 assumed alike (same bytes per row, more of them). "
     "CONFLICT: the bench run of the same commit (bench/results) has ours 0.281 vs eager 0.187 here (and ours "
     "0.191 at m=256, less than at m=64): re-measure peftops[kernel] vs peftops[eager] (expected ~0.08 ms "
     "by bytes) before trusting this row"),
    (lambda **_: True, "eager",
     "H100 2026-11-23 T=8192 (shared/PERF.md): fwd+bwd d=4096 m=64 eager 0.39 ms vs ours 0.98; d=1024 m=64 "
     "fwd 0.044 vs 0.149, fwd+bwd 0.58 vs 1.45; d=4096 m=256 fwd 0.152 vs 0.192 (bench/results: fwd+bwd "
     "d=4096 eager 0.76 vs 1.44 at m=64, 1.05 vs 1.43 at m=256). eager there = the reference formula; this "
     "path makes fewer [T, d] passes than it. Unmeasured d: this path reaches the HBM floor by bytes (h and "
     "the residual read once, out written once), the kernel measured 67 % of it at best"),
])


def bottleneck_adapter(
    h: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    *,
    residual: torch.Tensor,
    activation: str = "relu",
    scaling: float = 1.0,
    gate: torch.Tensor | None = None,
    residual2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + gate * scaling * up(act(down(h)))`` (``+ residual2`` when given).

    h ``[..., d]`` (the adapter's input); down_weight ``[m, d]``, down_bias ``[m]`` or None,
    up_weight ``[d, m]``, up_bias ``[d]`` or None (nn.Linear layout); residual: same shape,
    dtype and device as h (it may be h itself); activation one of ``ACTIVATIONS`` (gelu is
    the erf form, gelu_new the tanh approximation, swish = silu); scaling a Python float;
    gate None or broadcastable to ``out[..., :1]`` (per token ``[..., 1]`` or per sample
    ``[B, 1, 1]``), differentiable. ``residual2`` (optional, like residual) is added in the
    same pass, so a caller whose residual is a sum (the module's ``h + x_in``) need not
    materialise it. Every input gets its gradient.
    """
    act, scaling = _check(h, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling, gate,
                          residual2)
    m = down_weight.shape[0]
    tensors = (h, down_weight, down_bias, up_weight, up_bias, residual, gate, residual2)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    shape = dict(T=h.numel() // max(h.shape[-1], 1), d=h.shape[-1], m=m, train=train)
    unsupported = None
    if h.dtype == torch.float64:
        unsupported = "float64"
    elif m > MAX_KERNEL_WIDTH and PATHS.peek(h.is_cuda, **shape) == "kernel":
        unsupported = f"bottleneck width m={m} > {MAX_KERNEL_WIDTH}"
    if not use_triton("adapter", *tensors, unsupported=unsupported):
        if residual2 is not None:
            residual = residual + residual2
        return reference.bottleneck_adapter(h, down_weight, down_bias, up_weight, up_bias, residual=residual,
                                            activation=activation, scaling=scaling, gate=gate)
    if PATHS.pick(h.is_cuda, **shape) == "eager":
        # In the inputs' dtype, as the kernels compute (autocast would recast the GEMMs).
        with torch.autocast(h.device.type, enabled=False):
            return _eager(h, down_weight, down_bias, up_weight, up_bias, residual, gate, residual2, act, scaling,
                          train)
    if train:
        # Aliased inputs (torch.compile cannot trace one tensor passed twice to a Function):
        # residual is h -> passed as None, the kernel reads h and dh gets dY added in place;
        # residual2 aliasing h / residual -> a view, which autograd routes back to the same tensor.
        res_is_h = residual is h
        if residual2 is not None and (residual2 is h or residual2 is residual):
            residual2 = residual2.view(residual2.shape)
        return _AdapterFn.apply(h, down_weight, down_bias, up_weight, up_bias, None if res_is_h else residual,
                                gate, residual2, act, scaling)
    # Inference: no autograd node, and z is not written.
    lead = h.shape[:-1]
    out, _ = adapter_fwd(rows(h), down_weight, down_bias, up_weight, up_bias, rows(residual),
                         None if residual2 is None else rows(residual2), _gate_rows(gate, lead), act, scaling, False)
    return out.view(*lead, h.shape[-1])


# ------------------------------------------------------------------------ eager path
def _act_fwd(z, act):
    F = torch.nn.functional
    if act == 0:
        return F.relu(z)
    if act == 1:
        return F.gelu(z)
    if act == 2:
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def _act_bwd(da, z, act):
    """dz = da * act'(z)."""
    if act == 0:
        return torch.ops.aten.threshold_backward(da, z, 0)
    if act == 1:
        return torch.ops.aten.gelu_backward(da, z)
    if act == 2:
        return torch.ops.aten.gelu_backward(da, z, approximate="tanh")
    return torch.ops.aten.silu_backward(da, z)


def _eager_fwd(h2, down_weight, down_bias, up_weight, up_bias, r2, res2, g, act, scaling):
    """Forward of the ``eager`` path on 2-D tensors. ``g`` is the per-row gate [T] fp32 or
    None. Returns (out, z, A, A_s, Wx): A = [act(z) | 1 | 0], A_s = A scaled as it entered
    the up GEMM, Wx = [Wu | bu | 0]."""
    T, m = h2.shape[0], down_weight.shape[0]
    # z = h Wd^T + bd    (cuBLAS, bias in the epilogue; reads h once)
    z = torch.addmm(down_bias, h2, down_weight.t()) if down_bias is not None else h2 @ down_weight.t()
    a = _act_fwd(z, act)                                                         # [T, m]
    if up_bias is not None:
        # a Wu^T + bu = [a | 1 | 0] [Wu | bu | 0]^T: the bias rides in the GEMM (K = m + 1,
        # padded to a multiple of 8 so the rows stay 16-byte aligned for cuBLAS).
        k = -(-(m + 1) // 8) * 8
        A = torch.cat([a, a.new_ones(T, 1), a.new_zeros(T, k - m - 1)], dim=1)
        Wx = torch.cat([up_weight, up_bias[:, None], up_weight.new_zeros(up_weight.shape[0], k - m - 1)], dim=1)
    else:
        A, Wx = a, up_weight
    if g is not None:
        # G = scaling * gate per row scales A's rows: G (A Wx^T) = (G A) Wx^T
        A_s = (A * (g * scaling)[:, None]).to(A.dtype)
        alpha = 1.0
    else:
        A_s, alpha = A, scaling
    # out = residual + G (act(z) Wu^T + bu): the residual is the GEMM's C operand (read once)
    out = torch.addmm(r2, A_s, Wx.t(), alpha=alpha)
    if res2 is not None:
        out.add_(res2)                                                           # + residual2 (one [T, d] pass)
    return out, z, A, A_s, Wx


def _eager(h, down_weight, down_bias, up_weight, up_bias, residual, gate, residual2, act, scaling, train):
    lead = h.shape[:-1]
    if train:
        res_is_h = residual is h
        if residual2 is not None and (residual2 is h or residual2 is residual):
            residual2 = residual2.view(residual2.shape)                          # see the kernel path above
        return _AdapterEagerFn.apply(h, down_weight, down_bias, up_weight, up_bias, None if res_is_h else residual,
                                     gate, residual2, act, scaling)
    out, *_ = _eager_fwd(rows(h), down_weight, down_bias, up_weight, up_bias, rows(residual),
                         None if residual2 is None else rows(residual2), _gate_rows(gate, lead), act, scaling)
    return out.view(*lead, h.shape[-1])


class _AdapterEagerFn(torch.autograd.Function):
    """The ``eager`` path with autograd: forward ``_eager_fwd``; backward by cuBLAS GEMMs and
    [T, m]-sized elementwise work (algebra beside each line)."""

    @staticmethod
    def forward(ctx, h, down_weight, down_bias, up_weight, up_bias, residual, gate, residual2, act, scaling):
        lead = h.shape[:-1]
        h2 = rows(h)
        g = _gate_rows(gate, lead)
        out, z, A, A_s, Wx = _eager_fwd(h2, down_weight, down_bias, up_weight, up_bias,
                                        h2 if residual is None else rows(residual),
                                        None if residual2 is None else rows(residual2), g, act, scaling)
        ctx.save_for_backward(h2, down_weight, z, A, A_s, Wx, g)
        ctx.act, ctx.scaling, ctx.lead, ctx.res_is_h = act, scaling, lead, residual is None
        ctx.gate_shape = None if gate is None else gate.shape
        ctx.gate_dtype = None if gate is None else gate.dtype
        return out.view(*lead, h.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):                     # the inputs' dtype, as forward
            return _AdapterEagerFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        h2, down_weight, z, A, A_s, Wx, g = ctx.saved_tensors
        need_h, need_wd, need_bd, need_wu, need_bu, need_res, need_g, need_res2 = ctx.needs_input_grad[:8]
        need_res = need_res and not ctx.res_is_h
        m, s = down_weight.shape[0], ctx.scaling
        dy2 = rows(dy)
        dh = dwd = dbd = dwu = dbu = dres = dgate = dres2 = None
        if need_h or need_wd or need_bd or need_g:
            P = dy2 @ Wx                                                         # P = dY Wx  [T, K] (P[:, m] = dY . bu)
            if need_g:
                # out = r + s gate (A Wx^T): dL/dgate_t = s sum_k A_tk P_tk (includes dY . bu)
                dg = (A.float() * P.float()).sum(1) * s
                dgate = dg.view(*ctx.lead, 1).sum_to_size(ctx.gate_shape).to(ctx.gate_dtype)
            if need_h or need_wd or need_bd:
                Pa = P[:, :m]
                da = (Pa * (g * s)[:, None]).to(Pa.dtype) if g is not None else Pa * s    # d act(z) = G P
                dz = _act_bwd(da, z, ctx.act)                                    # dz = G P act'(z)  [T, m]
                if need_h:
                    # dh = dz Wd, + dY in the GEMM's C operand when the residual is h itself
                    dh2 = torch.addmm(dy2, dz, down_weight) if ctx.res_is_h else dz @ down_weight
                    dh = dh2.view(*ctx.lead, h2.shape[1])
                if need_wd:
                    dwd = dz.t() @ h2                                            # dWd = dz^T h  [m, d]
                if need_bd:
                    dbd = dz.sum(0, dtype=torch.float32).to(down_weight.dtype)   # dbd = colsum(dz)
        if need_wu or need_bu:
            dWx = dy2.t() @ A_s                                                  # dWx = dY^T (G A)  [d, K]
            if g is None:
                dWx = dWx * s                                                    # alpha = s in forward
            dwu = dWx[:, :m] if need_wu else None                                # dWu = dY^T (G act(z))
            dbu = dWx[:, m] if need_bu else None                                 # dbu = colsum(G dY): the ones column
        if need_res:
            dres = dy                                                            # d residual = dY
        if need_res2:
            dres2 = dy                                                           # d residual2 = dY
        return dh, dwd, dbd, dwu, dbu, dres, dgate, dres2, None, None


def _check(h, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling, gate, residual2=None):
    _checks.tensor("h", h)
    if h.dim() < 1:
        raise ValueError(f"h must have at least 1 dim [..., d], got shape {tuple(h.shape)}")
    _checks.tensor("down_weight", down_weight, ndim=2)
    _checks.tensor("down_bias", down_bias, ndim=1, optional=True)
    _checks.tensor("up_weight", up_weight, ndim=2)
    _checks.tensor("up_bias", up_bias, ndim=1, optional=True)
    _checks.tensor("residual", residual)
    _checks.tensor("residual2", residual2, optional=True)
    m, d = down_weight.shape
    if h.shape[-1] != d:
        raise ValueError(f"h has {h.shape[-1]} features (shape {tuple(h.shape)}) but down_weight "
                         f"{tuple(down_weight.shape)} expects d = {d}")
    if m == 0:
        raise ValueError(f"down_weight has bottleneck width m = 0 (shape {tuple(down_weight.shape)}): m must be >= 1")
    if down_bias is not None and tuple(down_bias.shape) != (m,):
        raise ValueError(f"down_bias has shape {tuple(down_bias.shape)}, expected [{m}] for down_weight {tuple(down_weight.shape)}")
    if tuple(up_weight.shape) != (d, m):
        raise ValueError(f"up_weight has shape {tuple(up_weight.shape)}, expected [{d}, {m}] for down_weight "
                         f"{tuple(down_weight.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (d,):
        raise ValueError(f"up_bias has shape {tuple(up_bias.shape)}, expected [{d}]")
    if residual.shape != h.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but h has shape {tuple(h.shape)}; they must match")
    if residual2 is not None and residual2.shape != h.shape:
        raise ValueError(f"residual2 has shape {tuple(residual2.shape)} but h has shape {tuple(h.shape)}; they must match")
    _checks.same_dtype("h", h, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                       up_bias=up_bias, residual=residual, residual2=residual2)
    _checks.same_device("h", h, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                        up_bias=up_bias, residual=residual, residual2=residual2)
    _checks.gate("gate", gate, (*h.shape[:-1], 1), h)
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation.lower()], _checks.finite_scalar("scaling", scaling)


def _gate_rows(gate, lead):
    """The gate expanded to one fp32 value per row ``[T]`` (None stays None)."""
    if gate is None:
        return None
    return gate.detach().expand(*lead, 1).reshape(-1).float().contiguous()


class _AdapterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, down_weight, down_bias, up_weight, up_bias, residual, gate, residual2, act, scaling):
        lead = h.shape[:-1]
        h2 = rows(h)
        g = _gate_rows(gate, lead)
        out, z = adapter_fwd(h2, down_weight, down_bias, up_weight, up_bias, h2 if residual is None else rows(residual),
                             None if residual2 is None else rows(residual2), g, act, scaling, True)
        ctx.save_for_backward(h2, down_weight, up_weight, up_bias, z, g)
        ctx.act, ctx.scaling, ctx.lead, ctx.res_is_h = act, scaling, lead, residual is None
        ctx.gate_shape = None if gate is None else gate.shape
        ctx.gate_dtype = None if gate is None else gate.dtype
        return out.view(*lead, h.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        h2, down_weight, up_weight, up_bias, z, g = ctx.saved_tensors
        need_h, need_wd, need_bd, need_wu, need_bu, need_res, need_g, need_res2 = ctx.needs_input_grad[:8]
        need_res = need_res and not ctx.res_is_h
        dh = dwd = dbd = dwu = dbu = dres = dgate = dres2 = None
        if need_h or need_wd or need_bd or need_wu or need_bu or need_g:
            dh2, dwd, dbd, dwu, dbu, dg = adapter_bwd(
                rows(dy), h2, z, down_weight, up_weight, up_bias, g, ctx.act, ctx.scaling,
                need_h, need_wd, need_bd, need_wu or need_bu, need_g, need_h and ctx.res_is_h)
            dh = dh2.view(*ctx.lead, h2.shape[1]) if need_h else None
            dwd = dwd if need_wd else None
            dbd = dbd if need_bd else None
            dwu, dbu = (dwu if need_wu else None), (dbu if need_bu else None)
            if need_g:
                dgate = dg.view(*ctx.lead, 1).sum_to_size(ctx.gate_shape).to(ctx.gate_dtype)
        if need_res:
            dres = dy                                                             # d residual = dY
        if need_res2:
            dres2 = dy                                                            # d residual2 = dY
        return dh, dwd, dbd, dwu, dbu, dres, dgate, dres2, None, None


# ------------------------------------------------------------------------ launchers
@torch.library.custom_op("peftops::adapter_fwd", mutates_args=())
def adapter_fwd(
    h: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None, up_weight: torch.Tensor,
    up_bias: torch.Tensor | None, residual: torch.Tensor, residual2: torch.Tensor | None,
    gate: torch.Tensor | None, act: int, scaling: float, store_z: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on 2-D h / residual ``[T, d]``: returns (out ``[T, d]``, z = h Wd^T + bd
    ``[T, m]`` fp32, or an empty tensor when ``store_z`` is False)."""
    T, D = h.shape
    MW = down_weight.shape[0]
    out = empty((T, D), h.dtype, h.device)
    z = empty((T, MW), torch.float32, h.device) if store_z else h.new_empty(0, dtype=torch.float32)
    if T == 0:
        return out, z
    k = kernels("adapter")
    cfg = k.rows_config(T, D, MW, cpu_configs(h), forward=True, half=h.dtype != torch.float32)
    # out = residual (+ residual2) + G (act(h Wd^T + bd) Wu^T + bu),  G = scaling * gate;  z = h Wd^T + bd
    r2 = residual2 if residual2 is not None else residual
    k.adapter_fwd_kernel[(-(-T // cfg["BLOCK_M"]),)](
        h, down_weight, down_bias if down_bias is not None else down_weight, up_weight,
        up_bias if up_bias is not None else up_weight, residual, r2, gate if gate is not None else out,
        out, z if store_z else out,
        T, D, MW,
        h.stride(0), h.stride(1), down_weight.stride(0), down_weight.stride(1),
        up_weight.stride(0), up_weight.stride(1), residual.stride(0), residual.stride(1),
        r2.stride(0), r2.stride(1), out.stride(0), out.stride(1),
        scaling,
        ACT=act, HAS_BD=down_bias is not None, HAS_BU=up_bias is not None, HAS_GATE=gate is not None,
        HAS_RES2=residual2 is not None, STORE_Z=store_z, UPCAST=upcast_dots(h.dtype), PRECISION=dot_precision(h.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_W=next_pow2(MW),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("adapter_fwd")
    return out, z


@adapter_fwd.register_fake
def _(h, down_weight, down_bias, up_weight, up_bias, residual, residual2, gate, act, scaling, store_z):
    T = h.shape[0]
    z = h.new_empty((T, down_weight.shape[0]) if store_z else (0,), dtype=torch.float32)
    return h.new_empty(h.shape), z


@torch.library.custom_op("peftops::adapter_bwd", mutates_args=())
def adapter_bwd(
    dy: torch.Tensor, h: torch.Tensor, z: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
    up_bias: torch.Tensor | None, gate: torch.Tensor | None, act: int, scaling: float,
    need_dh: bool, need_dwd: bool, need_dbd: bool, need_dwu: bool, need_dgate: bool, dh_add_dy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward on 2-D tensors. Returns (dh, dWd, dbd, dWu, dbu, dgate per row [T] fp32);
    an output not asked for is an empty tensor. ``need_dwu`` gives dWu and dbu; ``dh_add_dy``
    (the residual is h) returns dh + dY as dh."""
    T, D = h.shape
    MW = down_weight.shape[0]
    def nothing():
        return h.new_empty(0)

    dh = empty((T, D), h.dtype, h.device) if need_dh else nothing()
    if T == 0:
        return (dh, torch.zeros_like(down_weight) if need_dwd else nothing(),
                h.new_zeros(MW) if need_dbd else nothing(), torch.zeros_like(up_weight) if need_dwu else nothing(),
                h.new_zeros(D) if need_dwu else nothing(), h.new_empty(0, dtype=torch.float32))
    k = kernels("adapter")
    interpret = cpu_configs(h)
    upcast, precision, block_w = upcast_dots(h.dtype), dot_precision(h.dtype), next_pow2(MW)
    has_gate = gate is not None
    need_dz = need_dh or need_dwd or need_dbd or need_dgate
    dz = dg = None
    if need_dz:
        cfg = k.rows_config(T, D, MW, interpret)
        dz = empty((T, MW), torch.float32, h.device)
        dg = empty((T,), torch.float32, h.device) if has_gate else dz
        # P = dY Wu;  dz = G P act'(z);  dg = s (<act(z), P> + dY . bu);  dh = dz Wd
        k.adapter_bwd_rows_kernel[(-(-T // cfg["BLOCK_M"]),)](
            dy, z, down_weight, up_weight, up_bias if up_bias is not None else up_weight,
            gate if has_gate else dz, dz, dg, dh if need_dh else dz,
            T, D, MW,
            dy.stride(0), dy.stride(1), down_weight.stride(0), down_weight.stride(1),
            up_weight.stride(0), up_weight.stride(1),
            dh.stride(0) if need_dh else 0, dh.stride(1) if need_dh else 0,
            scaling,
            ACT=act, HAS_BU=up_bias is not None, HAS_GATE=has_gate, NEED_DH=need_dh,
            ADD_DY=need_dh and dh_add_dy, UPCAST=upcast, PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_W=block_w,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        record_launch("adapter_bwd_rows")
    dwd, dwu, dbu = nothing(), nothing(), nothing()
    if need_dwd or need_dwu:
        cfg = k.weights_config(T, D, MW, 2 * num_sms(h.device), interpret)
        S = cfg["splits"]
        pu = empty((S, D, MW), torch.float32, h.device) if need_dwu else None
        pb = empty((S, D), torch.float32, h.device) if need_dwu else None
        pd = empty((S, D, MW), torch.float32, h.device) if need_dwd else None
        dummy = pu if pu is not None else pd
        # dWu = dY^T (G act(z));  dbu = colsum(G dY);  dWd^T = h^T dz   (partials per split)
        k.adapter_bwd_weights_kernel[(-(-D // cfg["BLOCK_D"]), S)](
            dy, h, z, dz if dz is not None else dummy, gate if has_gate else dummy,
            pu if pu is not None else dummy, pb if pb is not None else dummy, pd if pd is not None else dummy,
            T, D, MW, cfg["rows_per_split"],
            dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
            scaling,
            ACT=act, HAS_GATE=has_gate, DO_U=need_dwu, DO_D=need_dwd,
            UPCAST=upcast, PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_W=block_w,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        record_launch("adapter_bwd_weights")
        if need_dwu:
            dwu = pu.sum(0).to(up_weight.dtype)
            dbu = pb.sum(0).to(up_weight.dtype)
        if need_dwd:
            dwd = pd.sum(0).t().contiguous().to(down_weight.dtype)
    dbd = dz.sum(0).to(down_weight.dtype) if need_dbd else nothing()              # dbd = colsum(dz)
    dgate = dg if (need_dgate and has_gate) else h.new_empty(0, dtype=torch.float32)
    return dh, dwd, dbd, dwu, dbu, dgate


@adapter_bwd.register_fake
def _(dy, h, z, down_weight, up_weight, up_bias, gate, act, scaling, need_dh, need_dwd, need_dbd, need_dwu, need_dgate,
      dh_add_dy=False):
    T, D = h.shape
    MW = down_weight.shape[0]
    return (h.new_empty((T, D)) if need_dh else h.new_empty(0),
            torch.empty_like(down_weight) if need_dwd else h.new_empty(0),
            h.new_empty(MW) if need_dbd else h.new_empty(0),
            torch.empty_like(up_weight) if need_dwu else h.new_empty(0),
            h.new_empty(D) if need_dwu else h.new_empty(0),
            h.new_empty(T if (need_dgate and gate is not None) else 0, dtype=torch.float32))
