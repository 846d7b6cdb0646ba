"""Prefix attention benchmark cases: ``peftops.prefix_attention`` (prefix read once per tile,
never concatenated) against
* ``sdpa_no_prefix``: ``F.scaled_dot_product_attention`` on q, k, v without any prefix
  (flash; grouped-query via ``enable_gqa``): the floor, and the bar's denominator
  (bench/targets.toml: fwd+bwd <= 1.10x it);
* ``sdpa_concat``: the prefix K/V concatenated per sample, then SDPA; causal with
  ``torch.nn.attention.bias.causal_lower_right`` (query i sees the whole prefix and keys
  0..i), which keeps SDPA on its flash kernels: the composition an own kernel must beat;
* ``eager``: concatenation + SDPA with the prefix-aware causal mask as an explicit boolean
  mask (what a plain port writes; no flash); ``compile``: that under ``torch.compile``;
* ``peftops[<path>]``: each path of ``peftops.ops.prefix_attention.PATHS`` forced.

Shapes: GQA Hq = 32, Hkv = 8, D = 128, (B, T) in {(4, 2048), (1, 8192)}, prefix length
L in {32, 64}, causal and not; forward (no autograd) and forward + backward (gradients of
q, k, v, prefix_k, prefix_v; ``sdpa_no_prefix``: of q, k, v). ``small``: (B, L) in
{(1, 10), (2, 13)}, T = 33, Hq = 4, Hkv = 2, D = 16, causal and not, for the CPU parity pass (peftops and
sdpa_concat against eager).

FLOPs (useful): forward 4 B Hq D T (L + visible keys) (QK^T and PV); backward 2.5x that
(five matmuls instead of two), so forward + backward = 3.5x. Bytes (floor): forward reads
q, k, v and the prefix once and writes o; the backward adds reading q, k, v, o, dO and
writing dq, dk, dv and the prefix gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.prefix_attention import prefix_attention
from .core import Case, compiled, generator, randn, warmed


def _concat(q, k, v, prefix_k, prefix_v, prefix_gate):
    B, Hkv, L, D = q.shape[0], k.shape[1], prefix_k.shape[-2], q.shape[-1]
    pk = prefix_k.expand(B, Hkv, L, D)
    pv = prefix_v.expand(B, Hkv, L, D)
    if prefix_gate is not None:
        pk = pk * prefix_gate[:, 0].view(B, 1, 1, 1).to(pk.dtype)
        pv = pv * prefix_gate[:, -1].view(B, 1, 1, 1).to(pv.dtype)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def concat_sdpa(q, k, v, prefix_k, prefix_v, *, prefix_gate=None, is_causal=False):
    """The eager baseline: per-sample concatenation + SDPA with a prefix-aware boolean mask."""
    T, L = q.shape[-2], prefix_k.shape[-2]
    keys, values = _concat(q, k, v, prefix_k, prefix_v, prefix_gate)
    mask = None
    if is_causal:
        mask = torch.ones(T, L + T, dtype=torch.bool, device=q.device).tril(L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def concat_sdpa_lower_right(q, k, v, prefix_k, prefix_v, *, prefix_gate=None, is_causal=False):
    """Concatenation + SDPA, causal as ``causal_lower_right`` (flash-eligible)."""
    from torch.nn.attention.bias import causal_lower_right

    T, L = q.shape[-2], prefix_k.shape[-2]
    keys, values = _concat(q, k, v, prefix_k, prefix_v, prefix_gate)
    mask = causal_lower_right(T, L + T) if is_causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_no_prefix(q, k, v, prefix_k, prefix_v, *, is_causal=False):
    """Attention over the sequence alone (the prefix ignored): the cost of no prefix at all."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])


def _inputs(B, Hq, Hkv, T, L, D, device, dtype, requires_grad, seed=0):
    g = generator(device, seed)

    def r(*shape):
        return randn(g, *shape, dtype=dtype).requires_grad_(requires_grad)

    return dict(q=r(B, Hq, T, D), k=r(B, Hkv, T, D), v=r(B, Hkv, T, D), prefix_k=r(Hkv, L, D), prefix_v=r(Hkv, L, D))


def _forward(fn, dims, causal, device, dtype):
    def build():
        args = _inputs(*dims, device, dtype, False)

        def run():
            with torch.no_grad():
                return fn(**args, is_causal=causal)
        return run
    return build


def _forward_backward(fn, dims, causal, device, dtype, wrt=("q", "k", "v", "prefix_k", "prefix_v")):
    def build():
        args = _inputs(*dims, device, dtype, True)
        B, Hq, _, T, _, D = dims
        dout = randn(generator(device, 1), B, Hq, T, D, dtype=dtype)
        params = [args[n] for n in wrt]

        def run():
            out = fn(**args, is_causal=causal)
            return torch.autograd.grad(out, params, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        Hq, Hkv, D, grid = 4, 2, 16, [(1, 33, 10), (2, 33, 13)]
    else:
        Hq, Hkv, D, grid = 32, 8, 128, [(B, T, L) for B, T in ((4, 2048), (1, 8192)) for L in (32, 64)]
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for B, T, L in grid:
        for causal in (False, True):
            dims = (B, Hq, Hkv, T, L, D)
            shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "L": L, "D": D, "causal": causal}
            visible = T * L + (T * (T + 1) / 2 if causal else T * T)
            fwd_flops = 4.0 * B * Hq * D * visible
            q_bytes, kv_bytes, p_bytes = B * Hq * T * D * elt, B * Hkv * T * D * elt, Hkv * L * D * elt
            fwd_bytes = 2 * q_bytes + 2 * kv_bytes + 2 * p_bytes
            formula = compiled(concat_sdpa)
            out.append(Case(
                op="prefix_attention_fwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward(prefix_attention, dims, causal, device, dtype),
                           "sdpa_no_prefix": _forward(sdpa_no_prefix, dims, causal, device, dtype),
                           "sdpa_concat": _forward(concat_sdpa_lower_right, dims, causal, device, dtype),
                           "eager": _forward(concat_sdpa, dims, causal, device, dtype),
                           "compile": warmed(_forward(formula, dims, causal, device, dtype))},
                flops=fwd_flops, bytes=fwd_bytes, compare=("peftops", "sdpa_concat"),
                paths_from="peftops.ops.prefix_attention",
            ))
            out.append(Case(
                op="prefix_attention_fwd_bwd", shape=shape, dtype=dtype,
                providers={"peftops": _forward_backward(prefix_attention, dims, causal, device, dtype),
                           "sdpa_no_prefix": _forward_backward(sdpa_no_prefix, dims, causal, device, dtype,
                                                               wrt=("q", "k", "v")),
                           "sdpa_concat": _forward_backward(concat_sdpa_lower_right, dims, causal, device, dtype),
                           "eager": _forward_backward(concat_sdpa, dims, causal, device, dtype),
                           "compile": warmed(_forward_backward(formula, dims, causal, device, dtype))},
                flops=3.5 * fwd_flops,
                bytes=fwd_bytes + 4 * q_bytes + 4 * kv_bytes + 2 * p_bytes,
                compare=("peftops", "sdpa_concat"),
                paths_from="peftops.ops.prefix_attention",
            ))
    return out
