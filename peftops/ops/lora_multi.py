"""Mixed-adapter LoRA: ``peftops.lora_linear_multi`` -- checks, dispatch, autograd, launchers.

    y_t = x_t W^T + b + s_{a(t)} (x_t A_{a(t)}^T) B_{a(t)}^T      (a(t) = -1: base only)

Every row of the batch picks one adapter of a stack (peft's ``adapter_names=``, multi-LoRA
serving, several adapters trained in one batch). The frozen GEMM runs once (cuBLAS, bias in
its epilogue); the rank-r work of all adapters is one grouped shrink (S = x A_a^T) and one
grouped expand (y += s_a S B_a^T, in place) -- kernels/lora_multi.py. Backward: one grouped
shrink of dY (G = dY B_a), dx = dY W (cuBLAS) + one grouped expand (s_a G A_a), and one
grouped weight-gradient launch each for dA and dB over the rows sorted by adapter.

No host sync, no data-dependent shape, no loop over adapters: the launch count depends on
the call's shapes only (CUDA-graph capturable at a fixed batch). The launchers are
``torch.library`` custom ops (``torch.compile(fullgraph=True)`` keeps them in one graph).
Three paths (``PATHS``):
* ``sgmv``: rows stably sorted by adapter on the device (``torch.sort``), so a row block
  holds one adapter's segment (or the seam of two): E_a is read once per block.
* ``bgmv``: rows as they come (decode: one row per sequence, sorting buys nothing); each
  row block loops over the adapters its rows hold.
* ``fused``: many rows of a bf16 / fp16 base on sm_90 whose x and W TMA can read (else
  ``sgmv``, counted as ``variant.lora_multi:fused_fallback``): the frozen GEMM is our
  persistent TMA kernel with the grouped expand in its epilogue (rows in their order: a
  prefill tile lies in one sequence, one adapter), S by the shrink (rows as they come), so
  y is written once; the backward's dx the same way.
Backward always sorts (the weight gradients walk each adapter's segment).

Index validation: a CPU index (or a Python list) is checked on the host (``ValueError``
naming ``adapter_index``); a CUDA index is not read on the host (that would sync): the
kernels treat any value outside [0, n) other than -1 as base only, and never read out of
bounds with it (so is a CPU index under torch.compile, which cannot read it on the host).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks, reference
from .._dispatch import PathTable, _bump, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, next_pow2, num_sms, pick, rows, upcast_dots
from .lora import TARGET_SMS, _use_tma

__all__ = ["lora_linear_multi", "adapter_rows", "PATHS"]

PATHS = PathTable("lora_multi", paths=("sgmv", "bgmv", "fused"), default="sgmv", rows=[
    (lambda T, **_: T <= 64, "bgmv",
     "unmeasured: decode rows are one per sequence, so a 16-row block holds up to 16 adapters "
     "whether sorted or not; bgmv saves the sort's launches. bench peftops[sgmv] / [bgmv] decide."),
    (lambda T, **_: T >= 257, "fused",
     "unmeasured: bench/MODEL.md -- the separate expand reads and writes y once more (45 us at "
     "T = 8192, d = 4096: 0.12x the base GEMM); in the GEMM epilogue it costs a few MMA steps. "
     "bench peftops[fused] / [sgmv] decide."),
    (lambda **_: True, "sgmv",
     "unmeasured: prefill segments; sorting reads each adapter's A / B once per row block of "
     "its segment. bench peftops[sgmv] / [bgmv] decide."),
])


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    adapter_index: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """``y = x W^T + b + s_a (x A_a^T) B_a^T`` with adapter a chosen per row.

    x ``[..., in]``; weight ``[out, in]``; bias ``[out]`` or None; lora_A ``[n, r_max, in]``
    and lora_B ``[n, out, r_max]``: n adapters, ranks zero-padded to r_max; scalings: n
    floats (a list, or a 1-D tensor, which may live on x's device: no host read);
    adapter_index: integers in [-1, n) (-1: base only), one per token (shape ``x.shape[:-1]``)
    or, for x of 3+ dims, one per sequence (shape ``[x.shape[0]]``); an int32 / int64 tensor
    or a list. Gradients: x, weight, bias, lora_A, lora_B (every adapter's, from one batch).
    """
    idx, scale = _check(x, weight, bias, lora_A, lora_B, scalings, adapter_index)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("lora_multi", x, weight, bias, lora_A, lora_B, idx, unsupported=unsupported):
        return reference.lora_linear_multi(x, weight, bias, lora_A, lora_B, scale, idx.view(x.shape[:-1]))
    T = idx.numel()
    path = PATHS.pick(x.is_cuda, T=T, d_in=weight.shape[1], d_out=weight.shape[0], r=lora_A.shape[1],
                      n=lora_A.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)):
        return _MultiFn.apply(x, weight, bias, lora_A, lora_B, scale, idx, path)
    return _forward(x, weight, bias, lora_A, lora_B, scale, idx, path, need_s=False)[0]


def adapter_rows(adapter_index, lead: tuple[int, ...], n: int, device) -> torch.Tensor:
    """``adapter_index`` as one int32 id per row of ``x [*lead, in]`` (on ``device``).

    Per token (shape ``lead``) or, for 2+ leading dims, per sequence (shape ``[lead[0]]``,
    repeated over the sequence). Python lists and CPU tensors are range-checked here."""
    name = "adapter_index"
    if isinstance(adapter_index, torch.Tensor):
        if adapter_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 / int64 tensor, got dtype {adapter_index.dtype}")
        idx = adapter_index
    elif isinstance(adapter_index, (list, tuple)):
        bad = _non_int(adapter_index)
        if bad is not None:
            raise TypeError(f"{name} must hold Python ints (nested lists for per-token ids), got a {bad}")
        try:
            idx = torch.tensor(adapter_index, dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} is not a rectangular list of ints: {e}") from None
    else:
        raise TypeError(f"{name} must be an int tensor or a list of ints, got {type(adapter_index).__name__}")
    T = 1
    for d in lead:
        T *= d
    if tuple(idx.shape) == tuple(lead):
        pass
    elif len(lead) >= 2 and idx.dim() == 1 and idx.shape[0] == lead[0]:
        idx = idx[:, None].expand(lead[0], T // max(lead[0], 1) if lead[0] else 0)
    else:
        raise ValueError(f"{name} has shape {tuple(idx.shape)}: expected one index per token {tuple(lead)}"
                         + (f" or per sequence ({lead[0]},)" if len(lead) >= 2 else ""))
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():  # only an index the host
        # holds (no device sync); under torch.compile the kernels' masking stands alone
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n:
            raise ValueError(f"{name} holds values in [{lo}, {hi}]: expected -1 (base only) or 0 .. {n - 1} "
                             f"for {n} adapters")
    return idx.reshape(-1).to(device=device, dtype=torch.int32, non_blocking=True)


def _non_int(values):
    """The type name of the first entry of a (nested) list that is not an int (bools are not)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            bad = _non_int(v)
            if bad is not None:
                return bad
        elif not isinstance(v, int) or isinstance(v, bool):
            return type(v).__name__
    return None


def _check(x, weight, bias, lora_A, lora_B, scalings, adapter_index):
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("bias", bias, ndim=1, optional=True)
    _checks.tensor("lora_A", lora_A, ndim=3)
    _checks.tensor("lora_B", lora_B, ndim=3)
    out_f, in_f = weight.shape
    n, r, a_in = lora_A.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight {tuple(weight.shape)} expects {in_f}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} has {out_f} outputs")
    if n == 0 or r == 0:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}: needs n >= 1 adapters of rank r_max >= 1")
    if a_in != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)} but weight {tuple(weight.shape)} needs [n, r_max, {in_f}]")
    if tuple(lora_B.shape) != (n, out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected [{n}, {out_f}, {r}] for weight "
                         f"{tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}")
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    _checks.same_dtype("lora_A", lora_A, lora_B=lora_B)
    if lora_A.dtype != x.dtype and not (lora_A.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"lora_A / lora_B have dtype {lora_A.dtype} but x has {x.dtype}: adapters must be in x's "
                        "dtype, or float32 over a float16 / bfloat16 x")
    _checks.same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if isinstance(scalings, torch.Tensor):
        if not scalings.is_floating_point() or scalings.dim() != 1 or scalings.shape[0] != n:
            raise ValueError(f"scalings must be a 1-D float tensor of {n} (one per adapter), got dtype "
                             f"{scalings.dtype} shape {tuple(scalings.shape)}")
        _checks.same_device("x", x, scalings=scalings)
        scale = scalings.detach().to(torch.float32)
    else:
        try:
            vals = [_checks.finite_scalar("scalings[i]", s) for s in scalings]
        except TypeError as e:
            raise TypeError(f"scalings must be a float tensor or a sequence of floats: {e}") from None
        if len(vals) != n:
            raise ValueError(f"scalings has {len(vals)} values but lora_A {tuple(lora_A.shape)} holds {n} adapters")
        scale = torch.tensor(vals, dtype=torch.float32).to(x.device)
    if isinstance(adapter_index, torch.Tensor) and adapter_index.device.type != "cpu":
        _checks.same_device("x", x, adapter_index=adapter_index)
    idx = adapter_rows(adapter_index, tuple(x.shape[:-1]), n, x.device)
    return idx, scale


