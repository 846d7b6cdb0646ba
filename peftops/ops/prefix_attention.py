"""Prefix-aware attention: ``peftops.prefix_attention`` -- checks, dispatch, autograd, launchers.

    O = softmax([Q (gk Pk)^T ; Q K^T] * scale) [gv Pv ; V],   scale = 1 / sqrt(D)

One flash-attention-style forward kernel (prefix blocks first, then sequence blocks, one
online softmax, logsumexp saved per row); backward: a preprocess kernel (delta = rowsum(dO O)),
a dQ kernel per query block and a dK/dV kernel per key block whose extra programs produce
the prefix gradients as per-(batch, kv head) partials reduced here in a fixed order. The
algebra is in ``kernels/prefix_attention.py`` and beside each launch below.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, reference
from .._dispatch import record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, next_pow2, upcast_dots

__all__ = ["prefix_attention"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_gate: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax([q (gk Pk)^T ; q k^T] * scale) [gv Pv ; v]`` without concatenating the prefix.

    q ``[B, Hq, T, D]``; k, v ``[B, Hkv, T, D]`` with Hkv dividing Hq (grouped-query
    attention: q head h reads kv head ``h // (Hq // Hkv)``); prefix_k, prefix_v
    ``[Hkv, L, D]`` shared by the batch or ``[B, Hkv, L, D]``, L >= 1; prefix_gate None,
    per sample ``[B, 2]`` (key gate gk = gate[..., 0], value gate gv = gate[..., 1]) or
    ``[B, 1]`` (one gate for both), or per query row ``[B, T, 2]`` / ``[B, T, 1]`` (row i's
    prefix scores scaled by gk_i, its prefix values by gv_i; UniPELT's per-token gates) (one gate
    for both). ``is_causal`` masks inside the sequence only: query i sees the whole prefix
    and keys 0..i. ``scale`` defaults to 1 / sqrt(D). ``key_padding_mask`` None or ``[B, T]``
    bool / integer, nonzero = attend (HF's ``attention_mask`` convention): hides padded
    sequence keys from every query (the prefix stays visible). Returns ``[B, Hq, T, D]`` in q's dtype.
    """
    scale = _check(q, k, v, prefix_k, prefix_v, prefix_gate, is_causal, scale)
    _check_mask(key_padding_mask, q)
    unsupported = None
    if q.dtype == torch.float64:
        unsupported = "float64"
    elif q.shape[-1] > _MAX_HEAD_DIM:
        unsupported = f"head_dim>{_MAX_HEAD_DIM}"
    if not use_triton("prefix_attention", q, k, v, prefix_k, prefix_v, prefix_gate, unsupported=unsupported):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_gate=prefix_gate,
                                          is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    mask = None if key_padding_mask is None else (key_padding_mask != 0).to(torch.int8).contiguous()
    return _PrefixAttentionFn.apply(q, k, v, prefix_k, prefix_v, prefix_gate, bool(is_causal), scale, mask)


def _check(q, k, v, prefix_k, prefix_v, gate, is_causal, scale):
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.tensor("prefix_k", prefix_k, ndim=(3, 4))
    _checks.tensor("prefix_v", prefix_v, ndim=(3, 4))
    B, Hq, T, D = q.shape
    if D == 0:
        raise ValueError(f"q has head_dim 0 (shape {tuple(q.shape)})")
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)} but q {tuple(q.shape)} needs [{B}, Hkv, {T}, {D}]")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k has {Hkv} heads (shape {tuple(k.shape)}), which must divide q's {Hq} heads (shape {tuple(q.shape)})")
    want = "[Hkv, L, D] = [{0}, L, {1}] or [B, Hkv, L, D] = [{2}, {0}, L, {1}]".format(Hkv, D, B)
    pk_batch = prefix_k.shape[0] if prefix_k.dim() == 4 else None
    if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D or (pk_batch is not None and pk_batch != B):
        raise ValueError(f"prefix_k has shape {tuple(prefix_k.shape)}, expected {want}")
    if prefix_k.shape[-2] == 0:
        raise ValueError(f"prefix_k has prefix length L = 0 (shape {tuple(prefix_k.shape)}): L must be >= 1")
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(f"prefix_v has shape {tuple(prefix_v.shape)} but prefix_k has shape {tuple(prefix_k.shape)}")
    _checks.same_dtype("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    _checks.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    if gate is not None:
        _checks.tensor("prefix_gate", gate, ndim=(2, 3))
        _checks.same_device("q", q, prefix_gate=gate)
        if gate.shape[0] != B or gate.shape[-1] not in (1, 2) or (gate.dim() == 3 and gate.shape[1] != T):
            raise ValueError(f"prefix_gate has shape {tuple(gate.shape)}, expected [{B}, 2] (key, value gates), "
                             f"[{B}, 1], or per query row [{B}, {T}, 2] / [{B}, {T}, 1]")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    return _checks.finite_scalar("scale", scale)


def _check_mask(mask, q):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"key_padding_mask must be bool or integer (nonzero = attend), got dtype {mask.dtype}")
    B, _, T, _ = q.shape
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}, expected [B, T] = [{B}, {T}] for q {tuple(q.shape)}")
    _checks.same_device("q", q, key_padding_mask=mask)


