"""Drop-in nn.Modules, one file per method."""
from .adapter import BottleneckAdapter
from .fusion import AdapterFusion
from .lora import LoraLinear

__all__ = ["AdapterFusion", "BottleneckAdapter", "LoraLinear"]
