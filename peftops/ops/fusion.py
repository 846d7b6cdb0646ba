"""AdapterFusion: ``peftops.adapter_fusion`` -- checks, dispatch, autograd, launchers.

    out = residual + sum_n a_n (u_n Wv^T),   a = softmax_n( Q . (u_n Wk^T + bk) / tau ),
    Q = q Wq^T + bq

The eager formula (``reference.adapter_fusion``) runs 2N + 1 [T, d] x [d, d] GEMMs. Here
linearity brings it to three whatever N is:

    Q . (Wk u_n + bk) = u_n . (Wk^T Q) + Q . bk
        -> qk = Q Wk (one GEMM); Q . bk is the same for every n, so it cancels in the
           softmax (and dL/dbk is exactly zero);
    sum_n a_n (Wv u_n) = Wv (sum_n a_n u_n)
        -> one GEMM on the mixed m = sum_n a_n u_n.

Forward: Q = q Wq^T + bq, qk = Q Wk (cuBLAS); one pass over u [T, N, d] gives
a = softmax(u qk / tau) and m = sum_n a_n u_n; out = residual + m Wv^T (cuBLAS addmm).
Backward (algebra beside each step in ``_AdapterFusionFn.backward``): two GEMMs for dm and
dWv, one pass over u for du and dqk, then dQ, dWk, dq, dWq, dbq by GEMMs.

Two paths for the passes over u, picked per shape by ``PATHS`` (DESIGN.md, Dispatch), both
exact; the GEMMs are the same cuBLAS calls on both:
* ``kernel``: one Triton program per token (``fusion_fwd`` / ``fusion_bwd``), u read once
  (twice in backward), scores and softmax in fp32 registers.
* ``eager``: batched matrix products over the tokens (``_mix_fwd`` / ``_mix_bwd``): scores
  ``bmm(u, qk)``, the mix ``bmm(a, u)``; backward ``bmm(u, dm)`` for the softmax Jacobian,
  du = ``bmm([a | w], [dm ; qk])`` in one product and dqk = ``bmm(w, u)``.
"""
from __future__ import annotations

import torch

from .. import _checks, reference
from .._dispatch import PathTable, record_launch, use_triton
from .._launch import empty, kernels

__all__ = ["adapter_fusion", "PATHS"]

# Which path runs on CUDA, first matching row wins (shapes: T tokens, d, N adapters, train).
PATHS = PathTable("adapter_fusion", paths=("kernel", "eager"), default="kernel", rows=[
    (lambda d, N, **_: d <= 1024 and N <= 3, "eager",
     "H100 2026-11-23 (shared/PERF.md) T=8192 d=1024 N=3: fwd+bwd eager 1.36 ms, compile 1.20 vs ours 1.58; "
     "fwd compile 0.238 vs ours 0.333 (eager, the 2N+1-GEMM reference, 0.419). This path is ours' 3 GEMMs "
     "(~0.07 ms at d=1024) with the row kernels replaced by batched products over u (50 MB per pass, ~0.02 ms "
     "each at HBM speed): expected ~0.13 ms fwd, unmeasured (bench provider peftops[eager])"),
    (lambda **_: True, "kernel",
     "H100 2026-11-23 T=8192: d=4096 N=2 / 3 / 8 / 16 ours 1.25 / 1.33 / 1.55 / 2.43 ms fwd and 3.64 / 3.84 "
     "/ 4.41 / 6.04 fwd+bwd vs eager 2.33-15.9 / 7.37-69.6 and compile 2.80 / 8.64 (N=3) (bench/results, "
     "shared/PERF.md); d=1024 N=8 fwd+bwd ours 1.54 vs compile 1.89, eager 2.74"),
])


