"""DoRA: ``peftops.dora_linear`` -- checks, dispatch, autograd, launchers.

    y = c * (x W^T + s (x A^T) B^T) + b,   c = m / n,   n_i = ||W_i + s (B A)_i||  (detached)

The forward is the LoRA forward (peftops/ops/lora.py ``forward_rows``, either of its paths)
with ``c`` riding in the GEMM / rank-add epilogue as a per-output-column scale (before the
bias, which DoRA does not scale), plus one pass over W (kernels/dora.py ``dora_norm_kernel``)
for n without any ``[out, in]`` tensor:

    n_i^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

``||W_i||^2`` is kept per frozen W (``DoraNormCache``), and so is n itself while W, A and B
are unchanged (eval, decode, gradient-accumulation micro-steps): then the forward is the
LoRA forward alone. The cache knows each tensor by its storage (a weak reference: the same
storage object, not an address that may be reused) plus offset, version counter, shape,
strides, dtype; peftops' modules also clear it on merge / unmerge (``weight.data += ...``
bypasses the version counter).

Backward (W frozen, n detached as in peft; algebra beside each launch in ``_bwd_rows``):
one pass over dY and the saved output y gives dY' = c dY and sum_t dY (y - b) (y - b = c u,
so dm = that / m: no undivided [T, out] u is kept; where m_j = 0 that column's u is
recomputed from x, W_j and S, found by one host sync per backward); then the LoRA backward
on dY' (written once by that pass: the dx GEMM's operands go straight from shared memory to
the MMA, so a column scale on its K dimension would cost more than the pass).

Dropout > 0 (training) follows peft: the direction's base part runs on drop(x),
``y = x W^T + b + (c - 1) drop(x) W^T + c s drop(x) A^T B^T``: the ``composed`` path
(our norm kernel and dropout mask, eager GEMMs, autograd for the rest; it materialises
drop(x) [T, in] as peft does, never an [out, in] tensor).

Interface for a quantised base (QDoRA): ``norm_rows``, ``_fwd_rows`` and ``_bwd_rows`` take
the dense base weight as an argument at each point of use (the norm pass and the base GEMM
in forward, dx in backward) and keep no reference to it, so a caller holding a 4-bit W can
dequantise into a workspace, call them, and dequantise again for backward, never saving
the dense W. They take 2-D x ``[T, in]`` and return / expect the tensors listed there:
``norm_rows(W, A, B, s, wsq=None) -> (n, wsq)``; ``_fwd_rows(x, W, bias, A, B, m, n, s, path,
need_s) -> (y, S, c)``; ``_bwd_rows(dy, y, x, W, bias, A, B, m, n, S, c, s, need_dx, path) ->
(dx, dA, dB, dm, c dY)``. A QDoRA autograd Function saves x, y, S, c, n, A, B, m and the
packed W (``_DoraLinearFn`` here is the dense one), and may pass a cached ``wsq`` (||W_i||^2
of the dequantised W: constant while the 4-bit W is).
"""
from __future__ import annotations

import weakref

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import cpu_configs, dot_precision, empty, kernels, new_seed, next_pow2, num_sms, pick, rows
from . import lora as _lora

__all__ = ["dora_linear", "dora_weight_norm", "DoraNormCache", "PATHS"]

# Which path runs on CUDA, first matching row wins (shapes: T rows, d_in, d_out, r). The
# DoRA-specific passes are the same on both; this picks the LoRA GEMM underneath, as
# peftops/ops/lora.py PATHS does (same evidence until a GPU run of bench case "dora").
PATHS = PathTable("dora", paths=("kernel", "cublas"), default="kernel", rows=[
    (lambda **_: True, "cublas",
     "follows lora's table (H100 2026-11-23: cuBLAS base GEMM + rank-r add 1.22-1.47x the base GEMM); "
     "bench case dora, provider peftops[kernel], decides when it moves"),
])


