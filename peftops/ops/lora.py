"""LoRA: ``peftops.lora_linear`` -- checks, dispatch, autograd, launchers.

    y = x W^T + b + gate * scaling * (drop(x) A^T) B^T

Two paths, picked per shape by ``PATHS`` (DESIGN.md, Dispatch), both exact:
* ``kernel``: S = drop(x) A^T ([T, r] fp32, saved) and one Triton GEMM whose single fp32
  accumulator takes the rank-r term as BLOCK_R more K-steps. Above 256 rows of a bf16 /
  fp16 base on sm_90 that GEMM is the persistent TMA kernel. S is made inside the GEMM
  (one launch) up to 64 rows, and at any row count on the TMA kernel without dropout;
  otherwise by one skinny pass over x first.
* ``cublas``: the frozen GEMM on cuBLAS (``F.linear``, bias in its epilogue), S by the same
  skinny pass, and one small fused kernel adding gate * scaling * S B^T into y in place.
Backward (algebra beside each launch in ``lora_bwd``): one pass over dY gives dY B and dB;
one pass over x gives dA; dx = dY W + drop'(dS A) by our GEMM (``kernel``) or by cuBLAS +
the in-place rank-r add (``cublas``). Every intermediate is rank r; the dropout mask is
regenerated from the seed, never stored. Adapters may be fp32 over a half base (peft's
default): the kernels read them as they are, no per-call casts, and return fp32 grads.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import cpu_configs, pick, dot_precision, empty, kernels, new_seed, next_pow2, num_sms, rows, upcast_dots

__all__ = ["lora_linear", "PATHS"]

# Which path runs on CUDA, first matching row wins (shapes: T rows, d_in, d_out, r).
PATHS = PathTable("lora", paths=("kernel", "cublas"), default="kernel", rows=[
    (lambda **_: True, "cublas",
     "H100 2026-11-23 (shared/PERF.md): cuBLAS base GEMM + rank-r add = 1.47x / 1.43x / 1.22x the base "
     "GEMM at T = 16 / 512 / 8192; our GEMM then (two accumulators, 664 B spills) 7.7-10x. The "
     "single-accumulator kernel is unmeasured: bench provider peftops[kernel] decides when it moves here."),
])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + gate * scaling * (dropout(x) A^T) B^T``.

    x ``[..., in]``; weight ``[out, in]``; bias ``[out]`` or None; lora_A ``[r, in]``;
    lora_B ``[out, r]``; scaling a Python float; gate None or broadcastable to
    ``y[..., :1]`` (per token ``[..., 1]`` or per sample ``[B, 1, 1]``). Dropout
    (``dropout_p > 0``) acts on the LoRA branch only; its mask is drawn from torch's
    generator as a seed and regenerated in backward.
    """
    scaling, dropout_p = _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, gate)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("lora", x, weight, bias, lora_A, lora_B, gate, unsupported=unsupported):
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p, gate=gate)
    seed = new_seed() if dropout_p > 0.0 else None
    path = PATHS.pick(x.is_cuda, T=x.numel() // max(x.shape[-1], 1), d_in=weight.shape[1], d_out=weight.shape[0],
                      r=lora_A.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, gate)):
        return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path)
    # no autograd node, and S (needed only by a backward) is not kept
    return _forward(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path, need_s=False)[0]


def _forward(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path, need_s=True):
    """(y [..., out], x as rows, S, per-row gate) -- the forward shared by the autograd
    Function and the no-grad call (inference, decode: no graph node, less host time)."""
    lead = x.shape[:-1]
    x2 = rows(x)
    g = None if gate is None else gate.detach().expand(*lead, 1).reshape(-1).float().contiguous()
    y2, s = pick(lora_fwd, _lora_fwd, x2)(x2, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, path,
                                          need_s)
    return y2.view(*lead, weight.shape[0]), x2, s, g


