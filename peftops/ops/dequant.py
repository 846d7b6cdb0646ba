"""4-bit weights in bitsandbytes' storage: ``Quant4bit``, our quantiser, the dequantiser.

``Quant4bit`` holds bitsandbytes' tensors as they are (no copy, no repacking), read by the
Triton dequantiser in kernels/dequant.py (format written out there). It is built from a
bitsandbytes ``Params4bit`` / ``QuantState`` by ``Quant4bit.from_bnb`` (duck-typed: importing
peftops never imports bitsandbytes) or made by ``quantize_4bit`` here, which writes the same
format in plain PyTorch (benches and tests on machines without bitsandbytes; the tests
prove it equal to bitsandbytes' own quantiser where bitsandbytes is installed).

``dequantize_4bit(q, dtype)``: W ``[out, in]`` in ``dtype``, bit-identical to
``bitsandbytes.functional.dequantize_4bit`` (for ``dtype`` = the state's dtype; for another
compute dtype, to bitsandbytes' forward, which dequantises straight into x's dtype).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import reference
from .._dispatch import _bump, interpreting, record_launch, use_triton
from .._launch import cpu_configs, kernels, poison_outputs

__all__ = ["Quant4bit", "quantize_4bit", "dequantize_4bit", "BLOCKSIZES", "QUANT_TYPES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bitsandbytes' quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# bitsandbytes' 4-bit code books (functional.get_4bit_type), before normalising by max |.|.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data.div_(data.abs().max())


_CODES: dict = {}


def code_4bit(quant_type: str, device) -> torch.Tensor:
    """The 16 fp32 values of ``quant_type``'s nibbles (bitsandbytes' ``get_4bit_type``), cached per device."""
    key = (quant_type, str(device))
    if key not in _CODES:
        _CODES[key] = _code_cpu(quant_type).to(device)
    return _CODES[key]


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), the nested absmax's code."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class Quant4bit:
    """A frozen ``[out, in]`` weight in bitsandbytes' 4-bit storage (kernels/dequant.py).

    packed uint8, ``ceil(out * in / 2)`` elements (any shape: bitsandbytes keeps ``[n, 1]``);
    absmax fp32 ``[ceil(out * in / blocksize)]``, or with double quantisation uint8 indices
    into ``code2`` (fp32 ``[256]``) scaled by ``absmax2`` (fp32, per ``nested_blocksize``
    blocks) plus ``offset`` (fp32, 1 element); dtype: what bitsandbytes' dequantise writes.
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    dtype: torch.dtype = torch.float32
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple:
        return (self.packed, self.absmax, self.absmax2, self.code2, self.offset)

    def meta(self) -> tuple:
        return (self.shape, self.blocksize, self.quant_type, self.dtype, self.nested_blocksize)

    @classmethod
    def rebuild(cls, tensors, meta) -> "Quant4bit":
        shape, blocksize, quant_type, dtype, nbs = meta
        packed, absmax, absmax2, code2, offset = tensors
        return cls(packed, absmax, shape, blocksize, quant_type, dtype, absmax2, code2, offset, nbs)

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state=None) -> "Quant4bit":
        """From a bitsandbytes ``Params4bit`` (its ``quant_state``) or packed tensor + ``QuantState``."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError(f"weight (shape {tuple(weight.shape)}, {weight.dtype}) has no quant_state: "
                             "not a bitsandbytes 4-bit weight")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("quant_state uses bitsandbytes' AVX512 CPU packing (packing_format_for_cpu), "
                             "not the 4-bit storage format the kernels read")
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if packed.dtype != torch.uint8:  # bnb's quant_storage option: the same bytes in another dtype
            if not packed.is_contiguous():
                raise ValueError(f"packed weight stored as {packed.dtype} must be contiguous, strides {packed.stride()}")
            packed = packed.view(torch.uint8)
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"quant_state.shape must be 2-D [out, in], got {qs.shape}")
        shape = (int(qs.shape[0]), int(qs.shape[1]))
        nested = getattr(qs, "nested", False) and qs.state2 is not None
        kw = {}
        if nested:
            off = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
            kw = dict(absmax2=qs.state2.absmax, code2=qs.state2.code,
                      offset=off.to(device=qs.absmax.device, dtype=torch.float32).reshape(1),
                      nested_blocksize=int(qs.state2.blocksize))
        q = cls(packed, qs.absmax, shape, int(qs.blocksize), str(qs.quant_type), qs.dtype, **kw)
        check(q)
        return q


def check(q: Quant4bit, name: str = "weight") -> None:
    """``q``'s tensors must describe one ``q.shape`` weight: ValueError / TypeError naming
    what does not match, with the shapes."""
    if not isinstance(q, Quant4bit):
        raise TypeError(f"{name} must be a peftops Quant4bit (Quant4bit.from_bnb(...)), got {type(q).__name__}")
    if q.quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}.quant_type {q.quant_type!r} is not supported (supported: {QUANT_TYPES})")
    if q.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}.blocksize {q.blocksize} is not supported (supported: {BLOCKSIZES})")
    if len(q.shape) != 2 or min(q.shape) < 1:
        raise ValueError(f"{name}.shape must be [out, in] with both >= 1, got {q.shape}")
    n = q.numel
    if q.packed.dtype != torch.uint8:
        raise TypeError(f"{name}.packed must be uint8, got {q.packed.dtype}")
    if q.packed.numel() != (n + 1) // 2 or not q.packed.is_contiguous():
        raise ValueError(f"{name}.packed has shape {tuple(q.packed.shape)} (contiguous: {q.packed.is_contiguous()}) "
                         f"but a {q.shape} weight needs {(n + 1) // 2} contiguous bytes")
    blocks = -(-n // q.blocksize)
    if q.absmax.dim() != 1 or q.absmax.numel() != blocks:
        raise ValueError(f"{name}.absmax has shape {tuple(q.absmax.shape)} but a {q.shape} weight in blocks of "
                         f"{q.blocksize} needs [{blocks}]")
    if q.nested:
        if q.absmax.dtype != torch.uint8:
            raise TypeError(f"{name}.absmax must be uint8 with double quantisation, got {q.absmax.dtype}")
        nb = q.nested_blocksize
        if nb < 1 or nb & (nb - 1):
            raise ValueError(f"{name}.nested_blocksize must be a power of two, got {nb}")
        for part, t, want in (("absmax2", q.absmax2, [-(-blocks // nb)]), ("code2", q.code2, [256]),
                              ("offset", q.offset, [1])):
            if t is None or t.dtype != torch.float32 or list(t.reshape(-1).shape) != want or not t.is_contiguous():
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{name}.{part} is {got} but absmax {tuple(q.absmax.shape)} with nested blocks of "
                                 f"{nb} needs a contiguous float32 {want}")
    elif q.absmax.dtype != torch.float32 or not q.absmax.is_contiguous():
        raise TypeError(f"{name}.absmax must be contiguous float32, got {q.absmax.dtype}")
    for part, t in (("absmax", q.absmax), ("absmax2", q.absmax2), ("code2", q.code2), ("offset", q.offset)):
        if t is not None and t.device != q.packed.device:
            raise ValueError(f"{name}.{part} is on {t.device} but {name}.packed is on {q.packed.device}")


# ------------------------------------------------------------------------ quantiser
def _blockwise_absmax_scaled(a: torch.Tensor, blocksize: int, *, clamp_short: bool = True):
    """(absmax per block, a scaled into [-1, 1]) over flat fp32 ``a``, the last block short.
    ``clamp_short``: the short block's absmax is stored clamped to >= 1e-38 (bitsandbytes'
    4-bit quantiser does; its 8-bit CPU one, used for the nested absmax, stores it as is)."""
    n = a.numel()
    full = n - n % blocksize
    absmax = a[:full].view(-1, blocksize).abs().amax(-1)
    scaled = torch.clamp(a[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        am = a[full:].abs().max()
        absmax = torch.cat([absmax, (am.clamp(min=1e-38) if clamp_short else am).reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am.clamp(min=1e-38), -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (code in any order; ties as bitsandbytes: the midpoint
    goes up)."""
    order = torch.argsort(code)
    s = code[order]
    return order[torch.bucketize(scaled, (s[:-1] + s[1:]) / 2, out_int32=True)]