def _multi_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: torch.Tensor, idx: torch.Tensor, path: str, need_s: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x: (y [T, out], S = x A_a^T [T, r] fp32; [0, r] when not ``need_s``)."""
    T, n, R = x.shape[0], lora_A.shape[0], lora_A.shape[1]
    if T and path == "fused" and _use_tma(x, weight.t()):
        s = _shrink(x, lora_A.transpose(1, 2), idx, None)                       # S = x A_a^T (rows in order)
        y = _gemm_multi(x, weight.t(), bias, s, lora_B.transpose(1, 2), scale, idx)  # y = x W^T + b + s_a S B_a^T
        return y, (s if need_s else s[:0].clone())
    if path == "fused" and T:
        _bump("variant.lora_multi:fused_fallback")                              # (not a launch)
        path = "sgmv"
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())  # cuBLAS, once
    if T == 0:
        return y, x.new_zeros((0, R), dtype=torch.float32)
    perm = _sort(idx, n)[0] if path == "sgmv" else None
    s = _shrink(x, lora_A.transpose(1, 2), idx, perm)                           # S = x A_a^T       [T, r]
    _expand(y, s, lora_B.transpose(1, 2), scale, idx, perm)                     # y += s_a S B_a^T  in place
    return y, (s if need_s else s[:0].clone())


multi_fwd = torch.library.custom_op("peftops::lora_multi_fwd", mutates_args=())(_multi_fwd)


@multi_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, idx, path, need_s):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0] if need_s else 0, lora_A.shape[1]), dtype=torch.float32))


def _multi_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, path: str, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with W frozen, 2-D: (dx, dA, dB), each an empty tensor when not needed. The rows
    are sorted by adapter here (the weight gradients walk each adapter's segment)."""
    T, n = x.shape[0], lora_A.shape[0]
    none = x.new_empty(0)
    if T == 0:
        return (x.new_zeros(x.shape) if need_x else none, lora_A.new_zeros(lora_A.shape) if need_a else none,
                lora_B.new_zeros(lora_B.shape) if need_b else none)
    perm, offsets = _sort(idx, n)
    g = _shrink(dy, lora_B, idx, perm)                                           # G = dY B_a       [T, r]
    dx = d_a = d_b = none
    if need_x:                                                                   # dx = dY W + s_a G A_a
        if path == "fused" and _use_tma(dy, weight):
            dx = _gemm_multi(dy, weight, None, g, lora_A, scale, idx)
        else:
            dx = torch.mm(dy, weight)
            _expand(dx, g, lora_A, scale, idx, perm)
    if need_a:                                                                   # dA_a = s_a G_a^T x_a
        d_a = _wgrad(x, g, scale, perm, offsets, n).transpose(1, 2).to(lora_A.dtype).contiguous()
    if need_b:                                                                   # dB_a = s_a dY_a^T S_a
        d_b = _wgrad(dy, s, scale, perm, offsets, n).to(lora_B.dtype).contiguous()
    return dx, d_a, d_b


