"""Drop-in nn.Modules, one file per method."""
from .adapter import BottleneckAdapter
from .lora import LoraLinear

__all__ = ["BottleneckAdapter", "LoraLinear"]
