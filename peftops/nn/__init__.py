"""Drop-in nn.Modules, one file per method."""
from .lora import LoraLinear

__all__ = ["LoraLinear"]
