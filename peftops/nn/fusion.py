"""``AdapterFusion``: a drop-in for AdapterHub's ``BertFusion`` (``dynamic`` config) running
``peftops.adapter_fusion`` (three d x d GEMMs plus one fused pass over the N adapter outputs,
instead of 2N + 1 GEMMs).

Parameter names follow AdapterHub (``query``, ``key``, ``value`` Linears; ``value`` has no
bias), so a fusion layer's state_dict carries over key for key.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.fusion import adapter_fusion


class AdapterFusion(nn.Module):
    """``out = residual + sum_n softmax_n(query(q) . key(u_n) / T) value(u_n)``.

    ``forward(query, adapter_outputs, residual)``: query and residual ``[..., d]``;
    adapter_outputs ``[..., N, d]`` (AdapterHub's stacked ``key`` / ``value`` input: the N
    adapters' outputs before their residual) or a list of N ``[..., d]`` tensors.

    Initialisation as AdapterHub's ``BertFusion`` with the ``dynamic`` config: query / key
    weights ~ N(0, 0.02), biases 0; value (no bias) = identity with every off-diagonal entry
    1e-6 (``value_initialized=True``; ``False`` keeps N(0, 0.02)).

    ``temperature=True`` is AdapterHub's temperature option: T starts at 50 and, after each
    forward, drops by ``reduction = 50 / 1000 = 0.05`` down to a floor of 1 (``T = max(T -
    0.05, 1)``). AdapterHub decays T on every forward call, evaluation included; here it
    decays only in training mode (``self.training``), so evaluating does not move the
    schedule. ``temperature=False`` (the ``dynamic`` default) keeps T = 1.

    Not supported: AdapterHub's dropout on the attention scores (``attention_probs_dropout_prob``;
    the score-dropout is not in METHODS.md's formula), ``residual_before=True`` and the
    ``static`` config (no value matrix).
    """

    def __init__(self, hidden_size: int, *, temperature: bool = False, value_initialized: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        kw = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size, **kw)
        self.key = nn.Linear(hidden_size, hidden_size, **kw)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.value_initialized = value_initialized
        self.temperature = temperature
        self.T = 50.0 if temperature else 1.0
        self.reduction = self.T / 1000.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for lin in (self.query, self.key, self.value):
                lin.weight.normal_(0.0, 0.02)
                if lin.bias is not None:
                    lin.bias.zero_()
            if self.value_initialized:
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        if self.temperature:
            self.T = 50.0

    def forward(self, query: torch.Tensor, adapter_outputs, residual: torch.Tensor) -> torch.Tensor:
        if isinstance(adapter_outputs, (list, tuple)):
            if not adapter_outputs:
                raise ValueError("adapter_outputs is an empty list: AdapterFusion needs N >= 1 adapters")
            adapter_outputs = torch.stack(list(adapter_outputs), dim=-2)
        out = adapter_fusion(query, adapter_outputs, residual,
                             self.query.weight, self.query.bias, self.key.weight, self.key.bias,
                             self.value.weight, temperature=self.T)
        if self.temperature and self.training:
            self.T = max(self.T - self.reduction, 1.0)
        return out

    def regularization_loss(self) -> torch.Tensor:
        """AdapterHub's fusion regularisation for this layer: ``0.01 * sum((I - W_value)^2)``."""
        w = self.value.weight
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return 0.01 * (eye - w).pow(2).sum()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, temperature={self.temperature}, T={self.T:g}"