multi_bwd = torch.library.custom_op("peftops::lora_multi_bwd", mutates_args=())(_multi_bwd)


@multi_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, scale, idx, s, path, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            lora_A.new_empty(lora_A.shape) if need_a else x.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_b else x.new_empty(0))


def _forward(x, weight, bias, lora_A, lora_B, scale, idx, path, need_s=True):
    """(y [..., out], x as rows, S) -- shared by the autograd Function and the no-grad call."""
    x2 = rows(x)
    y2, s = pick(multi_fwd, _multi_fwd, x2)(x2, weight, bias, lora_A, lora_B, scale, idx, path, need_s)
    return y2.view(*x.shape[:-1], weight.shape[0]), x2, s


class _MultiFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, idx, path):
        y, x2, s = _forward(x, weight, bias, lora_A, lora_B, scale, idx, path)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, scale, idx, s)
        ctx.lead, ctx.path = x.shape[:-1], path
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, scale, idx, s = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy2 = rows(dy)
        dx2, d_a, d_b = pick(multi_bwd, _multi_bwd, dy2)(dy2, x2, weight, lora_A, lora_B, scale, idx, s, ctx.path,
                                                        need_x, need_a, need_bb)
        dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
        dw = (dy2.t() @ x2).to(weight.dtype) if need_w else None                 # a trainable base
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        return dx, dw, db, (d_a if need_a else None), (d_b if need_bb else None), None, None, None