def adapter_fusion(
    query: torch.Tensor,
    adapter_outputs: torch.Tensor,
    residual: torch.Tensor,
    query_weight: torch.Tensor,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``residual + sum_n softmax_n(Q(q) . K(u_n) / tau) V(u_n)`` (AdapterHub ``dynamic``).

    query, residual ``[..., d]``; adapter_outputs ``[..., N, d]`` (the N adapters' outputs
    before the residual); query_weight / key_weight / value_weight ``[d, d]`` (nn.Linear
    layout); query_bias / key_bias ``[d]`` or None; V has no bias; temperature ``tau > 0``.
    The gradient for key_bias is exactly zero (its term is constant over the adapters).
    """
    temperature = _check(query, adapter_outputs, residual, query_weight, query_bias, key_weight,
                         key_bias, value_weight, temperature)
    unsupported = "float64" if query.dtype == torch.float64 else None
    tensors = (query, adapter_outputs, residual, query_weight, query_bias, key_weight, key_bias, value_weight)
    if not use_triton("adapter_fusion", *tensors, unsupported=unsupported):
        return reference.adapter_fusion(query, adapter_outputs, residual, query_weight, query_bias,
                                        key_weight, key_bias, value_weight, temperature=temperature)
    path = PATHS.pick(query.is_cuda, T=query.numel() // query.shape[-1], d=query.shape[-1],
                      N=adapter_outputs.shape[-2],
                      train=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    return _AdapterFusionFn.apply(query, adapter_outputs, residual, query_weight, query_bias,
                                  key_weight, key_bias, value_weight, temperature, path)


def _check(query, u, residual, wq, bq, wk, bk, wv, temperature):
    _checks.tensor("query", query)
    if query.dim() < 1:
        raise ValueError(f"query must have at least 1 dim [..., d], got shape {tuple(query.shape)}")
    _checks.tensor("adapter_outputs", u)
    _checks.tensor("residual", residual)
    d = query.shape[-1]
    if d == 0:
        raise ValueError(f"query has d = 0 features (shape {tuple(query.shape)})")
    if u.dim() != query.dim() + 1 or tuple(u.shape[:-2]) != tuple(query.shape[:-1]) or u.shape[-1] != d:
        raise ValueError(f"adapter_outputs has shape {tuple(u.shape)}, expected [..., N, {d}] with "
                         f"[...] = {tuple(query.shape[:-1])} for query {tuple(query.shape)}")
    if u.shape[-2] == 0:
        raise ValueError(f"adapter_outputs has N = 0 adapters (shape {tuple(u.shape)}): N must be >= 1")
    if tuple(residual.shape) != tuple(query.shape):
        raise ValueError(f"residual has shape {tuple(residual.shape)} but query has shape {tuple(query.shape)}")
    for name, w in (("query_weight", wq), ("key_weight", wk), ("value_weight", wv)):
        _checks.tensor(name, w, ndim=2)
        if tuple(w.shape) != (d, d):
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected [{d}, {d}] for query {tuple(query.shape)}")
    for name, b in (("query_bias", bq), ("key_bias", bk)):
        _checks.tensor(name, b, ndim=1, optional=True)
        if b is not None and b.shape[0] != d:
            raise ValueError(f"{name} has shape {tuple(b.shape)}, expected [{d}] for query {tuple(query.shape)}")
    others = dict(adapter_outputs=u, residual=residual, query_weight=wq, query_bias=bq,
                  key_weight=wk, key_bias=bk, value_weight=wv)
    _checks.same_dtype("query", query, **others)
    _checks.same_device("query", query, **others)
    temperature = _checks.finite_scalar("temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


class _AdapterFusionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, adapter_outputs, residual, wq, bq, wk, bk, wv, temperature, path):
        lead, d = query.shape[:-1], query.shape[-1]
        n_adapters = adapter_outputs.shape[-2]
        q2 = query.reshape(-1, d)
        u3 = adapter_outputs.reshape(-1, n_adapters, d)
        r2 = residual.reshape(-1, d)
        # Q = q Wq^T + bq;  qk = Q Wk  (so that Q . (Wk u_n) = u_n . qk).
        qq = torch.addmm(bq, q2, wq.t()) if bq is not None else q2 @ wq.t()
        qk = qq @ wk
        # a = softmax_n(u_n . qk / tau), m = sum_n a_n u_n  (one Triton pass over u, or two
        # batched products on the eager path).
        m, a = fusion_fwd(u3, qk, temperature) if path == "kernel" else _mix_fwd(u3, qk, temperature)
        # out = residual + m Wv^T.
        out = torch.addmm(r2, m, wv.t())
        ctx.save_for_backward(q2, u3, qq, qk, m, a, wq, wk, wv)
        ctx.temperature, ctx.shapes, ctx.path = temperature, (query.shape, adapter_outputs.shape), path
        ctx.has_bq, ctx.has_bk = bq is not None, bk is not None
        return out.view(*lead, d)

    @staticmethod
    def backward(ctx, dout):
        q2, u3, qq, qk, m, a, wq, wk, wv = ctx.saved_tensors
        need_q, need_u, need_r, need_wq, need_bq, need_wk, need_bk, need_wv = ctx.needs_input_grad[:8]
        q_shape, u_shape = ctx.shapes
        d = q2.shape[1]
        g = dout.reshape(-1, d)
        # out = r + m Wv^T:  dr = dOut;  dWv = dOut^T m;  dm = dOut Wv.
        d_r = dout if need_r else None
        d_wv = (g.t() @ m) if need_wv else None
        need_pass = need_q or need_u or need_wq or need_bq or need_wk
        d_q = d_u = d_wq = d_bq = d_wk = None
        if need_pass:
            dm = g @ wv
            # The Triton pass (algebra in kernels/fusion.py):
            #   g_n = u_n . dm,  ds_n = a_n (g_n - sum_k a_k g_k),  w_n = ds_n / tau,
            #   du_n = a_n dm + w_n qk,  dqk = sum_n w_n u_n.
            if ctx.path == "kernel":
                du3, dqk = fusion_bwd(u3, qk, a, dm, ctx.temperature)
            else:
                du3, dqk = _mix_bwd(u3, qk, a, dm, ctx.temperature)
            if need_u:
                d_u = du3.view(u_shape)
            if need_q or need_wq or need_bq or need_wk:
                # qk = Q Wk:  dQ = dqk Wk^T;  dWk = Q^T dqk.
                # (The bk term Q . bk adds sum_n ds_n = 0 to dL/d(Q . bk): no dQ or dbk part.)
                d_wk = (qq.t() @ dqk) if need_wk else None
                if need_q or need_wq or need_bq:
                    dqq = dqk @ wk.t()
                    # Q = q Wq^T + bq:  dq = dQ Wq;  dWq = dQ^T q;  dbq = sum_t dQ.
                    d_q = (dqq @ wq).view(q_shape) if need_q else None
                    d_wq = (dqq.t() @ q2) if need_wq else None
                    d_bq = dqq.sum(0, dtype=torch.float32).to(dqq.dtype) if (need_bq and ctx.has_bq) else None
        d_bk = torch.zeros(d, dtype=q2.dtype, device=q2.device) if (need_bk and ctx.has_bk) else None
        return d_q, d_u, d_r, d_wq, d_bq, d_wk, d_bk, d_wv, None, None


# ------------------------------------------------------------------------ eager path
def _mix_fwd(u, qk, temperature):
    """The eager path's pass over u ``[T, N, d]``: (m = sum_n a_n u_n ``[T, d]`` in u's dtype,
    a = softmax_n(u_n . qk / tau) ``[T, N]`` fp32), as ``fusion_fwd``."""
    s = torch.bmm(u, qk[:, :, None])[:, :, 0]                                    # s_n = u_n . qk      [T, N]
    a = torch.softmax(s.float() / temperature, dim=-1)                           # a = softmax_n(s / tau), fp32
    m = torch.bmm(a.to(u.dtype)[:, None, :], u)[:, 0]                            # m = sum_n a_n u_n   [T, d]
    return m, a


def _mix_bwd(u, qk, a, dm, temperature):
    """The eager path's backward pass over u: (du ``[T, N, d]``, dqk ``[T, d]``) in u's
    dtype, from dm = dL/dm and the saved a, as ``fusion_bwd``."""
    g = torch.bmm(u, dm[:, :, None])[:, :, 0].float()                            # g_n = u_n . dm      [T, N]
    ds = a * (g - (a * g).sum(-1, keepdim=True))                                 # softmax Jacobian: a_n (g_n - sum_k a_k g_k)
    w = ds / temperature                                                         # w_n = ds_n / tau
    # du_n = a_n dm + w_n qk: one product [T, N, 2] x [T, 2, d]
    du = torch.bmm(torch.stack([a, w], dim=-1).to(u.dtype), torch.stack([dm, qk], dim=1))
    dqk = torch.bmm(w.to(u.dtype)[:, None, :], u)[:, 0]                          # dqk = sum_n w_n u_n [T, d]
    return du, dqk


# ------------------------------------------------------------------------ launchers
@torch.library.custom_op("peftops::fusion_fwd", mutates_args=())
def fusion_fwd(u: torch.Tensor, qk: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """u ``[T, N, d]``, qk ``[T, d]``: returns (m = sum_n a_n u_n ``[T, d]`` in u's dtype,
    a = softmax_n(u_n . qk / tau) ``[T, N]`` fp32)."""
    T, N, D = u.shape
    m = empty((T, D), u.dtype, u.device)
    a = empty((T, N), torch.float32, u.device)
    if T == 0:
        return m, a
    k = kernels("fusion")
    cfg = k.config(N, D, backward=False)
    k.fusion_fwd_kernel[(T,)](
        u, qk, m, a, N, D,
        u.stride(0), u.stride(1), u.stride(2), qk.stride(0), qk.stride(1), m.stride(0), m.stride(1),
        1.0 / temperature,
        ONE_PASS=cfg["ONE_PASS"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    record_launch("fusion_fwd")
    return m, a


@fusion_fwd.register_fake
def _(u, qk, temperature):
    T, N, D = u.shape
    return u.new_empty((T, D)), u.new_empty((T, N), dtype=torch.float32)


@torch.library.custom_op("peftops::fusion_bwd", mutates_args=())
def fusion_bwd(u: torch.Tensor, qk: torch.Tensor, a: torch.Tensor, dm: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the score / softmax / mix pass: returns (du ``[T, N, d]``, dqk ``[T, d]``),
    both in u's dtype, from dm = dL/dm ``[T, d]`` and the saved a ``[T, N]``."""
    T, N, D = u.shape
    du = empty((T, N, D), u.dtype, u.device)
    dqk = empty((T, D), u.dtype, u.device)
    if T == 0:
        return du, dqk
    a = a.contiguous()
    k = kernels("fusion")
    cfg = k.config(N, D, backward=True)
    k.fusion_bwd_kernel[(T,)](
        u, qk, a, dm, du, dqk, N, D,
        u.stride(0), u.stride(1), u.stride(2), qk.stride(0), qk.stride(1), dm.stride(0), dm.stride(1),
        du.stride(0), du.stride(1), du.stride(2), dqk.stride(0), dqk.stride(1),
        1.0 / temperature,
        ONE_PASS=cfg["ONE_PASS"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    record_launch("fusion_bwd")
    return du, dqk


@fusion_bwd.register_fake
def _(u, qk, a, dm, temperature):
    T, N, D = u.shape
    return u.new_empty((T, N, D)), u.new_empty((T, D))
