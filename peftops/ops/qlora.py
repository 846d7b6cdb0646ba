"""QLoRA: ``peftops.qlora_linear`` -- LoRA over a frozen 4-bit (bitsandbytes nf4 / fp4) base.

    y = x W^T + b + scaling * (drop(x) A^T) B^T,   W = dequant(weight)  (peftops.ops.dequant)

Forward, two paths (``PATHS``):
* ``gemv`` (decode, T <= 64 rows, even ``in`` that is a multiple of the blocksize): S =
  drop(x) A^T by the LoRA skinny pass, then one fused dequantise-GEMV (kernels/qlora.py)
  that reads the 4-bit W once, dequantises tiles in registers and adds s S B^T and the bias
  in its epilogue. No W of any precision is written.
* ``dequant``: W dequantised by one launch into the shared workspace (``dequant.workspace``:
  one buffer per device / dtype / stream, reused by every layer, no per-call allocation),
  then the LoRA forward of peftops/ops/lora.py on it, on the path its own table picks.
Backward (W frozen): W dequantised again into the workspace, then the LoRA backward
(``lora._lora_bwd``: dY B and dB in one pass over dY, dA in one pass over x, dx = dY W +
drop'(dS A)). Nothing W-sized is saved for backward: only x, the [T, r] S, and the 4-bit
storage itself (0.5 B per element); at most one half-precision W (the workspace) is live.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from .._dispatch import PathTable, _bump, interpreting, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, new_seed, next_pow2, num_sms, rows, upcast_dots
from . import dora as _dora
from . import lora as _lora
from .dequant import COMPUTE_DTYPES, Quant4bit, check as check_quant, code_4bit, dequant_into, workspace

__all__ = ["qlora_linear", "qdora_linear", "PATHS"]

# On CUDA, first matching row wins (T rows, d_in, d_out, r); structural limits of the gemv
# path (T <= 64, even in % blocksize == 0) are applied after the table.
PATHS = PathTable("qlora", paths=("gemv", "dequant"), default="gemv", rows=[
    (lambda T, **_: T <= 64, "gemv",
     "unmeasured (no GPU yet): byte model bench/MODEL.md (QLoRA): at T <= 64 the GEMV reads 0.53 B/elem of W "
     "vs 2.5 B/elem for dequantise (write 2, read 0.5) + a bf16 GEMM reading 2; bench decides"),
    (lambda **_: True, "dequant", "the dequantise costs ~2.5 B/elem of W, a few % of the GEMM at T >= 512"),
])


def qlora_linear(
    x: torch.Tensor,
    weight: Quant4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W the 4-bit ``weight``
    (``Quant4bit``, e.g. ``Quant4bit.from_bnb(layer.weight)``) dequantised into x's dtype.

    x ``[..., in]`` (fp32 / bf16 / fp16: the compute dtype); bias ``[out]`` in x's dtype or
    None; lora_A ``[r, in]``, lora_B ``[out, r]`` in x's dtype or fp32."""
    scaling, dropout_p = _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("qlora", x, weight.packed, bias, lora_A, lora_B, unsupported=unsupported):
        return reference.qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p)
    seed = new_seed() if dropout_p > 0.0 else None
    T = x.numel() // max(x.shape[-1], 1)
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    path = PATHS.peek(x.is_cuda, T=T, d_in=in_f, d_out=out_f, r=r)
    if path == "gemv" and not _gemv_fits(T, weight):
        path = "dequant"
    _bump(f"qlora.path:{path}")
    lora_path = _lora.PATHS.pick(x.is_cuda, T=T, d_in=in_f, d_out=out_f, r=r) if path == "dequant" else "kernel"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        return _QLoraFn.apply(x, bias, lora_A, lora_B, scaling, dropout_p, seed, path, lora_path, weight.meta(),
                              *weight.tensors())
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, path, lora_path, need_s=False)[0]


def _gemv_fits(T: int, q: Quant4bit) -> bool:
    k = kernels("qlora")
    K = q.shape[1]
    return 0 < T <= k.GEMV_MAX_ROWS and K % 2 == 0 and K % q.blocksize == 0


