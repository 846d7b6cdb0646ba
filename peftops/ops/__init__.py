"""Autograd Functions, launchers and dispatch: one file per method."""
from .adapter import bottleneck_adapter
from .fusion import adapter_fusion
from .lora import lora_linear
from .ia3 import ia3_linear
from .prefix_attention import prefix_attention
from .unipelt import gated_lora_linear
from .dora import dora_linear

__all__ = ["ia3_linear", "bottleneck_adapter", "adapter_fusion", "lora_linear", "prefix_attention", "gated_lora_linear", "dora_linear"]
