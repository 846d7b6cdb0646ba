"""Prefix tuning: the per-layer prefix table (``PrefixEncoder``) and an attention helper.

Layout (PEFT's ``PrefixEncoder``, so its checkpoints carry over): one table
``[L, num_layers * 2 * num_kv_heads * head_dim]``; column
``((layer * 2 + kv) * num_kv_heads + head) * head_dim + d`` with kv = 0 for keys and 1 for
values (PEFT views it as ``[L, layers * 2, heads, head_dim]`` and splits by 2 along the
layer axis). Flat: ``embedding.weight`` is the table. Reparameterised
(``prefix_projection=True``): table = ``transform(embedding.weight)`` with
``embedding = Embedding(L, heads * head_dim)`` and
``transform = Linear(heads * head_dim, hidden) -> Tanh -> Linear(hidden, table width)``
(PEFT's parameter names). ``merge_reparameterization()`` replaces the MLP by the table it
computes, for inference or further training of the flat table.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PrefixEncoder"]


class PrefixEncoder(nn.Module):
    """Learnable prefix keys / values for ``num_layers`` attention layers.

    ``forward()`` returns a list with one ``(prefix_k, prefix_v)`` per layer, each
    ``[num_kv_heads, L, head_dim]`` (views of the table, shared by the whole batch: pass
    them straight to ``peftops.prefix_attention``).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int = 10, *,
                 prefix_projection: bool = False, encoder_hidden_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("num_virtual_tokens", num_virtual_tokens)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.prefix_projection = bool(prefix_projection)
        token_dim = num_kv_heads * head_dim
        width = num_layers * 2 * token_dim
        kw = dict(device=device, dtype=dtype)
        if self.prefix_projection:
            hidden = token_dim if encoder_hidden_size is None else encoder_hidden_size
            if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
                raise ValueError(f"encoder_hidden_size must be a positive int, got {encoder_hidden_size!r}")
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, width, **kw))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **kw)
            self.transform = None

    @property
    def table_width(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def table(self) -> torch.Tensor:
        """The flat prefix table ``[L, num_layers * 2 * num_kv_heads * head_dim]``."""
        if self.transform is not None:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        L, H, D = self.num_virtual_tokens, self.num_kv_heads, self.head_dim
        kv = self.table().view(L, self.num_layers * 2, H, D).permute(1, 2, 0, 3)  # [layers*2, H, L, D]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix_k, prefix_v)`` of layer ``i`` (computes the whole table when reparameterised)."""
        return self.forward()[i]

    @torch.no_grad()
    def merge_reparameterization(self) -> None:
        """Replace ``Embedding -> Linear -> tanh -> Linear`` by the flat table it computes (in the
        module's dtype); a no-op for a flat encoder."""
        if self.transform is None:
            return
        w = self.embedding.weight
        table = self.transform(w)
        flat = nn.Embedding(self.num_virtual_tokens, self.table_width, device=w.device, dtype=w.dtype)
        flat.weight.copy_(table.to(w.dtype))
        self.embedding = flat
        self.transform = None
        self.prefix_projection = False

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, prefix_projection={self.prefix_projection}")
