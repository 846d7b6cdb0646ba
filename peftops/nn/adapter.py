"""Drop-in bottleneck adapter module (AdapterHub names and placements).

    f(z) = act(z Wd^T + bd) Wu^T + bu          adapter_down = Sequential(Linear(d, m), act)
                                               adapter_up   = Linear(m, d)
Placements (METHODS.md), with h the sublayer output, x_in the sublayer input (residual
stream), LN the model's own LayerNorm, s the scaling:

    "pfeiffer" / "seq_bn"        y = LN(h + s*f(LN(h + x_in)) + x_in)     reduction 16, relu, s=1
    "houlsby"  / "double_seq_bn" y = LN(h + s*f(h) + x_in)                reduction 16, swish, s=1
    "parallel" / "par_bn"        y = LN(h + s*f(x_in) + x_in)             reduction 2,  relu, s=4

Call it where the model does ``LN(h + x_in)``: ``y = adapter(h, x_in, layer_norm)``
(``layer_norm=None`` leaves the LN out). Houlsby puts one adapter after attention and one
after the FFN: use one module per location. The fused op
(``peftops.bottleneck_adapter``) computes ``residual + gate * s * f(z)`` in one pass with
residual = h + x_in and z = LN(h + x_in) / h / x_in by placement (for houlsby and parallel,
h and x_in are both added inside the kernel, so their sum is never written to memory); the
model's LayerNorm runs as it is.

Gating (UniPELT): ``forward(..., gate=g)`` multiplies the adapter branch by g, any tensor
broadcastable to ``y[..., :1]`` (per token ``[..., 1]`` or per sample ``[B, 1, 1]``),
differentiable. A ``gated=True`` option computing g = sigmoid(z Wg^T + bg) from the
adapter's input (one more output column of the down projection) is meant to build on this
argument.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import reference
from ..ops.adapter import ACTIVATIONS, bottleneck_adapter

__all__ = ["BottleneckAdapter", "PLACEMENTS"]

# placement -> (reduction_factor, non_linearity, scaling): AdapterHub's SeqBn / DoubleSeqBn / ParBn defaults.
PLACEMENTS = {
    "pfeiffer": (16, "relu", 1.0),
    "houlsby": (16, "swish", 1.0),
    "parallel": (2, "relu", 4.0),
}
_ALIASES = {"seq_bn": "pfeiffer", "double_seq_bn": "houlsby", "par_bn": "parallel"}
INITS = ("bert", "mam_adapter", "houlsby")


class _Activation(nn.Module):
    """The adapter's non-linearity as a parameter-free module (so ``adapter_down`` is a
    ``Sequential(Linear, act)`` and the state-dict names are AdapterHub's)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.adapter_activation(x, self.name)

    def extra_repr(self) -> str:
        return self.name


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter at one location of a transformer layer.

    Args:
        hidden_size: d.
        reduction_factor: m = max(1, d // reduction_factor); default by placement.
        placement: "pfeiffer" (seq_bn), "houlsby" (double_seq_bn) or "parallel" (par_bn).
        non_linearity: relu, gelu, gelu_new, silu / swish; default by placement.
        scaling: s (a float), or "learned" (AdapterHub: a trainable scalar parameter
            ``scaling`` initialised to 1, fed to the kernel as a gate); default by placement.
        init_weights: "bert" (weights N(0, 0.02), biases 0), "mam_adapter" (down
            kaiming-uniform, up and biases 0: exactly the identity adapter) or "houlsby"
            (near identity: weights truncated N(0, 1e-2) within +-2e-2, biases 0).
    """

    def __init__(self, hidden_size: int, reduction_factor: float | None = None, *, placement: str = "pfeiffer",
                 non_linearity: str | None = None, scaling: float | None = None, init_weights: str = "bert",
                 device=None, dtype=None):
        super().__init__()
        key = _ALIASES.get(str(placement).lower(), str(placement).lower())
        if key not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS) + sorted(_ALIASES)}, got {placement!r}")
        red, act, s = PLACEMENTS[key]
        reduction_factor = red if reduction_factor is None else reduction_factor
        non_linearity = act if non_linearity is None else non_linearity
        scaling = s if scaling is None else scaling
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(reduction_factor, (int, float)) or not reduction_factor > 0:
            raise ValueError(f"reduction_factor must be > 0, got {reduction_factor!r}")
        if not isinstance(non_linearity, str) or non_linearity.lower() not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        if init_weights not in INITS:
            raise ValueError(f"init_weights must be one of {INITS}, got {init_weights!r}")
        learned = isinstance(scaling, str) and scaling == "learned"
        if not learned and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
                            or not math.isfinite(scaling)):
            raise ValueError(f"scaling must be a finite float or 'learned', got {scaling!r}")
        self.placement = key
        self.hidden_size = hidden_size
        self.bottleneck_size = max(1, int(hidden_size // reduction_factor))
        self.non_linearity = non_linearity.lower()
        self.init_weights = init_weights
        kw = dict(device=device, dtype=dtype)
        if learned:
            self.scaling = nn.Parameter(torch.ones(1, **kw))
        else:
            self.scaling = float(scaling)
        self.adapter_down = nn.Sequential(nn.Linear(hidden_size, self.bottleneck_size, **kw),
                                          _Activation(self.non_linearity))
        self.adapter_up = nn.Linear(self.bottleneck_size, hidden_size, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        down, up = self.adapter_down[0], self.adapter_up
        if self.init_weights == "bert":
            for lin in (down, up):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()
        elif self.init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            up.weight.zero_()
            down.bias.zero_()
            up.bias.zero_()
        else:  # houlsby: near identity
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                lin.bias.zero_()

    def adapter(self, z: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None = None,
                residual2: torch.Tensor | None = None) -> torch.Tensor:
        """``residual (+ residual2) + gate * s * f(z)`` (the fused op, no LayerNorm)."""
        down, up = self.adapter_down[0], self.adapter_up
        scaling = self.scaling
        if isinstance(scaling, torch.Tensor):  # learned: a [1] parameter, differentiable through the gate input
            gate = scaling if gate is None else gate * scaling
            scaling = 1.0
        return bottleneck_adapter(z, down.weight, down.bias, up.weight, up.bias, residual=residual,
                                  activation=self.non_linearity, scaling=scaling, gate=gate,
                                  residual2=residual2)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, layer_norm: nn.Module | None = None,
                *, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_states`` = h (sublayer output), ``input_tensor`` = x_in (sublayer input),
        ``layer_norm`` the model's LayerNorm (or None). Returns y as in the class docstring."""
        ln = layer_norm if layer_norm is not None else (lambda x: x)
        if self.placement == "pfeiffer":      # LN(h + x_in) needs the sum anyway: reuse it as the residual
            residual = hidden_states + input_tensor
            return ln(self.adapter(ln(residual), residual, gate))
        z = hidden_states if self.placement == "houlsby" else input_tensor
        # h and x_in both enter the kernel's residual add: h + x_in is never materialised.
        return ln(self.adapter(z, hidden_states, gate, residual2=input_tensor))

    def extra_repr(self) -> str:
        return (f"placement={self.placement!r}, hidden_size={self.hidden_size}, bottleneck={self.bottleneck_size}, "
                f"scaling={self.scaling}, init={self.init_weights!r}")
