"""Drop-in nn.Modules, one file per method."""
from .adapter import BottleneckAdapter
from .fusion import AdapterFusion
from .lora import LoraLinear
from .qlora import QLoraLinear
from .ia3 import IA3Linear
from .bitfit import bitfit
from .prefix import PrefixEncoder
from .unipelt import GatedBottleneckAdapter, GatedLoraLinear, GatedPrefix, UniPELT, UniPELTConfig, UniPELTLayer

__all__ = ["IA3Linear", "bitfit", "AdapterFusion", "BottleneckAdapter", "LoraLinear", "QLoraLinear", "PrefixEncoder", "GatedLoraLinear", "GatedBottleneckAdapter", "GatedPrefix", "UniPELT", "UniPELTConfig", "UniPELTLayer"]