def _check(x, q, bias, lora_A, lora_B, scaling, dropout_p):
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    check_quant(q, "weight")
    _checks.tensor("bias", bias, ndim=1, optional=True)
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    out_f, in_f = q.shape
    r = lora_A.shape[0]
    if x.dtype not in COMPUTE_DTYPES + (torch.float64,):
        raise TypeError(f"x has dtype {x.dtype}: the compute dtype must be float32 / bfloat16 / float16")
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight {q.shape} expects {in_f}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {q.shape} has {out_f} outputs")
    if r == 0:
        raise ValueError(f"lora_A has rank r = 0 (shape {tuple(lora_A.shape)}): r must be >= 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)} but weight {q.shape} needs [r, {in_f}]")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected [{out_f}, {r}] for weight {q.shape} "
                         f"and lora_A {tuple(lora_A.shape)}")
    _checks.same_dtype("x", x, bias=bias)
    _checks.same_dtype("lora_A", lora_A, lora_B=lora_B)
    if lora_A.dtype != x.dtype and not (lora_A.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"lora_A / lora_B have dtype {lora_A.dtype} but x has {x.dtype}: adapters must be in x's "
                        "dtype, or float32 over a float16 / bfloat16 x")
    _checks.same_device("x", x, **{"weight.packed": q.packed}, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return _checks.finite_scalar("scaling", scaling), _checks.probability("dropout_p", dropout_p)


def _dequant_workspace(q: Quant4bit, dtype: torch.dtype) -> torch.Tensor:
    return dequant_into(q, workspace(q.device, dtype, q.shape))


def _forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, path, lora_path, need_s=True):
    """(y [..., out], x as rows, S [T, r] fp32; [0, r] when not ``need_s``)."""
    lead = x.shape[:-1]
    x2 = rows(x)
    if path == "gemv":
        seed_v = None if seed is None else int(seed.item())
        s, _ = _lora._skinny(x2, e=lora_A.t(), seed=seed_v, p=dropout_p)          # S = drop(x) A^T
        y2 = _gemv(x2, q, bias, s, lora_B, scaling)                                # x W^T + b + s S B^T
    else:
        w = _dequant_workspace(q, x.dtype)
        y2, s = _lora._lora_fwd(x2, w, bias, lora_A, lora_B, None, scaling, dropout_p, seed, lora_path, need_s)
    return y2.view(*lead, q.shape[0]), x2, (s if need_s else s[:0])


class _QLoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scaling, dropout_p, seed, path, lora_path, meta, *qt):
        q = Quant4bit.rebuild(qt, meta)
        y, x2, s = _forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, path, lora_path)
        ctx.save_for_backward(x2, lora_A, lora_B, s, seed, *qt)
        ctx.scaling, ctx.dropout_p, ctx.lead, ctx.lora_path, ctx.meta = scaling, dropout_p, x.shape[:-1], lora_path, meta
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lora_A, lora_B, s, seed, *qt = ctx.saved_tensors
        need_x, need_b, need_a, need_bb = ctx.needs_input_grad[:4]
        dy2 = rows(dy)
        # dx = dY W needs W: dequantised again (never kept from forward), into the workspace
        w = _dequant_workspace(Quant4bit.rebuild(qt, ctx.meta), x2.dtype) if need_x and x2.shape[0] else None
        dx2, d_a, d_b, _ = _lora._lora_bwd(dy2, x2, w, lora_A, lora_B, s, None, ctx.scaling, ctx.dropout_p, seed,
                                           need_x, ctx.lora_path)
        dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        return (dx, db, d_a if need_a else None, d_b if need_bb else None) + (None,) * (6 + len(qt))