def quantize_4bit(weight: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> Quant4bit:
    """``weight [out, in]`` (fp32 / bf16 / fp16) in bitsandbytes' 4-bit format, in plain PyTorch:
    the same bytes as ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=
    double_quant, quant_type=quant_type)`` (nested blocks of 256, as bitsandbytes)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"weight must be a 2-D float32 / bfloat16 / float16 tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported (supported: {BLOCKSIZES})")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported (supported: {QUANT_TYPES})")
    a = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_scaled(a, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, code_4bit(quant_type, a.device)).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if not double_quant:
        return Quant4bit(packed, absmax, shape, blocksize, quant_type, weight.dtype)
    offset = absmax.mean()
    centred = absmax - offset
    absmax2, scaled2 = _blockwise_absmax_scaled(centred, 256, clamp_short=False)
    code2 = _dynamic_map_cpu().to(a.device)
    qabs = _nearest(scaled2, code2).to(torch.uint8)
    return Quant4bit(packed, qabs, shape, blocksize, quant_type, weight.dtype, absmax2, code2,
                     offset.reshape(1), 256)


# ------------------------------------------------------------------------ dequantiser
def dequantize_4bit(q: Quant4bit, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """W ``[out, in]`` in ``dtype`` (default ``q.dtype``), written by one Triton launch
    (kernels/dequant.py), or into ``out`` (contiguous, ``q.shape``, dtype)."""
    check(q)
    dtype = q.dtype if dtype is None else dtype
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be float32 / bfloat16 / float16, got {dtype}")
    if out is not None and (tuple(out.shape) != q.shape or out.dtype != dtype or not out.is_contiguous()
                            or out.device != q.device):
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype} on {out.device} (contiguous: {out.is_contiguous()}), "
                         f"expected a contiguous {q.shape} {dtype} on {q.device}")
    if not use_triton("dequant", *[t for t in q.tensors() if t is not None]):
        w = reference.dequantize_4bit(q, dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return dequant_into(q, out)


def dequant_into(q: Quant4bit, out: torch.Tensor) -> torch.Tensor:
    """The launch (checked arguments): W into contiguous ``out`` (any float dtype)."""
    if poison_outputs():
        out.fill_(float("nan"))
    k = kernels("dequant")
    n = q.numel
    n_bytes = (n + 1) // 2
    cfg = k.dequant_config(n_bytes, cpu_configs(out))
    code = code_4bit(q.quant_type, q.device)
    nested = q.nested
    k.dequant_4bit_kernel[(-(-n_bytes // cfg["BLOCK_B"]),)](
        q.packed, q.absmax if not nested else code, code,
        q.absmax if nested else q.packed, q.code2 if nested else code, q.absmax2 if nested else code,
        q.offset if nested else code, out, n, n_bytes,
        NESTED=nested, NESTED_BLOCKSIZE=q.nested_blocksize if nested else 1, BLOCKSIZE=q.blocksize, SOFT_BF16=interpreting(),
        BLOCK_B=cfg["BLOCK_B"], num_warps=cfg["num_warps"], enable_fp_fusion=not nested,
    )
    record_launch("dequant_4bit", "nested" if nested else None)
    return out


_WORKSPACE: dict = {}


def workspace(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """A ``shape`` buffer in ``dtype`` reused by every 4-bit layer's dequantise: one flat buffer
    per (device, dtype, stream), grown to the largest weight asked for, so a model holds one
    W-sized half-precision tensor for all its 4-bit layers and no call allocates one. Its
    contents live until the next dequantise on that stream (ops use it at once, never across
    forward and backward)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), dtype, stream)
    n = shape[0] * shape[1]
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1), dtype=dtype, device=device)
        _WORKSPACE[key] = buf
        _bump("dequant.workspace_alloc")
    return buf[:n].view(shape)


def workspace_bytes() -> int:
    """Bytes held by the dequantise workspaces (tests, benches)."""
    return sum(b.numel() * b.element_size() for b in _WORKSPACE.values())

