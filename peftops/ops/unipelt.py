"""UniPELT's gated LoRA: ``peftops.gated_lora_linear`` -- the gate logit computed in the
LoRA down-projection's pass.

    [S | z] = x [A ; Wg]^T                   (one skinny pass over x: S [T, r] and the logit)
    g       = sigmoid(z + bg)                (gate_mode="token": one gate per row)
            = mean_seq sigmoid(z + bg)       (gate_mode="sequence": AdapterHub's, one per sample)
    y       = x W^T + b + g * scaling * S B^T  (one GEMM, the rank-r term in its epilogue)

Built on the LoRA launchers (``peftops.ops.lora._skinny`` / ``_gemm``): the gate costs one
more column in the skinny pass LoRA does anyway, no extra pass over x.
Backward (W frozen), with sig = sigmoid(z + bg), dg the gradient of each row's gate:
    dYB = dY B,  dB = (g s dY)^T S                     one pass over dY
    dS  = g s dYB,  dg_t = s <dYB_t, S_t>
    dz_t = dg_t sig_t (1 - sig_t)                      (token)
         = (sum_{t' in sample} dg_t') / T_seq * sig_t (1 - sig_t)   (sequence: mean's adjoint)
    [dA ; dWg]^T = x^T [dS | dz],  dbg = sum_t dz_t    one pass over x
    dx  = dY W + [dS | dz] [A ; Wg]                    one GEMM (the gate's term in the epilogue)
"""
from __future__ import annotations

import torch

from .. import _checks
from .._dispatch import PathTable, use_triton
from .._launch import rows
from .lora import _skinny, linear_rank_r

__all__ = ["gated_lora_linear", "GATE_MODES", "PATHS"]

# The frozen GEMM of gated LoRA: the same two paths as LoRA's (ops/lora.py), one table.
PATHS = PathTable("gated_lora", paths=("kernel", "cublas"), default="kernel", rows=[
    (lambda **_: True, "cublas",
     "H100 2026-11-23 (shared/PERF.md): gated LoRA fwd+bwd T=8192 ours 7.8x base (spilling GEMM), eager 1.93x; "
     "cuBLAS + rank-r add measured 1.22x base for plain LoRA fwd. The single-accumulator kernel is unmeasured."),
])

GATE_MODES = ("sequence", "token")


def gated_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    *,
    scaling: float = 1.0,
    gate_mode: str = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPELT's gated LoRA linear: returns ``(y, gate)``.

    x ``[..., T, in]`` (``[T, in]``: one sample); weight ``[out, in]``; bias ``[out]`` or None;
    lora_A ``[r, in]``; lora_B ``[out, r]``; gate_weight ``[1, in]``; gate_bias ``[1]`` or
    None; scaling a float (UniPELT: 1, no alpha / r when gated); gate_mode "sequence" (mean
    of sigmoid over the sequence axis -2, per sample: gate ``[..., 1, 1]``) or "token"
    (gate ``[..., T, 1]``). The returned gate is detached (for reading, e.g. ``last_gate``);
    gradients reach gate_weight / gate_bias through y.
    """
    _check(x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, gate_mode)
    scaling = _checks.finite_scalar("scaling", scaling)
    unsupported = "float64" if x.dtype == torch.float64 else None
    if not use_triton("gated_lora", x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, unsupported=unsupported):
        from .. import reference
        return reference.gated_lora_linear(x, weight, bias, lora_A, lora_B, gate_weight, gate_bias,
                                           scaling=scaling, gate_mode=gate_mode)
    path = PATHS.pick(x.is_cuda, T=x.numel() // max(x.shape[-1], 1), d_in=weight.shape[1], d_out=weight.shape[0],
                      r=lora_A.shape[0])
    y, g = _GatedLoraFn.apply(x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, scaling, gate_mode, path)
    return y, g


def _check(x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, gate_mode):
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in], got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("bias", bias, ndim=1, optional=True)
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    _checks.tensor("gate_weight", gate_weight, ndim=2)
    _checks.tensor("gate_bias", gate_bias, ndim=1, optional=True)
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight {tuple(weight.shape)} expects {in_f}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} has {out_f} outputs")
    if r == 0 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}, expected [r >= 1, {in_f}]")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected [{out_f}, {r}]")
    if tuple(gate_weight.shape) != (1, in_f):
        raise ValueError(f"gate_weight has shape {tuple(gate_weight.shape)}, expected [1, {in_f}]")
    if gate_bias is not None and tuple(gate_bias.shape) != (1,):
        raise ValueError(f"gate_bias has shape {tuple(gate_bias.shape)}, expected [1]")
    _checks.same_dtype("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, gate_weight=gate_weight,
                       gate_bias=gate_bias)
    _checks.same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, gate_weight=gate_weight,
                        gate_bias=gate_bias)
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")


def _gate_of_logit(z, lead, gate_mode):
    """sigmoid of the logits z [N] (fp32) and the row gate g [N]; ``seq`` the sequence length."""
    sig = torch.sigmoid(z)
    if gate_mode == "token" or len(lead) == 0:
        return sig, sig.contiguous()
    seq = lead[-1]
    g = sig.view(-1, seq).mean(1, keepdim=True).expand(-1, seq).reshape(-1).contiguous()
    return sig, g


def _gate_view(g, lead, gate_mode):
    """The row gate [N] as the returned gate: ``[..., T, 1]`` or ``[..., 1, 1]``."""
    if gate_mode == "token" or len(lead) == 0:
        return g.view(*lead, 1)
    return g.view(*lead, 1)[..., :1, :]


class _GatedLoraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, scaling, gate_mode, path):
        lead = x.shape[:-1]
        x2 = rows(x)
        y2, s_ext, g = gated_lora_fwd(x2, weight, bias, lora_A, lora_B, gate_weight, gate_bias, scaling,
                                      gate_mode, list(lead[-1:]) if len(lead) else [], path)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, gate_weight, s_ext, g, gate_bias)
        ctx.scaling, ctx.gate_mode, ctx.lead, ctx.path = scaling, gate_mode, lead, path
        gate_out = _gate_view(g, lead, gate_mode).to(x.dtype)
        ctx.mark_non_differentiable(gate_out)
        return y2.view(*lead, weight.shape[0]), gate_out

    @staticmethod
    def backward(ctx, dy, _dgate_out):
        x2, weight, lora_A, lora_B, gate_weight, s_ext, g, gate_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = rows(dy)
        lead = ctx.lead
        dx2, d_a, d_b, d_gw, d_gb = gated_lora_bwd(dy2, x2, weight, lora_A, lora_B, gate_weight, gate_bias, s_ext, g,
                                                   ctx.scaling, ctx.gate_mode, list(lead[-1:]) if len(lead) else [],
                                                   need[0], ctx.path)
        dx = dx2.view(*lead, x2.shape[1]) if need[0] else None
        dw = (dy2.t() @ x2).to(weight.dtype) if need[1] else None
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need[2] else None
        return (dx, dw, db, d_a if need[3] else None, d_b if need[4] else None, d_gw if need[5] else None,
                d_gb if need[6] else None, None, None, None)


@torch.library.custom_op("peftops::gated_lora_fwd", mutates_args=())
def gated_lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, scaling: float, gate_mode: str, seq: list[int],
    path: str = "kernel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward on 2-D x: (y [N, out], [S | z] [N, r+1] fp32 (z without the bias), row gate g [N] fp32)."""
    N, r = x.shape[0], lora_A.shape[0]
    if N == 0:
        return (x.new_empty((0, weight.shape[0])), x.new_empty((0, r + 1), dtype=torch.float32),
                x.new_empty(0, dtype=torch.float32))
    a_ext = torch.cat([lora_A, gate_weight], 0)                                  # [A ; Wg]  [r+1, in]
    s_ext, _ = _skinny(x, e=a_ext.t())                                           # [S | z] = x [A ; Wg]^T
    z = s_ext[:, r] + (gate_bias.float() if gate_bias is not None else 0.0)
    _, g = _gate_of_logit(z, tuple(seq) if gate_mode == "sequence" else (), gate_mode)
    y = linear_rank_r(path, x, weight.t(), bias, s_ext[:, :r], lora_B.t(), g, scaling)  # x W^T + b + g s S B^T
    return y, s_ext, g


