"""peftops: fused Triton kernels for parameter-efficient fine-tuning.

Ops (functional, autograd-aware) and drop-in modules; every op equals the plain-PyTorch
formula in ``peftops.reference``. Dispatch: ``PEFTOPS_BACKEND`` = auto | triton | reference.
Importing peftops imports neither triton nor peft (both load on first use).
"""
from ._dispatch import backend, dispatch_counts, force_path, reset_dispatch_counts

# ops (one per method)
from .ops.lora import lora_linear
from .ops.ia3 import ia3_linear
from .ops.adapter import bottleneck_adapter
from .ops.fusion import adapter_fusion
from .ops.prefix_attention import prefix_attention
from .ops.unipelt import gated_lora_linear
# QLoRA: LoRA over a bitsandbytes 4-bit base, and the shared 4-bit dequantiser
from .ops.qlora import qdora_linear, qlora_linear
from .ops.dequant import Quant4bit, dequantize_4bit, quantize_4bit
from .ops.dora import dora_linear
from .ops.lora_multi import lora_linear_multi  # mixed-adapter batches (peft's adapter_names=)

# modules
from .nn.lora import LoraLinear
from .nn.qlora import QLoraLinear
from .nn.ia3 import IA3Linear
from .nn.adapter import BottleneckAdapter
from .nn.fusion import AdapterFusion
from .nn.prefix import PrefixEncoder
from .nn.unipelt import GatedBottleneckAdapter, GatedLoraLinear, GatedPrefix, UniPELT, UniPELTConfig, UniPELTLayer
from .nn.bitfit import bitfit

# models: HF PEFT acceleration, native injection, checkpoints
from .integrations import (BottleneckConfig, FusionConfig, accelerate, add_adapter, deaccelerate, load_adapter,
                           save_adapter, set_active_adapters, train_adapter)

__version__ = "0.1.0"

__all__ = [
    "backend", "dispatch_counts", "force_path", "reset_dispatch_counts",
    "qlora_linear", "qdora_linear", "Quant4bit", "dequantize_4bit", "quantize_4bit",
    "lora_linear", "ia3_linear", "bottleneck_adapter", "adapter_fusion", "prefix_attention", "gated_lora_linear",
    "dora_linear",
    "LoraLinear", "QLoraLinear", "IA3Linear", "BottleneckAdapter", "AdapterFusion", "PrefixEncoder",
    "GatedLoraLinear", "GatedBottleneckAdapter", "GatedPrefix", "UniPELT", "UniPELTConfig", "UniPELTLayer", "bitfit",
    "accelerate", "deaccelerate", "add_adapter", "set_active_adapters", "train_adapter", "save_adapter",
    "load_adapter", "BottleneckConfig", "FusionConfig",
]
__all__ += ["lora_linear_multi"]
