"""(IA)^3: ``peftops.ia3_linear`` -- checks, dispatch, autograd, launchers.

    feedforward=False:  y = l * (x W^T + b)      l [out]  (peft stores (out, 1))
    feedforward=True:   y = (x * l) W^T + b      l [in]   (peft stores (1, in))

Two paths, picked per shape by ``PATHS`` (DESIGN.md, Dispatch), both exact:
* ``kernel``: one Triton GEMM; l scales the x tile as it is loaded (input scaling) or the
  fp32 accumulator in the epilogue (output scaling). Backward: one GEMM for dx that also
  yields dl (algebra beside each launch in ``ia3_bwd``; why the output-scaling dl reads the
  saved output y: kernels/ia3.py).
* ``cublas``: W is frozen, so l is folded into it once per call, W' = diag(l) W (output
  scaling, and b' = l b) or W' = W diag(l) (input scaling): O(out * in) elementwise work
  instead of O(T * n) over the activations, then ONE cuBLAS GEMM. When the activations are
  smaller than W (``_fold``: T below the other dimension, e.g. decode) l scales them
  instead. Backward: dx by one cuBLAS GEMM against the saved W'; dl by one small fused
  pass (``ia3_colsum_kernel``) over two [T, n] tensors (algebra beside each line in
  ``ia3_cublas_bwd``).
dW / db, only when the base layer is trainable, are plain GEMMs on both paths.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, rows, upcast_dots

__all__ = ["ia3_linear", "PATHS"]

# Which path runs on CUDA, first matching row wins (shapes: T rows, d_in, d_out, feedforward).
PATHS = PathTable("ia3", paths=("kernel", "cublas"), default="kernel", rows=[
    (lambda **_: True, "cublas",
     "H100 2026-11-23 (shared/PERF.md), d = k = 4096, x base GEMM: our GEMM 1.36x (output scaling fwd "
     "T=8192), 1.75x (fwd+bwd), 2.7x (fwd T=16), 6.3x (input scaling fwd+bwd T=16); eager 1.21-1.33x, "
     "compile 1.08-1.17x. cublas = the base GEMM + O(out*in) fold (or O(T*n) scale below the fold "
     "threshold) + one [T, n] column-sum pass in backward: by bytes 1.06x fwd / 1.08x fwd+bwd at T=8192, "
     "~1.1x at T=16 (not yet measured: bench provider peftops[cublas])."),
])

# Output scaling recovers z = x W^T + b as y / l; columns with |l| at or below this are
# recomputed exactly instead (fp16's narrow exponent range makes tiny l * z subnormal).
_GUARD = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-100, torch.float32: 2.0**-100}


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    *,
    feedforward: bool,
) -> torch.Tensor:
    """(IA)^3 on a linear layer.

    x ``[..., in]``; weight ``[out, in]``; bias ``[out]`` or None. ``feedforward=False``:
    ``y = l * (x W^T + b)`` with ia3_l ``[out]`` or ``[out, 1]``; ``feedforward=True``:
    ``y = (x * l) W^T + b`` with ia3_l ``[in]`` or ``[1, in]``. ia3_l may be float32 while
    x is half precision (as peft keeps it); the output has x's dtype.
    """
    _check(x, weight, bias, ia3_l, feedforward)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("ia3", x, weight, bias, ia3_l, unsupported=unsupported):
        return reference.ia3_linear(x, weight, bias, ia3_l, feedforward=feedforward)
    path = PATHS.pick(x.is_cuda, T=x.numel() // max(x.shape[-1], 1), d_in=weight.shape[1], d_out=weight.shape[0],
                      feedforward=feedforward)
    # The flat view keeps autograd's shape bookkeeping: dl comes back in ia3_l's own shape.
    if path == "cublas":
        # In the inputs' dtype, as the kernel computes (autocast would recast the GEMM).
        with torch.autocast(x.device.type, enabled=False):
            return _IA3CublasFn.apply(x, weight, bias, ia3_l.reshape(-1), feedforward)
    return _IA3LinearFn.apply(x, weight, bias, ia3_l.reshape(-1), feedforward)


def _check(x, weight, bias, ia3_l, feedforward):
    if not isinstance(feedforward, bool):
        raise TypeError(f"feedforward must be a bool, got {type(feedforward).__name__}")
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("bias", bias, ndim=1, optional=True)
    _checks.tensor("ia3_l", ia3_l, ndim=(1, 2))
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight {tuple(weight.shape)} expects {in_f}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} has {out_f} outputs")
    n = in_f if feedforward else out_f
    allowed = [(n,), (1, n)] if feedforward else [(n,), (n, 1)]
    if tuple(ia3_l.shape) not in allowed:
        kind = "input (feedforward=True)" if feedforward else "output (feedforward=False)"
        raise ValueError(f"ia3_l has shape {tuple(ia3_l.shape)}; {kind} scaling of weight "
                         f"{tuple(weight.shape)} needs one of {allowed}")
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    if ia3_l.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"ia3_l has dtype {ia3_l.dtype}; it must be x's dtype {x.dtype} or torch.float32")
    _checks.same_device("x", x, weight=weight, bias=bias, ia3_l=ia3_l)


class _IA3LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, l, feedforward):
        lead = x.shape[:-1]
        x2 = rows(x)
        y = ia3_fwd(x2, weight, bias, l, feedforward).view(*lead, weight.shape[0])
        # Output scaling keeps y (the output itself: nothing extra is written) for dl.
        ctx.save_for_backward(x2, weight, bias, l, None if feedforward else y)
        ctx.feedforward, ctx.lead = feedforward, lead
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, l, y = ctx.saved_tensors
        need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
        ff = ctx.feedforward
        dy2 = rows(dy)
        dx = dl = None
        if need_x or need_l:
            y2 = x2.new_empty(0) if y is None else rows(y)
            dx2, dl = ia3_bwd(dy2, x2, y2, weight, bias, l, ff, need_x, need_l)
            dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
            dl = dl.to(l.dtype) if need_l else None
        dw, db = _base_grads(dy2, x2, weight, bias, l, ff, need_w, need_b)
        return dx, dw, db, dl, None


def _base_grads(dy2, x2, weight, bias, l, ff, need_w, need_b):
    """dW, db of a trainable base layer (None when not asked for)."""
    dw = db = None
    # Input scaling dW = dY^T (x * l), db = colsum(dY); output scaling dW = (dY * l)^T x,
    # db = l * colsum(dY).
    lf = l.to(x2.dtype)
    if need_w:
        dw = (dy2.t() @ (x2 * lf)) if ff else ((dy2 * lf).t() @ x2)
        dw = dw.to(weight.dtype)
    if need_b:
        col = dy2.sum(0, dtype=torch.float32)
        db = (col if ff else col * l.float()).to(bias.dtype)
    return dw, db


def _fold(T: int, out_f: int, in_f: int, feedforward: bool) -> bool:
    """Whether the cublas path folds l into W (O(out * in) elementwise work: read W, write W')
    rather than scaling the activations (O(T * n): read and write y [T, out] or x [T, in]).
    Folding is cheaper when out * in <= T * n, i.e. when the other dimension is at most T:
    T = 8192, d = 4096 folds (W' costs 2 * 32 MiB, scaling y would cost 2 * 64 MiB); decode
    (T = 16) scales the 16 rows instead of touching all of W twice more. The saved W' is
    then never larger than a [T, n] activation (what eager PyTorch saves for dl)."""
    return T > 0 and (out_f if feedforward else in_f) <= T


class _IA3CublasFn(torch.autograd.Function):
    """The ``cublas`` path: l folded into the frozen W once per call, one cuBLAS GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, l, feedforward):
        lead = x.shape[:-1]
        x2 = rows(x)
        T, (out_f, in_f) = x2.shape[0], weight.shape
        wf = None
        if _fold(T, out_f, in_f, feedforward):
            # W' = diag(l) W (output scaling) or W diag(l) (input scaling), rounded once to W's
            # dtype (out= keeps one pass, the product taken in fp32 when l is fp32).
            wf = torch.empty_like(weight)
            torch.mul(weight, l[:, None] if not feedforward else l[None, :], out=wf)
            # output: y = l * (x W^T + b) = x W'^T + l * b;   input: y = (x * l) W^T + b = x W'^T + b
            b = bias if (feedforward or bias is None) else (bias * l).to(bias.dtype)
            y2 = torch.nn.functional.linear(x2, wf, b)                          # one cuBLAS GEMM
        elif feedforward:
            xs = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
            torch.mul(x2, l, out=xs)                                             # x * l, rounded like eager
            y2 = torch.nn.functional.linear(xs, weight, bias)                    # (x * l) W^T + b
        else:
            y2 = torch.nn.functional.linear(x2, weight, bias)                    # z = x W^T + b
            y2.mul_(l)                                                           # y = l * z, in place
        y = y2.view(*lead, out_f)
        keep_wf = wf if ctx.needs_input_grad[0] else None                        # dx = dY W' needs it
        ctx.save_for_backward(x2, weight, bias, l, keep_wf, None if feedforward else y)
        ctx.feedforward, ctx.lead = feedforward, lead
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, l, wf, y = ctx.saved_tensors
        need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
        ff = ctx.feedforward
        dy2 = rows(dy)
        dx = dl = None
        if need_x or need_l:
            y2 = None if y is None else rows(y)
            dx2, dl = ia3_cublas_bwd(dy2, x2, y2, wf, weight, bias, l, ff, need_x, need_l)
            dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
            dl = dl.to(l.dtype) if need_l else None
        dw, db = _base_grads(dy2, x2, weight, bias, l, ff, need_w, need_b)
        return dx, dw, db, dl, None


# ------------------------------------------------------------------------ launchers
def _gemm(a, b, *, bias=None, in_scale=None, out_scale=None, y=None, epi_colsum=False,
          loop_colsum=False, guard=None, store=True, out_dtype=None):
    """``out = (a * in_scale) @ b (+ bias) (* out_scale)`` with a ``[M, K]``, b ``[K, N]``
    (any strides), plus the fp32 column-sum partials the flags ask for (see kernels/ia3.py).
    Returns (out or None, partials [row blocks, N or K] or None)."""
    k = kernels("ia3")
    M, K = a.shape
    N = b.shape[1]
    cfg = k.gemm_config(M, N, K, cpu_configs(a), colsum=epi_colsum, in_scale=in_scale is not None)
    m_blocks = -(-M // cfg["BLOCK_M"])
    out = empty((M, N), out_dtype or a.dtype, a.device) if store else None
    part = None
    if epi_colsum or loop_colsum:
        part = empty((m_blocks, N if epi_colsum else K), torch.float32, a.device)
    dummy = a
    grid = (m_blocks * -(-N // cfg["BLOCK_N"]),)
    k.ia3_gemm_kernel[grid](
        a, b, bias if bias is not None else dummy, in_scale if in_scale is not None else dummy,
        out_scale if out_scale is not None else dummy, y if y is not None else dummy,
        out if out is not None else dummy, part if part is not None else dummy,
        M, N, K, float(guard) if guard is not None else 0.0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *(y.stride() if y is not None else (0, 0)), *(out.stride() if out is not None else (0, 0)),
        A_SCALE=in_scale is not None, HAS_BIAS=bias is not None,
        OUT_SCALE=out_scale is not None and guard is None, EPI_COLSUM=epi_colsum,
        LOOP_COLSUM=loop_colsum, GUARD=guard is not None, STORE=store,
        UPCAST=upcast_dots(a.dtype), PRECISION=dot_precision(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    record_launch("ia3_gemm_guard" if guard is not None else "ia3_gemm")
    return out, part


def _colsum(a, y):
    """Partials ``[row blocks, N]`` of ``colsum(a * y)`` for a, y ``[M, N]``, fp32."""
    k = kernels("ia3")
    M, N = a.shape
    cfg = k.colsum_config(M, N, cpu_configs(a))
    m_blocks = -(-M // cfg["BLOCK_M"])
    part = empty((m_blocks, N), torch.float32, a.device)
    k.ia3_colsum_kernel[(m_blocks, -(-N // cfg["BLOCK_N"]))](
        a, y, part, M, N, a.stride(0), a.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    record_launch("ia3_colsum")
    return part


@torch.library.custom_op("peftops::ia3_fwd", mutates_args=())
def ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
            feedforward: bool) -> torch.Tensor:
    """Fused forward on 2-D x: y [T, out] in x's dtype."""
    T, out_f = x.shape[0], weight.shape[0]
    if T == 0:
        return x.new_empty((0, out_f))
    if feedforward:                                                   # y = (x * l) W^T + b
        y, _ = _gemm(x, weight.t(), bias=bias, in_scale=l)
    else:                                                             # y = l * (x W^T + b)
        y, _ = _gemm(x, weight.t(), bias=bias, out_scale=l)
    return y


@ia3_fwd.register_fake
def _(x, weight, bias, l, feedforward):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("peftops::ia3_bwd", mutates_args=())
def ia3_bwd(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, l: torch.Tensor, feedforward: bool, need_dx: bool,
            need_dl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward with W frozen on 2-D tensors: (dx or an empty tensor, dl [n] fp32 or
    an empty tensor). ``y`` is the forward output (output scaling only)."""
    T, in_f = x.shape
    n = l.shape[0]
    empty_dx = x.new_empty(0)
    if T == 0:
        return (x.new_zeros(x.shape) if need_dx else empty_dx), l.new_zeros(n, dtype=torch.float32)
    if feedforward:
        # G = dY W [T, in];  dx = G * l (epilogue);  dl = colsum(x * G) (epilogue partials)
        dx, part = _gemm(dy, weight, out_scale=l, y=x, epi_colsum=need_dl, store=need_dx,
                         out_dtype=x.dtype)
        dl = part.sum(0) if need_dl else l.new_empty(0, dtype=torch.float32)
        return (dx if need_dx else empty_dx), dl
    # dx = (dY * l) W: l scales each dY tile as it is loaded; the same tiles give the
    # partials of colsum(dY * y) in the main loop (first column block only).
    if need_dx:
        dx, part = _gemm(dy, weight, in_scale=l, y=y, loop_colsum=need_dl, out_dtype=x.dtype)
    else:
        dx, part = empty_dx, _colsum(dy, y)
    if not need_dl:
        return dx, l.new_empty(0, dtype=torch.float32)
    # dl = colsum(dY * z) with z = x W^T + b = y / l, except where |l| <= guard: there the
    # guard launch recomputes z = x W^T + b for those column blocks only (no host sync).
    lf = l.float()
    guard = _GUARD[x.dtype]
    small = lf.abs() <= guard
    _, gpart = _gemm(x, weight.t(), bias=bias, out_scale=l, y=dy, epi_colsum=True, guard=guard, store=False)
    dl = torch.where(small, gpart.sum(0), part.sum(0) / torch.where(small, 1.0, lf))
    return dx, dl


@ia3_bwd.register_fake
def _(dy, x, y, weight, bias, l, feedforward, need_dx, need_dl):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dl = l.new_empty(l.shape[0], dtype=torch.float32) if need_dl else l.new_empty(0, dtype=torch.float32)
    return dx, dl


@torch.library.custom_op("peftops::ia3_cublas_bwd", mutates_args=())
def ia3_cublas_bwd(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, wf: torch.Tensor | None,
                   weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor, feedforward: bool,
                   need_dx: bool, need_dl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the ``cublas`` path with W frozen, 2-D tensors: (dx or an empty tensor,
    dl [n] fp32 or an empty tensor). ``wf`` is the folded W' when the forward folded and dx
    is needed (else None); ``y`` the forward output (output scaling only)."""
    with torch.autocast(x.device.type, enabled=False):                          # the inputs' dtype, as forward
        return _cublas_bwd(dy, x, y, wf, weight, bias, l, feedforward, need_dx, need_dl)


def _cublas_bwd(dy, x, y, wf, weight, bias, l, feedforward, need_dx, need_dl):
    T = x.shape[0]
    n = l.shape[0]
    no_dx, no_dl = x.new_empty(0), l.new_empty(0, dtype=torch.float32)
    if T == 0:
        return (x.new_zeros(x.shape) if need_dx else no_dx), (l.new_zeros(n, dtype=torch.float32) if need_dl else no_dl)
    lf = l.float()
    guard = _GUARD[x.dtype]
    small = lf.abs() <= guard
    dx, dl = no_dx, no_dl
    if not feedforward:
        # y = l * z, z = x W^T + b:   dx = (dY * l) W = dY (diag(l) W) = dY W'
        if need_dx:
            if wf is not None:
                dx = dy @ wf                                                     # one cuBLAS GEMM
            else:
                dyl = torch.empty(dy.shape, dtype=x.dtype, device=x.device)
                torch.mul(dy, l, out=dyl)                                        # dY * l ([T, out], T small)
                dx = dyl @ weight
        if need_dl:
            # dl = colsum(dY * z) = colsum(dY * y) / l: one fused pass reading dY and y (the
            # output, saved at no cost); no GEMM. |l| <= guard: z recomputed for those column
            # blocks only by the guard launch (no host sync; a no-op launch when there are none).
            part = _colsum(dy, y)
            _, gpart = _gemm(x, weight.t(), bias=bias, out_scale=l, y=dy, epi_colsum=True, guard=guard, store=False)
            dl = torch.where(small, gpart.sum(0), part.sum(0) / torch.where(small, 1.0, lf))
        return dx, dl
    # y = (x * l) W^T + b:   G = dY W [T, in];  dx = G * l = dY (W diag(l)) = dY W';  dl = colsum(x * G)
    if wf is not None:
        dx = dy @ wf                                                             # dx = dY W' (cuBLAS)
        if need_dl:
            # colsum(x * dx) = l * colsum(x * G): one fused pass reading x and dx, then / l;
            # |l| <= guard: colsum(x * G) for those column blocks by the guard launch.
            part = _colsum(x, dx)
            _, gpart = _gemm(dy, weight, out_scale=l, y=x, epi_colsum=True, guard=guard, store=False)
            dl = torch.where(small, gpart.sum(0), part.sum(0) / torch.where(small, 1.0, lf))
        return (dx if need_dx else no_dx), dl
    g = dy @ weight                                                              # G = dY W (cuBLAS)
    if need_dl:
        dl = _colsum(x, g).sum(0)                                                # colsum(x * G), exact
    if need_dx:
        dx = g.mul_(l)                                                           # dx = G * l, in place
    return dx, dl


@ia3_cublas_bwd.register_fake
def _(dy, x, y, wf, weight, bias, l, feedforward, need_dx, need_dl):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dl = l.new_empty(l.shape[0], dtype=torch.float32) if need_dl else l.new_empty(0, dtype=torch.float32)
    return dx, dl