def _gate_table(gate, B, T, device):
    """The gate as an fp32 ``[B, Tg, 2]`` (gk, gv) table, Tg = T for per-row gates, else 1
    (the kernels read it with row stride 0); ones without a gate."""
    if gate is None:
        return torch.ones((B, 1, 2), dtype=torch.float32, device=device)
    g = gate.detach().float()
    g = g.unsqueeze(1) if g.dim() == 2 else g
    return g.expand(B, g.shape[1], 2).contiguous()


def _gate_strides(table):
    """(batch stride, row stride) of a ``_gate_table``."""
    return table.shape[1] * 2, (2 if table.shape[1] > 1 else 0)


class _PrefixAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, is_causal, scale, mask):
        g = _gate_table(gate, q.shape[0], q.shape[2], q.device)
        o, lse = prefix_attention_fwd(q, k, v, prefix_k, prefix_v, g, mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, g, o, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.gate_shape = None if gate is None else gate.shape
        ctx.gate_dtype = None if gate is None else gate.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, prefix_k, prefix_v, g, o, lse, mask = ctx.saved_tensors
        dq, dk, dv, dpk, dpv, dg = prefix_attention_bwd(do, q, k, v, prefix_k, prefix_v, g, mask, o, lse,
                                                        ctx.is_causal, ctx.scale)
        need = ctx.needs_input_grad
        dgate = None
        if need[5]:
            dgate = dg if len(ctx.gate_shape) == 3 else dg[:, 0]                # dg: [B, Tg, 2]
            if ctx.gate_shape[-1] == 1:                                          # one gate: d g = d gk + d gv
                dgate = dgate.sum(-1, keepdim=True)
            dgate = dgate.to(ctx.gate_dtype)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dpk if need[3] else None, dpv if need[4] else None, dgate, None, None, None)


# ------------------------------------------------------------------------ launchers
def _strides4(t):
    """Strides of a [B, H, N, D] tensor, or of a shared [H, N, D] one with batch stride 0."""
    return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def _interpret(t):
    return cpu_configs(t)


