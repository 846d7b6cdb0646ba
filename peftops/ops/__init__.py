"""Autograd Functions, launchers and dispatch: one file per method."""
from .fusion import adapter_fusion
from .lora import lora_linear

__all__ = ["adapter_fusion", "lora_linear"]