# ------------------------------------------------------------------------ norm cache
def _key(t: torch.Tensor):
    """(storage, the rest of t's identity) or None (not cacheable: inference tensors keep
    no version counter)."""
    try:
        return t.untyped_storage(), (t.storage_offset(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype,
                                     str(t.device))
    except (RuntimeError, NotImplementedError):
        return None


class DoraNormCache:
    """Per-layer cache of ``||W_i||^2`` (per frozen W) and of n (per W, A, B, scaling).

    Each tensor is recognised by its storage (a weak reference: the same storage object,
    not just the same address) and its offset, version counter, shape, strides, dtype:
    ``weight.data = ...`` (peft's DoRA merge) gives a new storage, ``copy_`` (``load_state_dict``)
    and an optimizer step bump the version. ``clear()`` is the explicit hook for writes that
    bypass both (``weight.data += ...``: peft's plain-LoRA merge); peftops' modules call it
    on merge / unmerge."""

    def __init__(self):
        self._wsq = None       # (entry of W, [out] fp32)
        self._norm = []        # [(entries of W, A, B, scaling), n [out] fp32], newest last

    def clear(self) -> None:
        self._wsq, self._norm = None, []

    def __getstate__(self):  # pickling / deepcopy of a model: the copy starts empty (weak refs do not pickle)
        return {}

    def __setstate__(self, state):
        self.clear()

    @staticmethod
    def _entries(*ts):
        keys = [_key(t) for t in ts]
        if any(k is None for k in keys):
            return None
        return [(weakref.ref(st), rest) for st, rest in keys], [st for st, _ in keys]

    @staticmethod
    def _same(stored, live):
        entries, storages = live
        return all(ref() is st and rest == r2 for (ref, rest), (_, r2), st in zip(stored, entries, storages))

    def get_wsq(self, weight):
        live = self._entries(weight)
        if live is None or self._wsq is None or not self._same(self._wsq[0], live):
            return None
        return self._wsq[1]

    def put_wsq(self, weight, wsq):
        live = self._entries(weight)
        if live is not None:
            self._wsq = (live[0], wsq)

    def get_norm(self, weight, lora_A, lora_B, scaling):
        live = self._entries(weight, lora_A, lora_B)
        if live is None:
            return None
        for (entries, sc), n in self._norm:
            if sc == float(scaling) and self._same(entries, live):
                return n
        return None

    def put_norm(self, weight, lora_A, lora_B, scaling, n):
        live = self._entries(weight, lora_A, lora_B)
        if live is not None:
            self._norm = [e for e in self._norm if all(ref() is not None for ref, _ in e[0][0])][-7:]
            self._norm.append(((live[0], float(scaling)), n))


# ------------------------------------------------------------------------ public op
def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    norm_cache: DoraNormCache | None = None,
) -> torch.Tensor:
    """``y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b``, the norm detached.

    x ``[..., in]``; weight ``[out, in]`` (any strides: a Conv1D weight as its ``.t()``);
    bias ``[out]`` or None; lora_A ``[r, in]``; lora_B ``[out, r]``; magnitude ``[out]``
    (peft's ``lora_magnitude_vector``); scaling a Python float. ``dropout_p > 0`` means
    dropout is active (training): the base part of the direction then runs on drop(x), as
    in peft. ``norm_cache`` (a ``DoraNormCache`` the caller keeps per layer) reuses
    ``||W||^2`` and n across calls.
    """
    scaling, dropout_p = _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("dora", x, weight, bias, lora_A, lora_B, magnitude, unsupported=unsupported):
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p)
    if torch.compiler.is_compiling():
        norm_cache = None                                                        # keys read data pointers
    n = norm_cache.get_norm(weight, lora_A, lora_B, scaling) if norm_cache is not None else None
    if n is None and norm_cache is None:
        n = pick(dora_norm, _dora_norm, weight)(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)[0]
    elif n is None:
        wsq = norm_cache.get_wsq(weight) if norm_cache is not None else None
        n, wsq = norm_rows(weight, lora_A, lora_B, scaling, wsq)
        if norm_cache is not None:
            norm_cache.put_wsq(weight, wsq)
            norm_cache.put_norm(weight, lora_A, lora_B, scaling, n)
    if dropout_p > 0.0:
        return _composed(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, n)
    path = PATHS.pick(x.is_cuda, T=x.numel() // max(x.shape[-1], 1), d_in=weight.shape[1], d_out=weight.shape[0],
                      r=lora_A.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, lora_A, lora_B, magnitude)):
        return _DoraLinearFn.apply(x, weight, bias, lora_A, lora_B, magnitude, n, scaling, path)
    x2 = rows(x)
    y2 = pick(dora_fwd, _dora_fwd, x2)(x2, weight, bias, lora_A, lora_B, magnitude, n, scaling, path, False)[0]
    return y2.view(*x.shape[:-1], weight.shape[0])


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     *, norm_cache: DoraNormCache | None = None) -> torch.Tensor:
    """``n_i = ||W_i + scaling (B A)_i||`` ([out] fp32, no gradient) by the identity, without
    an [out, in] tensor (the reference's direct form off the kernels' path)."""
    if not use_triton("dora_norm", weight, lora_A, lora_B,
                      unsupported="float64" if weight.dtype == torch.float64 else None):
        return reference.dora_weight_norm(weight, lora_A, lora_B, scaling)
    if norm_cache is not None and not torch.compiler.is_compiling():
        n = norm_cache.get_norm(weight, lora_A, lora_B, scaling)
        if n is None:
            n, wsq = norm_rows(weight, lora_A, lora_B, scaling, norm_cache.get_wsq(weight))
            norm_cache.put_wsq(weight, wsq)
            norm_cache.put_norm(weight, lora_A, lora_B, scaling, n)
        return n
    return pick(dora_norm, _dora_norm, weight)(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)[0]