@torch.library.custom_op("peftops::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    gate: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (O [B, Hq, T, D] in q's dtype, lse2 [B, Hq, T] fp32, base-2 logsumexp of
    the scores times log2(e)). ``gate`` an fp32 [B, Tg, 2] table (``_gate_table``); ``mask`` None or
    int8 [B, T] contiguous (nonzero = attend)."""
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], prefix_k.shape[-2]
    o = empty((B, Hq, T, D), q.dtype, q.device)
    lse = empty((B, Hq, T), torch.float32, q.device)
    if T == 0 or B == 0:
        return o, lse
    kk = kernels("prefix_attention")
    cfg = kk.fwd_config(T, next_pow2(D), q.element_size(), _interpret(q))
    grid = (-(-T // cfg["BLOCK_M"]), B * Hq)
    # s2 = (q . key) * scale * log2(e) (* gk for the prefix); O = sum 2^(s2 - m) value / sum 2^(s2 - m)
    kk.prefix_attn_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, gate, mask if mask is not None else gate, o, lse,
        T, L, D, Hq, Hq // Hkv, T, *_gate_strides(gate),
        *q.stride(), *k.stride(), *v.stride(), *_strides4(prefix_k), *_strides4(prefix_v), *o.stride(),
        scale * _LOG2E,
        CAUSAL=is_causal, HAS_MASK=mask is not None, UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=next_pow2(D),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("prefix_attn_fwd")
    return o, lse


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, mask, is_causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("peftops::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
    is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv, dprefix_k, dprefix_v, dgate [B, Tg, 2] fp32 like the gate table)."""
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], prefix_k.shape[-2]
    if T == 0 or B == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(prefix_k),
                torch.zeros_like(prefix_v), torch.zeros_like(gate))
    kk = kernels("prefix_attention")
    interp = _interpret(q)
    common = dict(UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype), BLOCK_D=next_pow2(D),
                  HAS_MASK=mask is not None)
    mask_arg = mask if mask is not None else gate

    # delta_i = rowsum(dO_i * O_i)   (= sum_j P_ij dP_ij, the softmax Jacobian's row term)
    delta = empty((B, Hq, T), torch.float32, q.device)
    pre_m = 32 if interp else 64
    kk.prefix_attn_bwd_preprocess_kernel[(-(-T // pre_m), B * Hq)](
        o, do, delta, T, D, Hq, *o.stride(), *do.stride(), BLOCK_M=pre_m, BLOCK_D=common["BLOCK_D"])
    record_launch("prefix_attn_bwd_preprocess")

    cfg = kk.bwd_config(T, next_pow2(D), q.element_size(), interp)
    blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    # dQ_i = scale (gk_i sum_p dS_ip Pk_p + sum_j dS_ij K_j),  dS = P * (dP - delta),
    # dP = [gv dO Pv^T ; dO V^T]; per row and q head: d gk_i = scale sum_p dS_ip (q_i . Pk_p),
    # d gv_i = sum_p P_ip (dO_i . Pv_p)  -> dg [B, Hq, T, 2] fp32
    dq = empty(q.shape, q.dtype, q.device)
    dg = empty((B, Hq, T, 2), torch.float32, q.device)
    kk.prefix_attn_bwd_dq_kernel[(-(-T // cfg["BLOCK_M"]), B * Hq)](
        q, k, v, prefix_k, prefix_v, gate, mask_arg, do, lse, delta, dq, dg,
        T, L, D, Hq, Hq // Hkv, T, *_gate_strides(gate),
        *q.stride(), *k.stride(), *v.stride(), *_strides4(prefix_k), *_strides4(prefix_v),
        *do.stride(), *dq.stride(),
        scale, scale * _LOG2E, CAUSAL=is_causal, **common, **blocks,
    )
    record_launch("prefix_attn_bwd_dq")

    # dK = scale * dS_seq^T Q, dV = P_seq^T dO (summed over the group's q heads in-kernel);
    # prefix programs: dPk = scale (gk dS_pre)^T Q, dPv = P_pre^T (gv dO) per (b, kv head), fp32.
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    dpk = empty((B, Hkv, L, D), torch.float32, q.device)
    dpv = empty((B, Hkv, L, D), torch.float32, q.device)
    n_blocks = -(-L // cfg["BLOCK_N"]) + -(-T // cfg["BLOCK_N"])
    kk.prefix_attn_bwd_dkdv_kernel[(n_blocks, B * Hkv)](
        q, k, v, prefix_k, prefix_v, gate, mask_arg, do, lse, delta, dk, dv, dpk, dpv,
        T, L, D, Hq, Hkv, Hq // Hkv, T, *_gate_strides(gate),
        *q.stride(), *k.stride(), *v.stride(), *_strides4(prefix_k), *_strides4(prefix_v),
        *do.stride(), *dk.stride(), *dv.stride(),
        scale, scale * _LOG2E, CAUSAL=is_causal, **common, **blocks,
    )
    record_launch("prefix_attn_bwd_dkdv")

    # Fixed-order host reductions: the gate's over q heads (and rows for a per-sample gate),
    # a shared prefix's over the batch.
    dgate = dg.sum(1)                                                            # [B, T, 2]
    if gate.shape[1] == 1:
        dgate = dgate.sum(1, keepdim=True)                                       # [B, 1, 2]
    if prefix_k.dim() == 3:
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), dgate


@prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, gate, mask, o, lse, is_causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape), gate.new_empty(gate.shape))
