"""Prefix attention benchmark cases: ``peftops.prefix_attention`` (prefix read once per tile,
never concatenated) vs ``eager`` = concatenate the prefix per sample, then
``torch.nn.functional.scaled_dot_product_attention`` (grouped-query via ``enable_gqa``, the
prefix-aware causal mask as an explicit boolean mask: SDPA's own ``is_causal`` aligns the
diagonal top-left, which would hide the prefix from early queries).

Shapes: decoder-style causal attention, Hq = 32, Hkv = 8, D = 128, B in {1, 8},
T in {512, 4096}, prefix length L in {10, 64}; forward (no autograd) and forward + backward
(gradients of q, k, v, prefix_k, prefix_v). ``small``: B in {1, 2}, T = 33, Hq = 4, Hkv = 2,
D = 16, L in {10, 13} for the CPU parity pass.

FLOPs (useful, causal): forward 4 B Hq D (T L + T (T + 1) / 2) (QK^T and PV over the visible
keys); backward 2.5x that (five matmuls instead of two), so forward + backward = 3.5x.
Bytes (floor): forward reads q, k, v and the prefix once and writes o; the backward adds
reading q, k, v, o, dO and writing dq, dk, dv and the prefix gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.prefix_attention import prefix_attention
from .core import Case


def concat_sdpa(q, k, v, prefix_k, prefix_v, *, prefix_gate=None, is_causal=False):
    """The eager baseline: per-sample concatenation + SDPA with a prefix-aware mask."""
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], prefix_k.shape[-2]
    pk = prefix_k.expand(B, Hkv, L, D)
    pv = prefix_v.expand(B, Hkv, L, D)
    if prefix_gate is not None:
        pk = pk * prefix_gate[:, 0].view(B, 1, 1, 1).to(pk.dtype)
        pv = pv * prefix_gate[:, -1].view(B, 1, 1, 1).to(pv.dtype)
    keys = torch.cat([pk, k], dim=2)
    values = torch.cat([pv, v], dim=2)
    mask = None
    if is_causal:
        mask = torch.ones(T, L + T, dtype=torch.bool, device=q.device).tril(L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=Hq != Hkv)


def _inputs(B, Hq, Hkv, T, L, D, device, dtype, requires_grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return dict(q=r(B, Hq, T, D), k=r(B, Hkv, T, D), v=r(B, Hkv, T, D), prefix_k=r(Hkv, L, D), prefix_v=r(Hkv, L, D))


def _forward(fn, dims, device, dtype):
    def build():
        args = _inputs(*dims, device, dtype, False)

        def run():
            with torch.no_grad():
                return fn(**args, is_causal=True)
        return run
    return build


def _forward_backward(fn, dims, device, dtype):
    def build():
        args = _inputs(*dims, device, dtype, True)
        B, Hq, _, T, _, D = dims
        dout = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        wrt = list(args.values())

        def run():
            out = fn(**args, is_causal=True)
            return torch.autograd.grad(out, wrt, dout)
        return run
    return build


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    if small:
        Hq, Hkv, D, grid = 4, 2, 16, [(B, 33, L) for B in (1, 2) for L in (10, 13)]
    else:
        Hq, Hkv, D, grid = 32, 8, 128, [(B, T, L) for B in (1, 8) for T in (512, 4096) for L in (10, 64)]
    elt = torch.empty((), dtype=dtype).element_size()
    out = []
    for B, T, L in grid:
        dims = (B, Hq, Hkv, T, L, D)
        shape = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "L": L, "D": D, "causal": True}
        fwd_flops = 4.0 * B * Hq * D * (T * L + T * (T + 1) / 2)
        q_bytes, kv_bytes, p_bytes = B * Hq * T * D * elt, B * Hkv * T * D * elt, Hkv * L * D * elt
        fwd_bytes = 2 * q_bytes + 2 * kv_bytes + 2 * p_bytes
        out.append(Case(
            op="prefix_attention_fwd", shape=shape, dtype=dtype,
            providers={"peftops": _forward(prefix_attention, dims, device, dtype),
                       "eager": _forward(concat_sdpa, dims, device, dtype)},
            flops=fwd_flops, bytes=fwd_bytes,
        ))
        out.append(Case(
            op="prefix_attention_fwd_bwd", shape=shape, dtype=dtype,
            providers={"peftops": _forward_backward(prefix_attention, dims, device, dtype),
                       "eager": _forward_backward(concat_sdpa, dims, device, dtype)},
            flops=3.5 * fwd_flops,
            bytes=fwd_bytes + 4 * q_bytes + 4 * kv_bytes + 2 * p_bytes,
        ))
    return out
