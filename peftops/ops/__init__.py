"""Autograd Functions, launchers and dispatch: one file per method."""
from .fusion import adapter_fusion
from .lora import lora_linear
from .prefix_attention import prefix_attention

__all__ = ["adapter_fusion", "lora_linear", "prefix_attention"]