def _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, gate):
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("bias", bias, ndim=1, optional=True)
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight {tuple(weight.shape)} expects {in_f}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} has {out_f} outputs")
    if r == 0:
        raise ValueError(f"lora_A has rank r = 0 (shape {tuple(lora_A.shape)}): r must be >= 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)} but weight {tuple(weight.shape)} needs [r, {in_f}]")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected [{out_f}, {r}] for weight {tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}")
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    _checks.same_dtype("lora_A", lora_A, lora_B=lora_B)
    if lora_A.dtype != x.dtype and not (lora_A.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"lora_A / lora_B have dtype {lora_A.dtype} but x has {x.dtype}: adapters must be in x's "
                        "dtype, or float32 over a float16 / bfloat16 x")
    _checks.same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    _checks.gate("gate", gate, (*x.shape[:-1], 1), x)
    return _checks.finite_scalar("scaling", scaling), _checks.probability("dropout_p", dropout_p)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path):
        y, x2, s, g = _forward(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, s, g, seed)
        ctx.scaling, ctx.dropout_p, ctx.lead, ctx.path = scaling, dropout_p, x.shape[:-1], path
        ctx.gate_shape = None if gate is None else gate.shape
        ctx.gate_dtype = None if gate is None else gate.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s, g, seed = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_g = ctx.needs_input_grad[:6]
        dy2 = rows(dy)
        dx2, d_a, d_b, dg = pick(lora_bwd, _lora_bwd, dy2)(dy2, x2, weight, lora_A, lora_B, s, g, ctx.scaling,
                                                           ctx.dropout_p, seed, need_x, ctx.path)
        dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
        # A trainable base: dW = dY^T x (no dropout on the base branch), db = sum_t dY.
        dw = (dy2.t() @ x2).to(weight.dtype) if need_w else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        dgate = None
        if need_g:
            dgate = dg.view(*ctx.lead, 1).sum_to_size(ctx.gate_shape).to(ctx.gate_dtype)
        return dx, dw, db, (d_a if need_a else None), (d_b if need_bb else None), dgate, None, None, None, None