# ------------------------------------------------------------------------ launchers
def _sort(idx: torch.Tensor, n: int):
    """(perm, offsets): rows stably sorted by adapter id (int32), and where each adapter's
    segment starts in that order (offsets[a] .. offsets[a + 1]; ids outside [0, n) fall
    outside every segment). Device-side, fixed shapes: no sync."""
    sorted_idx, perm = torch.sort(idx, stable=True)
    bounds = torch.arange(n + 1, device=idx.device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_idx, bounds, out_int32=True)
    return perm.to(torch.int32), offsets


def _shrink(x, e, idx, perm):
    """``P_t = x_t E_{a(t)}`` fp32 ``[T, r]``; e ``[n, K, r]`` any strides (zeros for rows
    without an adapter)."""
    k = kernels("lora_multi")
    M, K = x.shape
    n, _, R = e.shape
    cfg = k.shrink_config(M, K, cpu_configs(x), 2 * num_sms(x.device))
    splits = cfg["splits"]
    p = empty((splits, M, R), torch.float32, x.device)
    k.multi_shrink_kernel[(-(-M // cfg["BLOCK_M"]), splits)](
        x, e, idx, perm if perm is not None else idx, p,
        M, K, R, n, cfg["k_per_split"],
        x.stride(0), x.stride(1), e.stride(0), e.stride(1), e.stride(2),
        HAS_PERM=perm is not None, UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=next_pow2(R),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("lora_multi_shrink", "bgmv" if perm is None else None)
    return p[0] if splits == 1 else p.sum(0)


def _expand(out, p, f, scale, idx, perm):
    """``out_t += s_a P_t F_{a(t)}`` in place; out ``[T, N]`` unit column stride, p ``[T, r]``
    fp32, f ``[n, r, N]`` any strides."""
    k = kernels("lora_multi")
    M, N = out.shape
    n, R, _ = f.shape
    assert out.stride(1) == 1, "grouped expand needs a unit column stride"
    precision = "tf32" if out.dtype != torch.float32 else dot_precision(out.dtype)
    cfg = k.expand_config(M, N, cpu_configs(out), ieee=precision == "ieee")
    k.multi_expand_kernel[(-(-M // cfg["BLOCK_M"]), -(-N // cfg["BLOCK_N"]))](
        out, p, f, scale, idx, perm if perm is not None else idx,
        M, N, R, n,
        out.stride(0), p.stride(0), p.stride(1), f.stride(0), f.stride(1), f.stride(2),
        HAS_PERM=perm is not None,
        EPI_PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=next_pow2(R), num_warps=cfg["num_warps"],
    )
    record_launch("lora_multi_expand", "bgmv" if perm is None else None)
    return out


def _wgrad(x, f, scale, perm, offsets, n):
    """``G_a = s_a sum_{t in segment a} x_t^T f_t`` fp32 ``[n, C, r]`` (x ``[T, C]``, f ``[T, r]``)."""
    k = kernels("lora_multi")
    T, C = x.shape
    R = f.shape[1]
    cfg = k.wgrad_config(T, C, n, cpu_configs(x), 2 * num_sms(x.device))
    splits = cfg["splits"]
    g = empty((splits, n, C, R), torch.float32, x.device)
    k.multi_wgrad_kernel[(n, -(-C // cfg["BLOCK_C"]), splits)](
        x, f, scale, perm, offsets, g,
        C, R, n,
        x.stride(0), x.stride(1), f.stride(0), f.stride(1),
        UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], BLOCK_R=next_pow2(R),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("lora_multi_wgrad")
    return g[0] if splits == 1 else g.sum(0)


def _gemm_multi(x, w, bias, s, e, scale, idx):
    """``out = x @ w + bias + s_a S_t E_{a(t)}`` by ``multi_gemm_tma_kernel``; x ``[M, K]`` and
    w ``[K, N]`` TMA-readable (``_use_tma``), s ``[M, r]`` fp32, e ``[n, r, N]`` any strides."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    k = kernels("lora_multi")
    M, K = x.shape
    N = w.shape[1]
    n, R, _ = e.shape
    out = empty((M, N), x.dtype, x.device)
    sms = num_sms(x.device) if x.is_cuda else TARGET_SMS
    cfg = k.tma_config(M, N, cpu_configs(x), sms)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    w_nk = w.stride(0) == 1
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w.t(), [bn, bk]) if w_nk else TensorDescriptor.from_tensor(w, [bk, bn])
    out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    tiles = -(-M // bm) * -(-N // bn)
    k.multi_gemm_tma_kernel[(min(tiles, sms),)](
        x_desc, w_desc, out_desc, bias if bias is not None else out, s, e, scale, idx,
        M, N, K, R, n, s.stride(0), s.stride(1), e.stride(0), e.stride(1), e.stride(2),
        HAS_BIAS=bias is not None, W_NK=w_nk, UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=next_pow2(R), GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("lora_multi_gemm_tma")
    return out