@gated_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, gate_weight, gate_bias, scaling, gate_mode, seq, path="kernel"):
    N = x.shape[0]
    return (x.new_empty((N, weight.shape[0])), x.new_empty((N, lora_A.shape[0] + 1), dtype=torch.float32),
            x.new_empty(N, dtype=torch.float32))


@torch.library.custom_op("peftops::gated_lora_bwd", mutates_args=())
def gated_lora_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, s_ext: torch.Tensor, g: torch.Tensor,
    scaling: float, gate_mode: str, seq: list[int], need_dx: bool, path: str = "kernel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward (W frozen): (dx or empty, dA, dB, dWg, dbg [1])."""
    N, r = x.shape[0], lora_A.shape[0]
    if N == 0:
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty(0)
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), torch.zeros_like(gate_weight), \
            gate_weight.new_zeros(1)
    s = s_ext[:, :r]
    gs = g * scaling
    dyb, d_b = _skinny(dy, e=lora_B, f=s, f_rowscale=gs)                         # dYB = dY B; dB = (g s dY)^T S
    dg = (dyb * s).sum(1) * scaling                                              # dg_t = s <dY_t B, S_t>
    z = s_ext[:, r] + (gate_bias.float() if gate_bias is not None else 0.0)
    sig = torch.sigmoid(z)
    if gate_mode == "sequence" and seq:                                          # g_t = mean_seq sig: adjoint spreads
        T = seq[0]                                                               # the sample's dg sum / T
        dg = dg.view(-1, T).sum(1, keepdim=True).expand(-1, T).reshape(-1) / T
    elif gate_mode == "sequence":
        dg = dg.sum().expand(N) / N
    dz = dg * sig * (1.0 - sig)                                                  # sigmoid'
    f_ext = torch.cat([dyb * gs[:, None], dz[:, None]], 1)                       # [dS | dz]  [N, r+1]
    _, d_ext = _skinny(x, f=f_ext)                                               # [dA ; dWg]^T = x^T [dS | dz]
    dx = x.new_empty(0)
    if need_dx:                                                                  # dx = dY W + [dS | dz] [A ; Wg]
        dx = linear_rank_r(path, dy, weight, None, f_ext, torch.cat([lora_A, gate_weight], 0), None, 1.0)
    d_a = d_ext[:, :r].t().contiguous().to(lora_A.dtype)                         # contiguous copies: custom ops
    d_gw = d_ext[:, r:].t().contiguous().to(gate_weight.dtype)                   # may not return aliases
    return dx, d_a, d_b.to(lora_B.dtype), d_gw, dz.sum().view(1).to(gate_weight.dtype)


@gated_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, gate_weight, gate_bias, s_ext, g, scaling, gate_mode, seq, need_dx, path="kernel"):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return (dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), gate_weight.new_empty(gate_weight.shape),
            gate_weight.new_empty(1))
