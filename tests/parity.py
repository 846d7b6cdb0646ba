"""Parity helpers shared by every method's tests.

Inputs are made in float64 (the masters), copied to the dtype under test, run through the
op and through the float64 reference, and compared by ``||out - ref|| / ||ref||`` for the
output and every gradient (DESIGN.md, Numerics). NaN never passes.

``DEVICE`` is the one device the whole suite runs on (tests/conftest.py): env
``PEFTOPS_TEST_DEVICE`` = ``cpu`` (kernels in Triton's CPU interpreter) or ``cuda``;
by default ``cuda`` when torch sees a GPU (and ``TRITON_INTERPRET=1`` was not asked
for), else ``cpu``. Every test makes its tensors, modules and models there.
"""
from __future__ import annotations

import os

import torch

DEVICES = ("cpu", "cuda")


class TestDeviceError(RuntimeError):
    """``PEFTOPS_TEST_DEVICE`` asks for something this machine cannot give."""

    __test__ = False  # not a test class for pytest's collector


def resolve_test_device(environ=os.environ, cuda_available: bool | None = None) -> torch.device:
    """The test device for ``environ`` (see the module docstring); raises TestDeviceError
    with the reason when the request cannot be met."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    interpret = environ.get("TRITON_INTERPRET", "") == "1"
    name = environ.get("PEFTOPS_TEST_DEVICE", "").strip().lower()
    if not name:
        # The README's interpreter command (TRITON_INTERPRET=1) on a GPU machine asks for the
        # CPU suite: CUDA tensors through the interpreter would test neither.
        name = "cuda" if cuda and not interpret else "cpu"
    if name not in DEVICES:
        raise TestDeviceError(f"PEFTOPS_TEST_DEVICE={name!r}: expected one of {DEVICES}")
    if name == "cuda" and not cuda:
        raise TestDeviceError(
            f"PEFTOPS_TEST_DEVICE=cuda but torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}): there is no usable GPU here. Run on a GPU machine, or "
            "set PEFTOPS_TEST_DEVICE=cpu for the interpreter suite.")
    if name == "cuda" and interpret:
        raise TestDeviceError(
            "PEFTOPS_TEST_DEVICE=cuda with TRITON_INTERPRET=1: the CUDA suite runs the compiled kernels; "
            "unset TRITON_INTERPRET, or set PEFTOPS_TEST_DEVICE=cpu for the interpreter suite.")
    return torch.device(name)


DEVICE = resolve_test_device()
ON_CUDA = DEVICE.type == "cuda"

# Relative-error bounds by dtype (DESIGN.md, Numerics: fp32 IEEE 1e-5, tf32 1e-3, half
# 2e-2; bf16 / fp16 tighter here where that holds).
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TF32_BOUND = 1e-3  # the GPU shows 6e-4 .. 9e-4 (shared/PERF.md)

# Large half-precision shapes on a GPU: ours may be off the float64 values by up to this
# factor times eager PyTorch's error in the same dtype on the same inputs, plus EAGER_EPS
# (flash-attention's test rule; DESIGN.md, Numerics).
EAGER_FACTOR = 1.5
EAGER_EPS = 1e-3

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


def eager_bound(bound: float, eager: torch.Tensor, ref: torch.Tensor, eps: float = EAGER_EPS,
                factor: float = EAGER_FACTOR) -> float:
    """``max(bound, EAGER_FACTOR * eager_err + eps)``: the bound for ours when eager PyTorch in
    the same low dtype, on the same (rounded) inputs, is ``eager_err`` off the float64
    ``ref``. An eager result that is not finite adds nothing (the plain bound holds)."""
    err = rel_err(eager, ref)
    if err != err:  # NaN: eager overflowed; it cannot vouch for a looser bound
        return bound
    return max(bound, factor * err + eps)


def assert_close_vs_eager(name: str, out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, bound: float,
                          eps: float = EAGER_EPS, factor: float = EAGER_FACTOR) -> None:
    """``out`` within ``eager_bound(bound, eager, ref)`` of ``ref`` (flash-attention style)."""
    b = eager_bound(bound, eager, ref, eps, factor)
    err = rel_err(out, ref)
    assert err <= b, (f"{name}: relative error {err:.3e} > {b:.3e} = max({bound:.1e}, {factor} x eager "
                      f"{rel_err(eager, ref):.3e} + {eps:.0e}) (shape {tuple(ref.shape)})")


def check_parity(op, ref, args: dict, grads: list[str], dtype: torch.dtype, *,
                 bound: float | None = None, ref_kwargs: dict | None = None, op_kwargs: dict | None = None,
                 out_scale: float = 1.0, vs_eager=False, eager_eps: float = EAGER_EPS,
                 eager_factor: float = EAGER_FACTOR):
    """Run ``op(**args in dtype)`` and ``ref(**args in float64)``; compare the output and the
    gradients of ``grads`` for a random upstream gradient. Returns (out, ref_out).

    ``vs_eager``: also run ``ref`` in ``dtype`` itself (eager PyTorch) on the same inputs and
    bound each output / gradient by ``max(bound, 1.5 x eager's error + eager_eps)``; for
    half precision at GPU-sized shapes, where eager's own rounding is above ``bound``.
    ``True`` for the output and every gradient, or a collection of names (``"output"`` and
    argument names) for only those; the others keep ``bound``. ``eager_factor`` replaces the
    1.5 where a test documents why its case needs more."""
    bound = BOUNDS[dtype] if bound is None else bound
    eager_names = None if not vs_eager else (None if vs_eager is True else set(vs_eager))
    vs_eager = bool(vs_eager)
    masters, copies, eager_in = {}, {}, {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            # The reference sees exactly the values the op sees (rounded to ``dtype``), so
            # the error measures the op's arithmetic, not the rounding of its inputs.
            copies[name] = copy_as(value, dtype, name in grads)
            masters[name] = copies[name].detach().double().requires_grad_(name in grads)
            if vs_eager:
                eager_in[name] = copies[name].detach().clone().requires_grad_(name in grads)
        else:
            masters[name] = copies[name] = eager_in[name] = value
    out = op(**copies, **(op_kwargs or {}))
    expect = ref(**masters, **(ref_kwargs or {}))
    eager = ref(**eager_in, **(ref_kwargs or {})) if vs_eager else None

    def close(what, got, want, eager_got):
        name = what if what == "output" else what[1:]
        if vs_eager and (eager_names is None or name in eager_names):
            assert_close_vs_eager(what, got, eager_got, want, bound, eager_eps, eager_factor)
        else:
            assert_close(what, got, want, bound)

    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    close("output", out, expect, eager)
    if grads:
        dy = (torch.randn_like(expect) * out_scale).to(dtype).double()
        expect.backward(dy)
        out.backward(dy.to(dtype))
        if vs_eager:
            eager.backward(dy.to(eager.dtype))
        for name in grads:
            got = copies[name].grad
            assert got is not None, f"no gradient for {name}"
            assert got.dtype == copies[name].dtype, f"d{name} dtype {got.dtype} != {copies[name].dtype}"
            close(f"d{name}", got, masters[name].grad, eager_in[name].grad if vs_eager else None)
    return out, expect


def large_case(dtype: torch.dtype) -> dict:
    """check_parity keywords for a GPU-sized case: fp32 at TF32_BOUND (the test sets
    ``torch.set_float32_matmul_precision("high")``), half precision bounded by eager."""
    if dtype == torch.float32:
        if torch.get_float32_matmul_precision() == "highest":
            raise AssertionError("GPU-sized fp32 cases run under tf32: set_float32_matmul_precision('high') first")
        return dict(bound=TF32_BOUND)
    return dict(vs_eager=True)


def table_paths(op_module) -> list[str]:
    """The paths of an ops module's ``PATHS`` table (``["default"]`` for an op without one), for
    tests that run every path (e.g. the GPU-sized cases, where the table's choice on CUDA would
    otherwise leave our kernels out)."""
    table = getattr(op_module, "PATHS", None)
    return list(table.paths) if table is not None else ["default"]


def path_fixture(op: str, paths):
    """A pytest fixture over ``paths`` that runs each test under ``force_path(op, path)`` and
    gives it the path's name: ``path = path_fixture("lora", PATHS.paths)`` in a test module."""
    import pytest

    import peftops

    @pytest.fixture(params=list(paths))
    def fixture(request):
        with peftops.force_path(op, request.param):
            yield request.param
    return fixture


def forced_path(op: str, path: str):
    """``peftops.force_path(op, path)``; ``"default"`` forces nothing."""
    import contextlib

    import peftops

    return contextlib.nullcontext() if path == "default" else peftops.force_path(op, path)


def assert_dispatched(counts: dict, op: str, kernel_launches=(), any_path_launches=()) -> None:
    """``op`` ran on Triton's side of the dispatch (not the reference, no fallback) and launched
    each of ``any_path_launches``; and, where the path its ``PATHS`` table picked was its own
    kernel (always, for an op without a table), each of ``kernel_launches`` too. A GPU's table
    may pick a vendor path (cuBLAS, SDPA, eager) that launches fewer or none of ours."""
    assert counts.get(f"{op}.triton", 0) > 0, f"{op} did not dispatch to Triton: {counts}"
    assert not counts.get(f"{op}.reference") and not counts.get(f"{op}.fallback"), counts
    paths = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith(f"{op}.path:")}
    want = list(any_path_launches) + (list(kernel_launches) if not paths or paths.get("kernel") else [])
    for kern in want:
        assert counts.get(f"launch.{kern}", 0) > 0, f"{op}: no launch.{kern} (paths {paths}): {counts}"
