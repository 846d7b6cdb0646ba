"""Parity helpers shared by every method's tests.

Inputs are made in float64 (the masters), copied to the dtype under test, run through the
op and through the float64 reference, and compared by ``||out - ref|| / ||ref||`` for the
output and every gradient (DESIGN.md, Numerics). NaN never passes.
"""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative-error bounds by dtype (DESIGN.md: fp32 IEEE 1e-5, tf32 5e-4, half 2e-2 with
# bf16 / fp16 tighter where it holds).
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_BOUND = 5e-4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("nan")
    denom = ref.norm()
    if denom == 0:
        return out.norm().item()
    return ((out - ref).norm() / denom).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    err = rel_err(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} (shape {tuple(ref.shape)})"


def randn(*shape, scale: float = 1.0, noncontig: bool = False, device=DEVICE) -> torch.Tensor:
    """A float64 master tensor; ``noncontig`` gives a strided view (every other column)."""
    if noncontig and len(shape) >= 1 and shape[-1] > 0:
        buf = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, device=device) * scale
        return buf[..., ::2]
    return torch.randn(*shape, dtype=torch.float64, device=device) * scale


def copy_as(master: torch.Tensor | None, dtype: torch.dtype, requires_grad: bool = False):
    """``master`` in ``dtype``; a non-contiguous master gives a non-contiguous copy (a
    strided view over a larger buffer), so kernels see the same layout class."""
    if master is None:
        return None
    if master.is_contiguous() or master.dim() == 0 or master.shape[-1] == 0:
        out = master.detach().to(dtype).clone()
    else:
        buf = torch.empty(*master.shape[:-1], 2 * master.shape[-1], dtype=dtype, device=master.device)
        out = buf[..., ::2]
        out.copy_(master.detach())
    return out.requires_grad_(requires_grad)


def check_parity(op, ref, args: dict, grads: list[str], dtype: torch.dtype, *,
                 bound: float | None = None, ref_kwargs: dict | None = None, op_kwargs: dict | None = None,
                 out_scale: float = 1.0):
    """Run ``op(**args in dtype)`` and ``ref(**args in float64)``; compare the output and the
    gradients of ``grads`` for a random upstream gradient. Returns (out, ref_out)."""
    bound = BOUNDS[dtype] if bound is None else bound
    masters, copies = {}, {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            # The reference sees exactly the values the op sees (rounded to ``dtype``), so
            # the error measures the op's arithmetic, not the rounding of its inputs.
            copies[name] = copy_as(value, dtype, name in grads)
            masters[name] = copies[name].detach().double().requires_grad_(name in grads)
        else:
            masters[name] = copies[name] = value
    out = op(**copies, **(op_kwargs or {}))
    expect = ref(**masters, **(ref_kwargs or {}))
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_close("output", out, expect, bound)
    if grads:
        dy = (torch.randn_like(expect) * out_scale).to(dtype).double()
        expect.backward(dy)
        out.backward(dy.to(dtype))
        for name in grads:
            got = copies[name].grad
            assert got is not None, f"no gradient for {name}"
            assert got.dtype == copies[name].dtype, f"d{name} dtype {got.dtype} != {copies[name].dtype}"
            assert_close(f"d{name}", got, masters[name].grad, bound)
    return out, expect