# ------------------------------------------------------------------------ launchers
def _skinny(x, e=None, f=None, *, seed=None, p=0.0, f_rowscale=None, f_scale=1.0):
    """One pass over ``x [M, N]``: ``P1 = drop(x) @ e`` (e ``[N, r]``) and/or
    ``P2 = drop(x)^T @ (f_scale * f_rowscale[:, None] * f)`` (f ``[M, r]``, f_rowscale ``[M]``
    fp32 or None), both fp32; partials summed here in fixed order."""
    k = kernels("lora")
    M, N = x.shape
    R = (e if e is not None else f).shape[1]
    interpret = cpu_configs(x)
    cfg = k.skinny_config(M, N, 2 * num_sms(x.device), interpret, half=x.dtype != torch.float32, p1=e is not None)
    m_blocks, splits = -(-M // cfg["BLOCK_M"]), cfg["splits"]
    p1 = empty((splits, M, R), torch.float32, x.device) if e is not None else None
    p2 = empty((m_blocks, N, R), torch.float32, x.device) if f is not None else None
    dummy = p1 if p1 is not None else p2
    k.lora_skinny_kernel[(m_blocks, splits)](
        x, e if e is not None else dummy, f if f is not None else dummy,
        f_rowscale if f_rowscale is not None else dummy,
        p1 if p1 is not None else dummy, p2 if p2 is not None else dummy,
        M, N, R, cfg["n_per_split"],
        x.stride(0), x.stride(1),
        *(e.stride() if e is not None else (0, 0)), *(f.stride() if f is not None else (0, 0)),
        float(f_scale), int(seed) if seed is not None else 0, p, 1.0 / (1.0 - p),
        DO_P1=e is not None, DO_P2=f is not None, F_ROWSCALE=f_rowscale is not None, DROPOUT=seed is not None,
        UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=next_pow2(R),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("lora_skinny")
    return (p1.sum(0) if p1 is not None else None), (p2.sum(0) if p2 is not None else None)


TARGET_SMS = 132  # the TMA GEMM's tile choice off a GPU (interpreter, compile-check): an H100's SMs


def _tma_readable(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read ``t`` as it is: unit last stride, 16-byte aligned
    base and other strides (no copy is ever made to get there)."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


def _use_tma(x, w, fuse_a=None) -> bool:
    """The persistent TMA GEMM for many rows of a bf16 / fp16 base whose x, W (either
    layout) and fused A are TMA-readable; else ``lora_gemm_kernel`` (same math)."""
    k = kernels("lora")
    if x.shape[0] < k.TMA_MIN_ROWS or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] * 10 < k.MIN_ARCH["lora_gemm_tma_kernel"]:
        return False
    w_stored = w.t() if w.stride(0) == 1 else w                                  # [N, K] (W^T view) or [K, N]
    out_row = w.shape[1] * x.element_size()
    return (_tma_readable(x) and _tma_readable(w_stored) and out_row % 16 == 0
            and (fuse_a is None or _tma_readable(fuse_a)))


def _gemm(x, w, bias, s, e, rowscale, scale, out_dtype, *, seed=None, p=0.0, fuse_a=None, colscale=None):
    """``out = colscale * (x @ w + scale * rowscale * drop(s @ e)) + bias``; x ``[M, K]``,
    w ``[K, N]``, s ``[M, r]``, e ``[r, N]`` (any strides); colscale ``[N]`` fp32 or None
    (DoRA's m / n: the bias is not scaled).

    ``fuse_a`` (``[r, K]``): compute ``s = drop(x) fuse_a^T`` in the GEMM's main loop and write
    it into ``s`` (the dropout, if any, then acts on that x, not on the rank-r term); ``s``
    None: nothing is written (inference: no backward needs S).
    Many rows of a TMA-readable half-precision base go to the persistent TMA kernel
    (``_use_tma``), the rest to ``lora_gemm_kernel`` (same math)."""
    assert s is not None or fuse_a is not None, "S is an input unless the GEMM makes it"
    k = kernels("lora")
    M, K = x.shape
    N = w.shape[1]
    R = s.shape[1] if s is not None else fuse_a.shape[0]
    out = empty((M, N), out_dtype, x.device)
    store_s, s = s is not None, (s if s is not None else out)                   # out: a pointer never written
    sms = num_sms(x.device) if x.is_cuda else TARGET_SMS
    epi = "tf32" if x.dtype != torch.float32 else dot_precision(x.dtype)
    if _use_tma(x, w, fuse_a):
        assert fuse_a is None or seed is None, "the TMA GEMM fuses S only without dropout"
        from triton.tools.tensor_descriptor import TensorDescriptor

        cfg = k.tma_config(M, N, K, cpu_configs(x), sms, drop_epi=fuse_a is None and seed is not None,
                           colscale=colscale is not None)
        bm, bn, bk, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], next_pow2(R)
        w_nk = w.stride(0) == 1
        x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w.t(), [bn, bk]) if w_nk else TensorDescriptor.from_tensor(w, [bk, bn])
        a_desc = TensorDescriptor.from_tensor(fuse_a, [br, bk]) if fuse_a is not None else x_desc
        out_desc = TensorDescriptor.from_tensor(out, [bm, bn])
        tiles = -(-M // bm) * -(-N // bn)
        k.lora_gemm_tma_kernel[(min(tiles, sms),)](
            x_desc, w_desc, a_desc, out_desc, bias if bias is not None else out, s, e,
            rowscale if rowscale is not None else s, colscale if colscale is not None else s,
            M, N, K, R, s.stride(0), s.stride(1), e.stride(0), e.stride(1),
            scale, int(seed) if seed is not None else 0, p, 1.0 / (1.0 - p),
            HAS_BIAS=bias is not None, HAS_ROWSCALE=rowscale is not None, HAS_COLSCALE=colscale is not None,
            FUSE_S=fuse_a is not None,
            STORE_S=fuse_a is not None and store_s, W_NK=w_nk, DROP_EPI=fuse_a is None and seed is not None,
            UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype), EPI_PRECISION=epi,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        record_launch("lora_gemm_tma")
        return out
    cfg = k.gemm_config(M, N, K, cpu_configs(x), sms, drop_epi=fuse_a is None and seed is not None,
                        drop_s=fuse_a is not None and seed is not None)
    tiles, splits = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]), cfg["splits"]
    fuse = fuse_a is not None
    a = fuse_a if fuse else s
    part = part_s = arrived = out                                               # unused without split-K
    if splits > 1:
        part, part_s, arrived = _split_scratch(x.device, splits * tiles, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                               next_pow2(R))
    k.lora_gemm_kernel[(tiles, splits)](
        x, w, bias if bias is not None else out, s, e, rowscale if rowscale is not None else s,
        colscale if colscale is not None else s, a, out,
        part, part_s, arrived,
        M, N, K, R, cfg["k_per_split"],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        e.stride(0), e.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        scale, int(seed) if seed is not None else 0, p, 1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, HAS_ROWSCALE=rowscale is not None, HAS_COLSCALE=colscale is not None,
        FUSE_S=fuse, STORE_S=fuse and store_s,
        DROP_S=fuse and seed is not None, DROP_EPI=not fuse and seed is not None, SPLIT_K=splits > 1,
        UPCAST=upcast_dots(x.dtype), PRECISION=dot_precision(x.dtype), EPI_PRECISION=epi,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=next_pow2(R), GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("lora_gemm", "split_k" if splits > 1 else None)
    return out


_SPLIT_SCRATCH: dict = {}


def _split_scratch(device, parts, block_m, block_n, block_r):
    """(fp32 partials of acc, of S, int32 arrival counters) for the split-K decode GEMM,
    kept per (device, stream) and grown on demand: no allocation or memset per call (CUDA-
    graph capturable once warm). The counters start at zero and every launch leaves them
    at zero (its last split resets each tile's); one stream's launches run in order, so
    they never share a counter with a launch still running."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    part, part_s, arrived = _SPLIT_SCRATCH.get(key, (None, None, None))
    if part is None or part.numel() < parts * block_m * block_n:
        part = torch.empty(parts * block_m * block_n, dtype=torch.float32, device=device)
    if part_s is None or part_s.numel() < parts * block_m * block_r:
        part_s = torch.empty(parts * block_m * block_r, dtype=torch.float32, device=device)
    if arrived is None or arrived.numel() < parts:
        arrived = torch.zeros(max(parts, 1024), dtype=torch.int32, device=device)
    _SPLIT_SCRATCH[key] = (part, part_s, arrived)
    return part, part_s, arrived


def _rank_add(out, s, e, rowscale, scale, *, seed=None, p=0.0, colscale=None, bias=None):
    """``out += scale * rowscale * drop(s @ e)`` in place; out ``[M, N]`` with unit column
    stride (cuBLAS output), s ``[M, r]`` fp32, e ``[r, N]`` any strides and float dtype.
    With ``colscale`` ``[N]`` fp32 / ``bias`` ``[N]``: ``out = colscale * (out + ...) + bias``."""
    k = kernels("lora")
    M, N = out.shape
    R = s.shape[1]
    assert out.stride(1) == 1, "rank-r add needs a unit column stride"
    cfg = k.rank_add_config(M, N, cpu_configs(out), dropout=seed is not None)
    k.lora_rank_add_kernel[(-(-M // cfg["BLOCK_M"]), -(-N // cfg["BLOCK_N"]))](
        out, s, e, rowscale if rowscale is not None else s, colscale if colscale is not None else s,
        bias if bias is not None else out,
        M, N, R, out.stride(0), s.stride(0), s.stride(1), e.stride(0), e.stride(1),
        scale, int(seed) if seed is not None else 0, p, 1.0 / (1.0 - p),
        HAS_ROWSCALE=rowscale is not None, HAS_COLSCALE=colscale is not None, HAS_BIAS=bias is not None,
        DROPOUT=seed is not None, EPI_PRECISION="tf32" if out.dtype != torch.float32 else dot_precision(out.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=next_pow2(R), num_warps=cfg["num_warps"],
    )
    record_launch("lora_rank_add")
    return out


def linear_rank_r(path, x, w, bias, s, e, rowscale, scale, *, seed=None, p=0.0, colscale=None):
    """``colscale * (x @ w + scale * rowscale * drop(s @ e)) + bias`` by ``path`` (the LoRA
    forward with w = W^T, e = B^T; its dx with w = W, e = A; gated LoRA the same; DoRA's
    forward with colscale = m / n): our GEMM with the rank-r term in its accumulator
    (``kernel``), or cuBLAS and the in-place rank-r add."""
    if path == "kernel":
        return _gemm(x, w, bias, s, e, rowscale, scale, x.dtype, seed=seed, p=p, colscale=colscale)
    if colscale is not None:                                                     # bias after the column scale
        return _rank_add(torch.mm(x, w), s, e, rowscale, scale, seed=seed, p=p, colscale=colscale, bias=bias)
    out = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)           # cuBLAS, bias in its epilogue
    return _rank_add(out, s, e, rowscale, scale, seed=seed, p=p)


def _lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, gate: torch.Tensor | None, scaling: float, dropout_p: float,
    seed: torch.Tensor | None, path: str = "kernel", need_s: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on 2-D x: returns (y [T, out], S = drop(x) A^T [T, r] fp32; [0, r] when not
    ``need_s``: inference, where a GEMM that makes S keeps it on chip and allocates nothing)."""
    return forward_rows(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path, need_s)


def forward_rows(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path="kernel", need_s=True, *,
                 colscale=None):
    """``_lora_fwd``'s launches, with an optional per-output-column scale riding in the
    epilogue (DoRA: ``y = colscale * (x W^T + s S B^T) + b``, peftops/ops/dora.py)."""
    T, r = x.shape[0], lora_A.shape[0]
    if T == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, r), dtype=torch.float32)
    seed_v = None if seed is None else int(seed.item())                          # a CPU tensor: no device sync
    k = kernels("lora")
    fuse = T <= k.FUSE_S_MAX_ROWS or (k.TMA_FUSE_S and dropout_p == 0.0 and _use_tma(x, weight.t(), lora_A))
    if path == "kernel" and fuse:                                                # one launch: S made in the GEMM
        s = empty((T, r), torch.float32, x.device) if need_s else None
        y = _gemm(x, weight.t(), bias, s, lora_B.t(), gate, scaling, x.dtype, seed=seed_v, p=dropout_p,
                  fuse_a=lora_A, colscale=colscale)
        return y, (s if need_s else x.new_empty((0, r), dtype=torch.float32))
    s, _ = _skinny(x, e=lora_A.t(), seed=seed_v, p=dropout_p)                    # S = drop(x) A^T
    y = linear_rank_r(path, x, weight.t(), bias, s, lora_B.t(), gate, scaling,   # y = x W^T + b + g s S B^T
                      colscale=colscale)
    return y, (s if need_s else s[:0])


