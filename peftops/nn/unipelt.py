"""UniPELT (Mao et al.; AdapterHub ``UniPELTConfig``): gated LoRA on q and v, a gated SeqBn
adapter after the FFN, a gated prefix in attention.

Each submodule has a gate g = sigmoid(z Wg^T + bg) computed from its own input z; with
``gate_mode="sequence"`` (AdapterHub's choice, the default) the sigmoid is averaged over the
sequence (one gate per sample), with ``"token"`` each token has its own gate (the paper's
text); the prefix gate has a key part g_P[0] and a value part g_P[-1] (``prefix_attention``
takes them per sample ``[B, 2]`` or per query row ``[B, T, 2]``). After a forward every gated module keeps its gate in
``last_gate`` (detached).

* ``GatedLoraLinear``: ``y = x W^T + b + g_L (x A^T) B^T`` (no alpha / r when gated), the
  gate logit one more row of A in the LoRA down-projection pass (``gated_lora_linear``).
* ``GatedBottleneckAdapter``: a ``BottleneckAdapter`` whose branch is multiplied by
  g_A = sigmoid(z Wg^T + bg), z the adapter's input, through the fused adapter op's gate.
  (The adapter kernel has no extra output column, so the logit is one GEMV over z.)
* ``GatedPrefix``: a prefix (``PrefixEncoder``, one layer) fed to ``prefix_attention`` with
  the gate [g_P[0], g_P[-1]] from the attention input (per sample, or per query token).
* ``UniPELTConfig`` / ``UniPELTLayer``: the three gated submodules of one transformer layer
  with AdapterHub's defaults (LoRA r = 8, prefix length 10, reduction factor 16).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import reference
from ..ops.prefix_attention import prefix_attention
from ..ops.unipelt import GATE_MODES, gated_lora_linear
from .adapter import BottleneckAdapter
from .prefix import PrefixEncoder

__all__ = ["GatedLoraLinear", "GatedBottleneckAdapter", "GatedPrefix", "UniPELTConfig", "UniPELTLayer"]


def _check_mode(gate_mode):
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    return gate_mode


def _init_gate(lin: nn.Linear) -> None:
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
        if lin.bias is not None:
            lin.bias.zero_()


class GatedLoraLinear(nn.Module):
    """UniPELT's LoRA around a frozen ``nn.Linear``: ``y = base(x) + g (x A^T) B^T``.

    Parameters (AdapterHub names): ``lora_A [r, in]`` (kaiming-uniform), ``lora_B [out, r]``
    (zeros), ``gate = Linear(in, 1)`` (weight N(0, 0.02), bias 0: g starts near 0.5).
    ``scaling`` multiplies the gated branch (UniPELT: 1, no alpha / r).
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, *, gate_mode: str = "sequence", scaling: float = 1.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        self.base_layer = base_layer
        self.gate_mode = _check_mode(gate_mode)
        self.scaling = float(scaling)
        self.r = r
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.gate = nn.Linear(self.in_features, 1, **kw)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        _init_gate(self.gate)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, g = gated_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                 self.gate.weight, self.gate.bias, scaling=self.scaling, gate_mode=self.gate_mode)
        self.last_gate = g
        return y

    def extra_repr(self) -> str:
        return f"r={self.r}, gate_mode={self.gate_mode!r}, scaling={self.scaling}"


class GatedBottleneckAdapter(BottleneckAdapter):
    """A ``BottleneckAdapter`` (default placement "pfeiffer" = SeqBn, reduction 16, relu) whose
    branch is multiplied by g_A = sigmoid(z Wg^T + bg), z the adapter's input (``gate`` =
    Linear(hidden, 1), AdapterHub's name). A gate passed to ``forward`` multiplies g_A."""

    def __init__(self, hidden_size: int, reduction_factor: float | None = None, *, gate_mode: str = "sequence",
                 placement: str = "pfeiffer", **kwargs):
        super().__init__(hidden_size, reduction_factor, placement=placement, **kwargs)
        self.gate_mode = _check_mode(gate_mode)
        w = self.adapter_up.weight
        self.gate = nn.Linear(hidden_size, 1, device=w.device, dtype=w.dtype)
        _init_gate(self.gate)
        self.last_gate: torch.Tensor | None = None

    def adapter(self, z, residual, gate=None, residual2=None):
        g = reference.unipelt_gate(z, self.gate.weight, self.gate.bias, self.gate_mode)  # [..., T or 1, 1]
        self.last_gate = g.detach()
        return super().adapter(z, residual, g if gate is None else g * gate, residual2)