def _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p):
    scaling, dropout_p = _lora._check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, None)
    _checks.tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude has shape {tuple(magnitude.shape)} but weight {tuple(weight.shape)} has "
                         f"{weight.shape[0]} outputs: expected [{weight.shape[0]}]")
    if magnitude.dtype not in (lora_A.dtype, torch.float32):
        raise TypeError(f"magnitude has dtype {magnitude.dtype}: expected lora_A's ({lora_A.dtype}) or float32")
    _checks.same_device("x", x, magnitude=magnitude)
    return scaling, dropout_p


# ------------------------------------------------------------------------ autograd
class _DoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, n, scaling, path):
        x2 = rows(x)
        y2, s, c = pick(dora_fwd, _dora_fwd, x2)(x2, weight, bias, lora_A, lora_B, magnitude, n, scaling, path,
                                                 True)
        y = y2.view(*x.shape[:-1], weight.shape[0])
        # y itself is saved (an output: often kept by the next op anyway) instead of u.
        ctx.save_for_backward(x2, weight, bias, lora_A, lora_B, magnitude, n, s, c, y2)
        ctx.scaling, ctx.lead, ctx.path = scaling, x.shape[:-1], path
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, lora_A, lora_B, magnitude, n, s, c, y2 = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        dy2 = rows(dy)
        dx2, d_a, d_b, d_m, dyc = pick(dora_bwd, _dora_bwd, dy2)(dy2, y2, x2, weight, bias, lora_A, lora_B,
                                                                 magnitude, n, s, c, ctx.scaling, need_x,
                                                                 ctx.path)
        dx = dx2.view(*ctx.lead, x2.shape[1]) if need_x else None
        dw = (dyc.t() @ x2).to(weight.dtype) if need_w else None                 # n detached: dW = (c dY)^T x
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_b else None
        return (dx, dw, db, d_a if need_a else None, d_b if need_bb else None, d_m if need_m else None,
                None, None, None)