lora_fwd = torch.library.custom_op("peftops::lora_fwd", mutates_args=())(_lora_fwd)


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, gate, scaling, dropout_p, seed, path="kernel", need_s=True):
    s_rows = x.shape[0] if need_s else 0
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((s_rows, lora_A.shape[0]), dtype=torch.float32)


def _lora_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, gate: torch.Tensor | None, scaling: float, dropout_p: float,
    seed: torch.Tensor | None, need_dx: bool, path: str = "kernel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with W frozen: (dx or an empty tensor, dA, dB, dgate per row [T] fp32)."""
    T = x.shape[0]
    if T == 0:
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty(0)
        return dx, lora_A.new_zeros(lora_A.shape), lora_B.new_zeros(lora_B.shape), s.new_zeros(0)
    seed_v = None if seed is None else int(seed.item())
    # The gate g (per row) and the scaling s ride in the kernels: each scales its [T, r]
    # operand as it loads it, so no [T, r] product is launched here.
    dyb, d_b = _skinny(dy, e=lora_B, f=s, f_rowscale=gate, f_scale=scaling)     # dYB = dY B; dB = (g s dY)^T S
    dg = (dyb * s).sum(1) * scaling if gate is not None else s.new_zeros(0)      # dg = s <dY B, S>_r
    _, d_at = _skinny(x, f=dyb, f_rowscale=gate, f_scale=scaling,                # dA^T = drop(x)^T dS,
                      seed=seed_v, p=dropout_p)                                  #   dS = g s dY B  [T, r]
    dx = x.new_empty(0)
    if need_dx:                                                                  # dx = dY W + drop'(dS A)
        dx = linear_rank_r(path, dy, weight, None, dyb, lora_A, gate, scaling, seed=seed_v, p=dropout_p)
    return dx, d_at.t().to(lora_A.dtype).contiguous(), d_b.to(lora_B.dtype).contiguous(), dg


lora_bwd = torch.library.custom_op("peftops::lora_bwd", mutates_args=())(_lora_bwd)


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, s, gate, scaling, dropout_p, seed, need_dx, path="kernel"):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dg = s.new_empty(x.shape[0]) if gate is not None else s.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), dg


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device="cpu") -> torch.Tensor:
    """The 0/1 keep mask the LoRA kernels draw for ``seed`` over a ``[T, in]`` input (for
    tests and debugging: the kernels themselves regenerate it and never store it)."""
    k = kernels("lora")
    T, n = shape
    mask = empty((T, n), torch.float32, device)
    block = 64
    k.dropout_mask_kernel[(-(-T // block), -(-n // block))](
        mask, T, n, int(seed), p, 1.0 / (1.0 - p), BLOCK=block)
    return mask


