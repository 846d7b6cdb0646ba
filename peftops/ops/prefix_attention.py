"""Prefix-aware attention: ``peftops.prefix_attention`` -- checks, dispatch, autograd, launchers.

    O = softmax([Q (gk Pk)^T ; Q K^T] * scale) [gv Pv ; V],   scale = 1 / sqrt(D)

Two paths, picked per shape by ``PATHS`` (DESIGN.md, Dispatch), both exact:
* ``kernel``: one flash-attention-style forward kernel (prefix blocks first, then sequence
  blocks, one online softmax, logsumexp saved per row); backward: a preprocess kernel
  (delta = rowsum(dO O)), a dQ kernel per query block and a dK/dV kernel per key block whose
  extra programs produce the prefix gradients as per-(batch, kv head) partials reduced here
  in a fixed order. The algebra is in ``kernels/prefix_attention.py`` and beside each launch.
* ``sdpa``: the gated prefix concatenated in front of K / V per call and torch's SDPA
  (flash on CUDA for fp16 / bf16): GQA by ``enable_gqa``, causal by L dummy query rows in
  front of q (SDPA's own top-left causal mask over L + T rows is then exactly the prefix-
  aware mask; no explicit mask, so flash stays on). Gradients by autograd of the
  composition (``_sdpa_prefix_attention``). Per-query-row gates are not expressible this way.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, next_pow2, upcast_dots

__all__ = ["prefix_attention", "PATHS"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256

# Which path runs on CUDA, first matching row wins. Shapes: B, Hq, Hkv, T, L, D; flags:
# causal, row_gate (a [B, T, 2 | 1] gate), mask (a key padding mask), half (fp16 / bf16),
# train (grad enabled and some input requires grad).
PATHS = PathTable("prefix_attention", paths=("kernel", "sdpa"), default="kernel", rows=[
    (lambda row_gate, **_: row_gate, "kernel",
     "per-query-row gates (UniPELT token mode): scaling one query row's prefix scores and values by its own "
     "gate is not one SDPA call (it needs the head dim doubled or two attentions merged by logsumexp); "
     "no composition measured"),
    (lambda D, **_: D > _MAX_HEAD_DIM, "sdpa",
     f"head_dim > {_MAX_HEAD_DIM}: our kernel does not hold it (the reference would run); SDPA takes any head_dim"),
    (lambda mask, T, **_: mask and T > 512, "kernel",
     "a key padding mask needs an explicit SDPA mask, which leaves flash. H100 2026-11-23, H=32/8 D=128 causal, "
     "concatenation + explicit mask vs ours: T=2048 B=4 L=32 fwd+bwd 3.96 vs 3.44 ms (shared/PERF.md); T=4096 "
     "(bench/results) B=8 fwd+bwd 28.7 vs 22.5 (L=10), 24.9 vs 22.5 (L=64), B=1 fwd 0.99 vs 0.60. At T=512 the "
     "explicit mask wins (B=1 fwd+bwd 0.61 vs 1.28, B=8 0.77 vs 1.43): rows below take it"),
    (lambda half, **_: not half, "kernel",
     "fp32: SDPA's flash takes fp16 / bf16 only, and with GQA the fallback may be the math backend, which "
     "materialises [B, Hq, T, L + T] scores (O(T^2) bytes); ours streams them. Unmeasured (FLOP/byte argument)"),
    (lambda train, Hq, Hkv, **_: not train and Hq == Hkv, "kernel",
     "inference, MHA: H100 2026-11-23 B=8 H=32/32 T=1024 L=64 D=128 full fwd: ours 0.488 ms, SDPA over "
     "concatenated K/V 0.693 ms (SDPA without a prefix 0.235: to be re-measured as peftops[sdpa])"),
    (lambda **_: True, "sdpa",
     "H100 2026-11-23 fwd+bwd, H=32/8 D=128 L=32: SDPA over concatenated K/V 1.14x / 1.03x SDPA without a "
     "prefix (B=4 T=2048 full 2.20 ms, B=1 T=8192 full 7.30 ms) vs ours 2.9x / 3.0x (5.61, 20.9 ms); those "
     "totals bound its forward too (GQA inference). Causal: ours 3.44 ms vs flash without a prefix 1.22; even "
     "with an explicit mask (no flash) the concatenation beat ours at T=512 (bench/results: fwd 0.057 vs 0.122 "
     "ms, fwd+bwd 0.61 vs 1.28). The L dummy query rows keep flash: expected ~1.2x flash, unmeasured"),
])


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
    tensors = (q, k, v, prefix_k, prefix_v, prefix_gate)
    B, Hq, T, D = q.shape
    shape = dict(B=B, Hq=Hq, Hkv=k.shape[1], T=T, L=prefix_k.shape[-2], D=D, causal=is_causal,
                 row_gate=prefix_gate is not None and prefix_gate.dim() == 3, mask=key_padding_mask is not None,
                 half=q.dtype in (torch.float16, torch.bfloat16),
                 train=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    unsupported = None
    if q.dtype == torch.float64:
        unsupported = "float64"
    elif D > _MAX_HEAD_DIM and PATHS.peek(q.is_cuda, **shape) == "kernel":
        unsupported = f"head_dim>{_MAX_HEAD_DIM}"
    if not use_triton("prefix_attention", *tensors, unsupported=unsupported):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_gate=prefix_gate,
                                          is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)
    if PATHS.pick(q.is_cuda, **shape) == "sdpa":
        if shape["row_gate"]:
            raise ValueError(f"prefix_attention: the sdpa path (forced by PEFTOPS_PATH_PREFIX_ATTENTION) cannot take "
                             f"a per-query-row prefix_gate {tuple(prefix_gate.shape)}; use the kernel path")
        # In the inputs' dtype, as the kernels compute (autocast would recast the attention).
        with torch.autocast(q.device.type, enabled=False):
            return _sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_gate, is_causal, scale,
                                          key_padding_mask)
    mask = None if key_padding_mask is None else (key_padding_mask != 0).to(torch.int8).contiguous()
    return _PrefixAttentionFn.apply(q, k, v, prefix_k, prefix_v, prefix_gate, bool(is_causal), scale, mask)


def _sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, gate, is_causal, scale, key_padding_mask):
    """The ``sdpa`` path: ``SDPA(q, [gk Pk ; K], [gv Pv ; V])`` with the prefix visible to
    every query; gradients (q, k, v, prefix, gate) by autograd of this composition."""
    F = torch.nn.functional
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], prefix_k.shape[-2]
    if T == 0 or B == 0:
        # No query rows: an empty output whose gradients are zeros; no attention call.
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_gate=gate, is_causal=is_causal,
                                          scale=scale, key_padding_mask=key_padding_mask)
    pk = prefix_k.expand(B, Hkv, L, D)                                           # shared prefix: a view
    pv = prefix_v.expand(B, Hkv, L, D)
    if gate is not None:                                                         # [B, 2] or [B, 1]
        g = gate.to(q.dtype)
        pk = pk * g[:, 0].view(B, 1, 1, 1)                                       # q . (gk Pk) = gk (q . Pk)
        pv = pv * g[:, -1].view(B, 1, 1, 1)                                      # gv Pv
    keys = torch.cat([pk, k], dim=2)                                             # [B, Hkv, L + T, D]
    values = torch.cat([pv, v], dim=2)
    gqa = Hq != Hkv                                                              # q head h reads kv head h // (Hq / Hkv)
    if key_padding_mask is not None:
        # An explicit mask (SDPA leaves flash): the prefix always visible, padded keys hidden,
        # and, causal, key L + j visible to query i iff j <= i.
        keep = torch.cat([torch.ones(B, L, dtype=torch.bool, device=q.device), key_padding_mask != 0], dim=1)
        keep = keep[:, None, None, :]                                            # [B, 1, 1, L + T]
        if is_causal:
            col = torch.arange(L + T, device=q.device)
            row = torch.arange(T, device=q.device)
            keep = keep & (col[None, :] - L <= row[:, None])                     # [B, 1, T, L + T]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=scale, enable_gqa=gqa)
    if not is_causal:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=gqa)
    # Causal: query i must see the L prefix keys and keys L..L+i. With L dummy (zero) query
    # rows in front, query row L + i under SDPA's top-left causal mask sees keys 0..L+i:
    # exactly that. No explicit mask (flash stays on); the dummy rows' outputs are dropped
    # and get no gradient, so they add nothing to dK / dV.
    q_pad = torch.cat([q.new_zeros(B, Hq, L, D), q], dim=2)
    out = F.scaled_dot_product_attention(q_pad, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    return out[:, :, L:]


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
    cfg = kk.bwd_config(T, next_pow2(D), q.element_size(), interp, dkdv=True)
    blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
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
