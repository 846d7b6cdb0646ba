"""peftops: fused Triton kernels for parameter-efficient fine-tuning.

Ops (functional, autograd-aware) and drop-in modules; every op equals the plain-PyTorch
formula in ``peftops.reference``. Dispatch: ``PEFTOPS_BACKEND`` = auto | triton | reference.
"""
from ._dispatch import backend, dispatch_counts, reset_dispatch_counts
from .nn.adapter import BottleneckAdapter
from .ops.adapter import bottleneck_adapter
from .nn.lora import LoraLinear
from .nn.fusion import AdapterFusion
from .ops.fusion import adapter_fusion
from .ops.lora import lora_linear
from .ops.ia3 import ia3_linear
from .nn.ia3 import IA3Linear
from .nn.bitfit import bitfit
from .ops.prefix_attention import prefix_attention
from .nn.prefix import PrefixEncoder
from .integrations import accelerate, deaccelerate  # lazy: peft is imported on first call
from .integrations import BottleneckConfig, FusionConfig, add_adapter, load_adapter, save_adapter, set_active_adapters, train_adapter
from .ops.unipelt import gated_lora_linear
from .nn.unipelt import GatedBottleneckAdapter, GatedLoraLinear, GatedPrefix, UniPELT, UniPELTConfig, UniPELTLayer

__version__ = "0.1.0"

__all__ = [
    "accelerate",
    "add_adapter",
    "set_active_adapters",
    "train_adapter",
    "save_adapter",
    "load_adapter",
    "BottleneckConfig",
    "FusionConfig",
    "deaccelerate",
    "ia3_linear",
    "IA3Linear",
    "bitfit",
    "bottleneck_adapter",
    "BottleneckAdapter",
    "backend",
    "dispatch_counts",
    "reset_dispatch_counts",
    "lora_linear",
    "adapter_fusion",
    "AdapterFusion",
    "LoraLinear",
    "prefix_attention",
    "PrefixEncoder",
    "gated_lora_linear",
    "GatedLoraLinear",
    "GatedBottleneckAdapter",
    "GatedPrefix",
    "UniPELT",
    "UniPELTConfig",
    "UniPELTLayer",
]
