"""Host-side helpers shared by every op's launchers."""
from __future__ import annotations

import importlib
import os

import torch

from ._dispatch import interpreting


def kernels(name: str):
    """Import ``peftops.kernels.<name>`` on first use (importing triton is deferred so the
    CLI and tests can set ``TRITON_INTERPRET`` first)."""
    return importlib.import_module(f"peftops.kernels.{name}")


def cpu_configs(t: torch.Tensor) -> bool:
    """Whether a launcher should pick its interpreter launch config (few, large programs)
    for a tensor on ``t``'s device. ``PEFTOPS_GPU_CONFIGS=1`` makes CPU runs use the GPU
    configs (``python -m peftops compile-check`` records the kernels that way)."""
    return t.device.type != "cuda" and os.environ.get("PEFTOPS_GPU_CONFIGS", "0") != "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands: IEEE when
    ``torch.get_float32_matmul_precision() == "highest"``, else tf32 (as torch.matmul)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter multiplies the raw bits of bf16 ``tl.dot`` operands
    (triton issue 11584): upcast them to fp32 there; GPUs keep the real bf16 path."""
    return dtype == torch.bfloat16 and interpreting()


def next_pow2(n: int, minimum: int = 16) -> int:
    """Block size for a small dimension: a power of two >= ``minimum`` (GPU ``tl.dot``
    needs every dimension >= 16)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def poison_outputs() -> bool:
    return interpreting() or os.environ.get("PEFTOPS_POISON", "0") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer; filled with NaN under the interpreter / ``PEFTOPS_POISON=1`` so an
    element a kernel forgets to write fails the parity tests instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def new_seed() -> torch.Tensor:
    """A dropout seed drawn from torch's CPU generator (so ``torch.manual_seed`` makes runs
    repeatable), as a 1-element int64 CPU tensor: a tensor, not an int, so compiled graphs
    do not specialise on its value."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def pick(custom_op, impl, x: torch.Tensor):
    """The custom op while torch.compile / export traces (it keeps the launch one opaque graph
    node), else its Python implementation called directly: in eager mode the op's dispatcher
    adds host time and nothing else (autograd lives in the op's autograd.Function), which is
    what small-T calls (decode) pay for. Traced tensors (fake / functional subclasses) always
    take the op."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        return impl
    return custom_op


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., k]`` as a 2-D ``[T, k]`` (a view when the strides allow it)."""
    return x.reshape(-1, x.shape[-1])
