"""The oracle: every method's formula in plain PyTorch, written as the math in
``shared/METHODS.md``. Kernels are tested against these functions (run in float64), and
the ``reference`` backend runs them as they are.

Each method has one section; adding a method adds a section and touches no other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- LoRA
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    gate: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + gate * scaling * (drop(x) A^T) B^T``.

    ``dropout_mask`` (0/1, shaped like x) fixes the dropout draw (tests pass the fused
    kernel's mask); without it, ``dropout_p > 0`` draws one with ``F.dropout``.
    """
    y = F.linear(x, weight, bias)
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        xd = F.dropout(x, dropout_p, training=True)
    else:
        xd = x
    # Adapters in another dtype than x (fp32 adapters over a half base, peft's default):
    # the branch runs in the adapters' dtype, as peft's layer does, and returns in y's.
    low = F.linear(F.linear(xd.to(lora_A.dtype), lora_A), lora_B) * scaling
    if gate is not None:
        low = low * gate
    return y + low.to(y.dtype)


def lora_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B A``, computed in fp32, returned in W's dtype."""
    delta = (lora_B.float() @ lora_A.float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


# --------------------------------------------------------------------------- Mixed-adapter LoRA
def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_index) -> torch.Tensor:
    """Row t of ``x [..., in]`` uses adapter a = adapter_index[t] of the stacks lora_A
    ``[n, r, in]`` / lora_B ``[n, out, r]`` with scaling ``scalings[a]``:
    ``y_t = x_t W^T + b + s_a (x_t A_a^T) B_a^T``; a outside [0, n) (-1): ``y_t = x_t W^T + b``.
    ``adapter_index`` holds one id per token (``x.shape[:-1]``) or per sequence
    (``[x.shape[0]]``). A plain loop over the rows."""
    y = F.linear(x, weight, bias)
    lead, out_f = y.shape[:-1], y.shape[-1]
    idx = torch.as_tensor(adapter_index, device="cpu").long()
    if tuple(idx.shape) != tuple(lead):
        idx = idx[:, None].expand(lead[0], max(1, y[..., 0].numel() // max(lead[0], 1)))
    idx = idx.reshape(-1).tolist()
    scale = [float(s) for s in (scalings.tolist() if isinstance(scalings, torch.Tensor) else scalings)]
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, out_f)
    out = []
    for t, a in enumerate(idx):
        row = y2[t]
        if 0 <= a < lora_A.shape[0]:
            low = (x2[t].to(lora_A.dtype) @ lora_A[a].t()) @ lora_B[a].t() * scale[a]
            row = row + low.to(y.dtype)
        out.append(row)
    return (torch.stack(out) if out else y2).reshape(*lead, out_f)


# --------------------------------------------------------------------------- AdapterFusion
def adapter_fusion(
    query: torch.Tensor,
    adapter_outputs: torch.Tensor,
    residual: torch.Tensor,
    query_weight: torch.Tensor,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``residual + sum_n a_n (u_n Wv^T)``, ``a = softmax_n((q Wq^T + bq) . (u_n Wk^T + bk) / tau)``.

    query / residual ``[..., d]``; adapter_outputs ``[..., N, d]`` (u_n, before the
    residual); weights ``[d, d]`` (nn.Linear layout); Wv has no bias. Written as METHODS.md
    states it: N separate key and value projections, softmax over the N adapters per token.
    """
    q = F.linear(query, query_weight, query_bias)
    n_adapters = adapter_outputs.shape[-2]
    scores, values = [], []
    for n in range(n_adapters):
        u = adapter_outputs[..., n, :]
        k = F.linear(u, key_weight, key_bias)
        scores.append((q * k).sum(-1))
        values.append(F.linear(u, value_weight))
    a = torch.softmax(torch.stack(scores, dim=-1) / temperature, dim=-1)
    out = residual
    for n in range(n_adapters):
        out = out + a[..., n, None] * values[n]
    return out


# --------------------------------------------------------------------------- bottleneck adapter
def adapter_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """The adapter non-linearities (transformers' ACT2FN names): relu, gelu (erf form),
    gelu_new / gelu_pytorch_tanh (tanh approximation), silu / swish."""
    name = name.lower()
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(z, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu(z)
    raise ValueError(f"unknown adapter activation {name!r}")


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
) -> torch.Tensor:
    """``residual + gate * scaling * f(h)`` with ``f(h) = act(h Wd^T + bd) Wu^T + bu``."""
    f = F.linear(adapter_activation(F.linear(h, down_weight, down_bias), activation), up_weight, up_bias)
    f = f * scaling
    if gate is not None:
        f = f * gate
    return residual + f


# --------------------------------------------------------------------------- IA3
def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    *,
    feedforward: bool,
) -> torch.Tensor:
    """(IA)^3, as HF PEFT's IA3 Linear computes it (l may be float32 under half x):
    ``feedforward=False``: ``y = l * (x W^T + b)``, l ``[out]`` / ``[out, 1]``;
    ``feedforward=True``: ``y = (x * l) W^T + b``, l ``[in]`` / ``[1, in]``."""
    l = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x * l).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias) * l).to(x.dtype)


def ia3_merge(weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor, *, feedforward: bool):
    """Merged (weight, bias): ``W * l`` per column (input scaling) or per row (output scaling,
    which scales the bias too)."""
    l = ia3_l.reshape(-1)
    if feedforward:
        return (weight * l[None, :]).to(weight.dtype), bias
    new_bias = None if bias is None else (bias * l).to(bias.dtype)
    return (weight * l[:, None]).to(weight.dtype), new_bias


# --------------------------------------------------------------------------- prefix attention
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
    """``softmax([q (gk Pk)^T ; q k^T] * scale) [gv Pv ; v]`` by concatenation.

    q ``[B, Hq, T, D]``; k, v ``[B, Hkv, T, D]`` (q head h reads kv head h // (Hq / Hkv));
    prefix_k / prefix_v ``[Hkv, L, D]`` (shared) or ``[B, Hkv, L, D]``; prefix_gate None,
    ``[B, 2]`` or ``[B, 1]``: gk = gate[:, 0], gv = gate[:, -1] (UniPELT's g_P[0], g_P[-1]),
    or per query row ``[B, T, 2]`` / ``[B, T, 1]`` (row i: scores q_i (gk_i Pk)^T, values gv_i Pv).
    Causal masking inside the sequence only: query i sees the whole prefix and keys 0..i.
    key_padding_mask ``[B, T]`` (nonzero = attend) hides padded sequence keys; the mask over
    the concatenated keys gets L ones in front (the prefix is always visible).
    """
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], prefix_k.shape[-2]
    scale = 1.0 / D ** 0.5 if scale is None else scale
    pk = prefix_k.expand(B, Hkv, L, D)
    pv = prefix_v.expand(B, Hkv, L, D)
    keys = torch.cat([pk, k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale
    gv = None
    if prefix_gate is not None:  # [B, 2 | 1] per sample or [B, T, 2 | 1] per query row
        g = prefix_gate.to(q.dtype)
        g = g[:, None, :] if g.dim() == 2 else g                       # [B, T or 1, 2 | 1]
        gk, gv = g[..., 0][:, None, :, None], g[..., -1][:, None, :, None]  # [B, 1, T or 1, 1]
        scores = torch.cat([scores[..., :L] * gk, scores[..., L:]], -1)  # q (gk Pk)^T
    if is_causal:
        col = torch.arange(L + T, device=q.device)
        row = torch.arange(T, device=q.device)
        visible = (col[None, :] < L) | (col[None, :] - L <= row[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
    if key_padding_mask is not None:
        keep = torch.cat([torch.ones(B, L, dtype=torch.bool, device=q.device), key_padding_mask != 0], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.softmax(scores.float() if q.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1).to(q.dtype)
    if gv is None:
        return p @ values
    return (p[..., :L] @ values[:, :, :L]) * gv + p[..., L:] @ values[:, :, L:]  # [gv Pv ; V]


# --------------------------------------------------------------------------- UniPELT
def unipelt_gate(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, gate_mode: str = "sequence") -> torch.Tensor:
    """``g = sigmoid(x Wg^T + bg)``: per token ``[..., T, k]`` ("token") or AdapterHub's mean of
    the sigmoid over the sequence axis -2, per sample ``[..., 1, k]`` ("sequence")."""
    g = torch.sigmoid(F.linear(x, gate_weight, gate_bias))
    if gate_mode == "sequence" and x.dim() >= 2:
        g = g.mean(-2, keepdim=True)
    return g


def gated_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    *,
    scaling: float = 1.0,
    gate_mode: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPELT's LoRA: ``y = x W^T + b + g * scaling * (x A^T) B^T`` with ``g = unipelt_gate(x)``
    (no alpha / r when gated: scaling 1). Returns ``(y, g.detach())``."""
    g = unipelt_gate(x, gate_weight, gate_bias, gate_mode)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, gate=g), g.detach()


# --------------------------------------------------------------------------- QLoRA (4-bit base)
def dequantize_4bit(q, dtype: torch.dtype) -> torch.Tensor:
    """W ``[out, in]`` from bitsandbytes' 4-bit storage (``peftops.ops.dequant.Quant4bit``):
    element e is nibble e of the packed bytes (high nibble first), ``W[e] = code[nibble] *
    absmax[e // blocksize]`` in fp32, rounded once to ``dtype``; with double quantisation
    ``absmax[b] = code2[qabs[b]] * absmax2[b // nested_blocksize] + offset`` (two fp32 roundings)."""
    from .ops.dequant import code_4bit

    n = q.shape[0] * q.shape[1]
    b = q.packed.reshape(-1)
    nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n].long()
    absmax = q.absmax
    if q.nested:
        absmax = q.code2[q.absmax.long()] * q.absmax2.repeat_interleave(q.nested_blocksize)[:q.absmax.numel()]
        absmax = absmax + q.offset
    w = code_4bit(q.quant_type, b.device)[nib] * absmax.float().repeat_interleave(q.blocksize)[:n]
    return w.to(dtype).view(q.shape)


def qlora_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, *, dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA over a 4-bit base: ``lora_linear`` with ``W = dequantize_4bit(weight, x.dtype)``
    (bitsandbytes' forward: dequantise into x's dtype, then the matmul)."""
    return lora_linear(x, dequantize_4bit(weight, x.dtype), bias, lora_A, lora_B, scaling, dropout_p=dropout_p,
                       dropout_mask=dropout_mask)

# --------------------------------------------------------------------------- DoRA
def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``n_i = ||W_i + scaling (B A)_i||`` over the input dim, ``[out]``, detached; in fp32 (float64
    for float64 inputs). The direct form: it builds the ``[out, in]`` sum, as peft does."""
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return torch.linalg.norm(weight.to(dt) + scaling * (lora_B.to(dt) @ lora_A.to(dt)), dim=1)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (m / n) * (x W^T + s (x A^T) B^T) + b``, n = ||W + s B A||_row detached.

    With dropout (``dropout_p > 0``; ``dropout_mask`` 0/1 like x fixes the draw) the base
    part of the direction runs on drop(x), as peft's DoRA layer does in training:
    ``y = x W^T + b + (m/n - 1) (drop(x) W^T) + (m/n) s (drop(x) A^T) B^T``.
    ``weight_norm`` (``[out]``) replaces the direct norm (a caller that has it already).
    """
    n = dora_weight_norm(weight, lora_A, lora_B, scaling) if weight_norm is None else weight_norm.detach()
    c = magnitude / n.to(magnitude.dtype) if magnitude.dtype == torch.float64 else magnitude.float() / n.float()
    ad = lora_A.dtype
    if dropout_mask is not None:
        xd = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        xd = F.dropout(x, dropout_p, training=True)
    else:
        xd = None
    if xd is None:
        u = F.linear(x, weight).to(c.dtype) + (F.linear(F.linear(x.to(ad), lora_A), lora_B) * scaling).to(c.dtype)
        y = c * u
        return (y if bias is None else y + bias.to(c.dtype)).to(x.dtype)
    base = F.linear(x, weight, bias)
    low = F.linear(F.linear(xd.to(ad), lora_A), lora_B) * scaling
    y = base.to(c.dtype) + (c - 1) * F.linear(xd, weight).to(c.dtype) + c * low.to(c.dtype)
    return y.to(x.dtype)


def qdora_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, *, dropout_p: float = 0.0,
                 dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA over a 4-bit base (QDoRA): ``dora_linear`` with ``W = dequantize_4bit(weight, x.dtype)``."""
    return dora_linear(x, dequantize_4bit(weight, x.dtype), bias, lora_A, lora_B, magnitude, scaling,
                       dropout_p=dropout_p, dropout_mask=dropout_mask)