# ------------------------------------------------------------------------ launcher
def _gemv(x, q, bias, s, lora_B, scaling):
    """``x W^T + bias + scaling * S B^T`` by the fused dequantise-GEMV (x ``[T, in]``, T <= 64)."""
    k = kernels("qlora")
    M, K = x.shape
    N = q.shape[0]
    R = s.shape[1]
    out = empty((M, N), x.dtype, x.device)
    cfg = k.gemv_config(M, N, cpu_configs(x), num_sms(x.device) if x.is_cuda else _lora.TARGET_SMS,
                        half=x.dtype != torch.float32)
    code = code_4bit(q.quant_type, q.device)
    nested = q.nested
    grid = (-(-N // cfg["BLOCK_N"]), -(-M // cfg["BLOCK_M"]))
    k.qlora_gemv_kernel[grid](
        x, q.packed, q.absmax if not nested else code, code,
        q.absmax if nested else q.packed, q.code2 if nested else code, q.absmax2 if nested else code,
        q.offset if nested else code, bias if bias is not None else out, s, lora_B, out,
        M, N, K, R, x.stride(0), x.stride(1), s.stride(0), s.stride(1), lora_B.stride(0), lora_B.stride(1),
        out.stride(0), scaling,
        HAS_BIAS=bias is not None, NESTED=nested, NESTED_BLOCKSIZE=q.nested_blocksize if nested else 1,
        BLOCKSIZE=q.blocksize, SOFT_BF16=interpreting(), UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype),
        EPI_PRECISION="tf32" if x.dtype != torch.float32 else dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=next_pow2(R),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=not nested,
    )
    record_launch("qlora_gemv", "nested" if nested else None)
    return out


# ------------------------------------------------------------------------ QDoRA
def qdora_linear(
    x: torch.Tensor,
    weight: Quant4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    norm_cache: "_dora.DoraNormCache | None" = None,
) -> torch.Tensor:
    """DoRA over a 4-bit base: ``y = (m / ||W + s B A||_row) * (x W^T + s (x A^T) B^T) + b``,
    W the 4-bit ``weight`` dequantised into x's dtype (``peftops.dora_linear``'s math and
    kernels; see peftops/ops/dora.py).

    W is dequantised into the shared workspace at each point of use (the norm pass and the
    base GEMM in forward, dx in backward) and never saved; ``norm_cache`` keys ``||W||^2``
    and n by the packed 4-bit tensor. Dropout > 0 (training) runs the reference formula,
    counted as ``qdora.fallback`` (peft's form needs drop(x) W^T with autograd through W)."""
    scaling, dropout_p = _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _checks.tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude has shape {tuple(magnitude.shape)} but weight {weight.shape} has "
                         f"{weight.shape[0]} outputs: expected [{weight.shape[0]}]")
    if magnitude.dtype not in (lora_A.dtype, torch.float32):
        raise TypeError(f"magnitude has dtype {magnitude.dtype}: expected lora_A's ({lora_A.dtype}) or float32")
    _checks.same_device("x", x, magnitude=magnitude)
    unsupported = "float64" if x.dtype == torch.float64 else ("dropout" if dropout_p > 0.0 else None)
    if not use_triton("qdora", x, weight.packed, bias, lora_A, lora_B, magnitude, unsupported=unsupported):
        return reference.qdora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p)
    if torch.compiler.is_compiling():
        norm_cache = None
    w = _dequant_workspace(weight, x.dtype)                 # forward's one W: the norm pass and the base GEMM
    n = norm_cache.get_norm(weight.packed, lora_A, lora_B, scaling) if norm_cache is not None else None
    if n is None:
        wsq = norm_cache.get_wsq(weight.packed) if norm_cache is not None else None
        n, wsq = _dora.norm_rows(w, lora_A, lora_B, scaling, wsq)
        if norm_cache is not None:
            norm_cache.put_wsq(weight.packed, wsq)
            norm_cache.put_norm(weight.packed, lora_A, lora_B, scaling, n)
    T = x.numel() // max(x.shape[-1], 1)
    path = _dora.PATHS.pick(x.is_cuda, T=T, d_in=weight.shape[1], d_out=weight.shape[0], r=lora_A.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, bias, lora_A, lora_B, magnitude)):
        return _QDoraFn.apply(x, w, bias, lora_A, lora_B, magnitude, n, scaling, path, weight.meta(),
                              *weight.tensors())
    x2 = rows(x)
    y2 = _dora._fwd_rows(x2, w, bias, lora_A, lora_B, magnitude, n, scaling, path, False)[0]
    return y2.view(*x.shape[:-1], weight.shape[0])


class _QDoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, lora_A, lora_B, magnitude, n, scaling, path, meta, *qt):
        # w: the workspace the caller dequantised into (read here, never saved)
        x2 = rows(x)
        y2, s, c = _dora._fwd_rows(x2, w, bias, lora_A, lora_B, magnitude, n, scaling, path, True)
        ctx.save_for_backward(x2, bias, lora_A, lora_B, magnitude, n, s, c, y2, *qt)
        ctx.scaling, ctx.lead, ctx.path, ctx.meta = scaling, x.shape[:-1], path, meta
        return y2.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, bias, lora_A, lora_B, magnitude, n, s, c, y2, *qt = ctx.saved_tensors
        need_x, _, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        dy2 = rows(dy)
        # dx = dY' W (and a column with m = 0) needs W: dequantised again, into the workspace
        w = _dequant_workspace(Quant4bit.rebuild(qt, ctx.meta), x2.dtype)
        dx2, d_a, d_b, d_m, _ = _dora._bwd_rows(dy2, y2, x2, w, bias, lora_A, lora_B, magnitude, n, s, c,
                                                ctx.scaling, need_x, ctx.path)
        dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        return ((dx, None, db, d_a if need_a else None, d_b if need_bb else None, d_m if need_m else None)
                + (None,) * (4 + len(qt)))