class GatedPrefix(nn.Module):
    """One layer's prefix with UniPELT's gate: ``forward(q, k, v, hidden_states)`` =
    ``prefix_attention(q, k, v, Pk, Pv, prefix_gate=[g_P[0], g_P[-1]])`` with
    g_P = mean_seq sigmoid(hidden_states Wg^T + bg) ``[B, 2]`` ("sequence") or
    sigmoid(hidden_states Wg^T + bg) ``[B, T, 2]`` ("token": query token i's prefix keys
    scaled by g_P[i, 0], values by g_P[i, 1]); ``gate`` = Linear(hidden, 2).
    The prefix is its own ``PrefixEncoder`` (AdapterHub: reparameterised, hidden 512), or the
    ``prefix=(Pk, Pv)`` passed to forward (e.g. one layer of a model-wide encoder)."""

    def __init__(self, hidden_size: int, num_kv_heads: int, head_dim: int, prefix_length: int = 10, *,
                 prefix_projection: bool = True, encoder_hidden_size: int = 512, gate_mode: str = "sequence",
                 device=None, dtype=None):
        super().__init__()
        self.gate_mode = _check_mode(gate_mode)
        self.prefix = PrefixEncoder(1, num_kv_heads, head_dim, prefix_length, prefix_projection=prefix_projection,
                                    encoder_hidden_size=encoder_hidden_size, device=device, dtype=dtype)
        self.gate = nn.Linear(hidden_size, 2, device=device, dtype=dtype)
        _init_gate(self.gate)
        self.last_gate: torch.Tensor | None = None

    def compute_gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` (mean over the sequence) or ``[B, T, 2]`` (per token) of
        sigmoid(hidden_states Wg^T + bg)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, T, hidden], got shape {tuple(hidden_states.shape)}")
        g = reference.unipelt_gate(hidden_states, self.gate.weight, self.gate.bias, self.gate_mode)
        return g[:, 0, :] if self.gate_mode == "sequence" else g

    def forward(self, q, k, v, hidden_states, *, is_causal: bool = False, prefix=None, key_padding_mask=None):
        g = self.compute_gate(hidden_states)  # AdapterHub: a plain mean over the sequence (padding included)
        self.last_gate = g.detach()
        pk, pv = self.prefix()[0] if prefix is None else prefix
        return prefix_attention(q, k, v, pk, pv, prefix_gate=g, is_causal=is_causal, key_padding_mask=key_padding_mask)


@dataclasses.dataclass
class UniPELTConfig:
    """AdapterHub's ``UniPELTConfig`` defaults: LoRA r = 8 on q and v (gated: no alpha / r),
    prefix length 10 (reparameterised, encoder hidden 512), SeqBn adapter after the FFN
    (reduction 16, relu); gates averaged over the sequence."""
    r: int = 8
    prefix_length: int = 10
    prefix_projection: bool = True
    prefix_encoder_hidden_size: int = 512
    reduction_factor: float = 16
    adapter_non_linearity: str = "relu"
    gate_mode: str = "sequence"


class UniPELTLayer(nn.Module):
    """UniPELT's gated submodules for one transformer layer, wrapping its q and v projections.

    ``q_proj`` / ``v_proj``: ``GatedLoraLinear`` (call them instead of the model's);
    ``attention(q, k, v, hidden_states)``: prefix attention with the gated prefix (q, k, v
    ``[B, H, T, D]``, hidden_states the attention input ``[B, T, hidden]``);
    ``adapter(h, x_in, layer_norm)``: the gated SeqBn adapter where the model does
    ``LN(h + x_in)`` after the FFN. ``last_gates()`` returns the gates of the last forward.
    """

    def __init__(self, config: UniPELTConfig, *, q_proj: nn.Linear, v_proj: nn.Linear, hidden_size: int,
                 num_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.q_proj = GatedLoraLinear(q_proj, config.r, gate_mode=config.gate_mode)
        self.v_proj = GatedLoraLinear(v_proj, config.r, gate_mode=config.gate_mode)
        w = q_proj.weight
        self.prefix = GatedPrefix(hidden_size, num_kv_heads, head_dim, config.prefix_length,
                                  prefix_projection=config.prefix_projection,
                                  encoder_hidden_size=config.prefix_encoder_hidden_size, gate_mode=config.gate_mode,
                                  device=w.device, dtype=w.dtype)
        self.adapter = GatedBottleneckAdapter(hidden_size, config.reduction_factor, gate_mode=config.gate_mode,
                                              non_linearity=config.adapter_non_linearity, device=w.device, dtype=w.dtype)

    def attention(self, q, k, v, hidden_states, *, is_causal: bool = False, prefix=None, key_padding_mask=None):
        return self.prefix(q, k, v, hidden_states, is_causal=is_causal, prefix=prefix,
                           key_padding_mask=key_padding_mask)

    def last_gates(self) -> dict[str, torch.Tensor | None]:
        return {"lora_q": self.q_proj.last_gate, "lora_v": self.v_proj.last_gate,
                "prefix": self.prefix.last_gate, "adapter": self.adapter.last_gate}


UniPELT = UniPELTLayer  # the name the issue uses
__all__.append("UniPELT")