# ------------------------------------------------------------------------ launchers
def norm_rows(weight, lora_A, lora_B, scaling, wsq=None, magnitude=None):
    """(n [out] fp32, ||W_i||^2 [out] fp32) by ``dora_norm_kernel``: one read of ``weight``
    [out, in] (any strides); ``wsq`` given: its row sums are not recomputed. With
    ``magnitude`` also returns c = m / n (third element)."""
    k = kernels("dora")
    N, K = weight.shape
    R = lora_A.shape[0]
    dev = weight.device
    new_wsq = wsq is None
    if new_wsq:
        wsq = empty((N,), torch.float32, dev)
    n = empty((N,), torch.float32, dev)
    c = empty((N,), torch.float32, dev)
    m = magnitude if magnitude is not None else n                                # n: a pointer only read for c
    if N:
        cfg = k.norm_config(N, K, cpu_configs(weight))
        all32 = weight.dtype == torch.float32 and lora_A.dtype == torch.float32 and lora_B.dtype == torch.float32
        k.dora_norm_kernel[(-(-N // cfg["BLOCK_N"]),)](
            weight, lora_A, lora_B, m, wsq, n, c,
            N, K, R,
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            float(scaling),
            ROW_SQ=new_wsq, PRECISION=dot_precision(torch.float32) if all32 else "tf32",
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=next_pow2(R),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        record_launch("dora_norm", "row_sq" if new_wsq else None)
    return (n, wsq, c) if magnitude is not None else (n, wsq)


def _grad_prep(dy, y, c, bias):
    """(dY' = c dY [T, out] in dY's dtype, sum_t dY (y - b) [out] fp32) by one pass."""
    k = kernels("dora")
    M, N = dy.shape
    cfg = k.grad_config(M, N, 2 * num_sms(dy.device), cpu_configs(dy))
    dyc = empty((M, N), dy.dtype, dy.device)
    part = empty((cfg["splits"], N), torch.float32, dy.device)
    k.dora_grad_kernel[(-(-N // cfg["BLOCK_N"]), cfg["splits"])](
        dy, y, c, bias if bias is not None else c, dyc, part,
        M, N, cfg["rows_per_split"],
        dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), dyc.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    record_launch("dora_grad")
    return dyc, part.sum(0)


def _fwd_rows(x, weight, bias, lora_A, lora_B, magnitude, n, scaling, path="kernel", need_s=True):
    """Forward on 2-D x, n given ([out] fp32): (y [T, out], S = x A^T [T, r] fp32 (empty
    unless ``need_s``), c = m / n [out] fp32). ``weight`` is read here (the base GEMM) and
    not kept."""
    c = magnitude.float() / n                                                    # [out]: one tiny launch
    # y = c * (x W^T + s S B^T) + b: the LoRA forward, c in its epilogue before the bias
    y, s = _lora.forward_rows(x, weight, bias, lora_A, lora_B, None, scaling, 0.0, None, path, need_s, colscale=c)
    return y, s, c


def _bwd_rows(dy, y, x, weight, bias, lora_A, lora_B, magnitude, n, s, c, scaling, need_dx, path="kernel"):
    """Backward on 2-D rows: (dx or empty, dA, dB, dm, dY' = c dY). ``weight`` is read for dx
    (and for a column with m = 0) and not kept."""
    T = x.shape[0]
    if T == 0:
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty(0)
        return (dx, lora_A.new_zeros(lora_A.shape), lora_B.new_zeros(lora_B.shape),
                magnitude.new_zeros(magnitude.shape), dy.new_zeros(dy.shape))
    # y = c u + b with u = x W^T + s S B^T and n detached:
    #   dm_j = sum_t dY_tj u_tj / n_j = sum_t dY_tj (y_tj - b_j) / (c_j n_j) = colsum_j / m_j
    #   du   = c dY  (=: dY', the LoRA backward's dY)
    dyc, colsum = _grad_prep(dy, y, c, bias)                                     # one pass over dY and y
    m = magnitude.float()
    dm = colsum / m
    zero = m == 0
    if bool(zero.any()):                                                         # y - b = 0 there: u from x, W_j, S
        j = zero.nonzero().squeeze(1)
        w_j = weight.index_select(0, j)
        u_j = x @ w_j.t().to(x.dtype) + scaling * (s @ lora_B.index_select(0, j).float().t()).to(x.dtype)
        dm[j] = (dy.index_select(1, j).float() * u_j.float()).sum(0) / n[j]
    # LoRA backward on dY' (peftops/ops/lora.py _lora_bwd, algebra beside its launches):
    #   dYB = dY' B; dB = s dY'^T S; dA = s (dY' B)^T x; dx = dY' W + s (dY' B) A
    dx, d_a, d_b, _ = _lora._lora_bwd(dyc, x, weight, lora_A, lora_B, s, None, scaling, 0.0, None, need_dx, path)
    return dx, d_a, d_b, dm.to(magnitude.dtype), dyc


def _dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_rows(weight, lora_A, lora_B, scaling)


dora_norm = torch.library.custom_op("peftops::dora_norm", mutates_args=())(_dora_norm)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, scaling):
    return (weight.new_empty((weight.shape[0],), dtype=torch.float32),
            weight.new_empty((weight.shape[0],), dtype=torch.float32))


def _dora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, magnitude: torch.Tensor, n: torch.Tensor, scaling: float, path: str = "kernel",
              need_s: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_rows(x, weight, bias, lora_A, lora_B, magnitude, n, scaling, path, need_s)


dora_fwd = torch.library.custom_op("peftops::dora_fwd", mutates_args=())(_dora_fwd)


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, n, scaling, path="kernel", need_s=True):
    s_rows = x.shape[0] if need_s else 0
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((s_rows, lora_A.shape[0]), dtype=torch.float32),
            n.new_empty(n.shape))


def _dora_bwd(dy: torch.Tensor, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, n: torch.Tensor, s: torch.Tensor,
              c: torch.Tensor, scaling: float, need_dx: bool, path: str = "kernel",
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_rows(dy, y, x, weight, bias, lora_A, lora_B, magnitude, n, s, c, scaling, need_dx, path)


dora_bwd = torch.library.custom_op("peftops::dora_bwd", mutates_args=())(_dora_bwd)


@dora_bwd.register_fake
def _(dy, y, x, weight, bias, lora_A, lora_B, magnitude, n, s, c, scaling, need_dx, path="kernel"):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return (dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape),
            dy.new_empty(dy.shape))


# ------------------------------------------------------------------------ dropout (training)
def _composed(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, n):
    """peft's training form with dropout: ``x W^T + b + (c - 1) drop(x) W^T + c s drop(x) A^T B^T``
    with our n (no [out, in] tensor) and our dropout mask; eager GEMMs, autograd for the rest."""
    record_launch("dora_composed")
    mask = _lora.dropout_mask(int(new_seed().item()), (x.numel() // x.shape[-1], x.shape[-1]), dropout_p, x.device)
    return reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=dropout_p,
                                 dropout_mask=mask.view(x.shape), weight_norm=n)
