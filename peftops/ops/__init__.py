"""Autograd Functions, launchers and dispatch: one file per method."""
from .lora import lora_linear

__all__ = ["lora_linear"]
