"""The suite's own machinery (tests/parity.py, tests/conftest.py): the one test device, the
device markers, and the eager-bounded comparison used at GPU-sized shapes."""
import os
import subprocess
import sys

import pytest
import torch

import parity
from parity import (BOUNDS, DEVICE, EAGER_EPS, EAGER_FACTOR, TestDeviceError, assert_close_vs_eager, check_parity,
                    eager_bound, randn, rel_err, resolve_test_device)


# ------------------------------------------------------------------ the test device
@pytest.mark.parametrize("env,cuda,want", [
    ({}, False, "cpu"),
    ({}, True, "cuda"),
    ({"TRITON_INTERPRET": "1"}, True, "cpu"),          # the README's interpreter command on a GPU machine
    ({"PEFTOPS_TEST_DEVICE": "cpu"}, True, "cpu"),
    ({"PEFTOPS_TEST_DEVICE": " CUDA "}, True, "cuda"),
    ({"PEFTOPS_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1"}, False, "cpu"),
])
def test_resolve_test_device(env, cuda, want):
    assert resolve_test_device(env, cuda_available=cuda) == torch.device(want)


@pytest.mark.parametrize("env,cuda,words", [
    ({"PEFTOPS_TEST_DEVICE": "cuda"}, False, ["PEFTOPS_TEST_DEVICE=cuda", "no usable GPU"]),
    ({"PEFTOPS_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "1"}, True, ["TRITON_INTERPRET=1", "unset"]),
    ({"PEFTOPS_TEST_DEVICE": "tpu"}, True, ["'tpu'", "cpu", "cuda"]),
])
def test_resolve_test_device_refuses(env, cuda, words):
    with pytest.raises(TestDeviceError) as info:
        resolve_test_device(env, cuda_available=cuda)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_test_device_stops_collection():
    """A device the machine cannot give stops the run at collection with the reason (exit 4,
    pytest's usage error), not with failures test by test."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PEFTOPS_TEST_DEVICE="tpu")
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", os.path.join("tests", "test_parity.py")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 4, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "PEFTOPS_TEST_DEVICE='tpu'" in res.stdout + res.stderr


def test_suite_runs_on_the_test_device(device):
    assert device == DEVICE == parity.DEVICE
    assert randn(2, 3).device.type == DEVICE.type
    if DEVICE.type == "cpu":  # the interpreter, switched on before triton was imported
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert os.environ.get("PEFTOPS_BACKEND") == "triton"
    else:  # the compiled kernels
        assert os.environ.get("TRITON_INTERPRET", "0") != "1"
        assert os.environ.get("PEFTOPS_BACKEND") in ("auto", "triton")


@pytest.mark.cpu_only("checks the cpu_only marker itself")
def test_cpu_only_marker_runs_on_cpu():
    assert DEVICE.type == "cpu"


@pytest.mark.cuda_only("checks the cuda_only marker itself")
def test_cuda_only_marker_runs_on_cuda():
    assert DEVICE.type == "cuda"


def test_device_markers_skip_on_the_other_device(request):
    """Every cuda_only / cpu_only test collected with this one is skipped, with its reason,
    exactly when the test device is the other one."""
    seen = 0
    for item in request.session.items:
        for name, wanted in (("cuda_only", "cuda"), ("cpu_only", "cpu")):
            mark = item.get_closest_marker(name)
            if mark is None:
                continue
            seen += 1
            skips = [m for m in item.iter_markers("skip") if name in m.kwargs.get("reason", "")]
            if DEVICE.type == wanted:
                assert not skips, item.nodeid
            else:
                assert len(skips) == 1 and mark.args[0] in skips[0].kwargs["reason"], item.nodeid
    assert seen >= 2  # at least the two marker tests above


# ------------------------------------------------------------------ bounded by eager
def test_eager_bound():
    ref = torch.ones(100, dtype=torch.float64, device=DEVICE)
    eager = ref * 1.1  # 10 % off
    assert eager_bound(1e-2, eager, ref) == pytest.approx(EAGER_FACTOR * 0.1 + EAGER_EPS)
    assert eager_bound(0.5, eager, ref) == 0.5  # never below the plain bound
    assert eager_bound(1e-2, ref * float("nan"), ref) == 1e-2  # a NaN eager vouches for nothing
    assert_close_vs_eager("x", ref * 1.15, eager, ref, 1e-2)
    with pytest.raises(AssertionError, match="eager"):
        assert_close_vs_eager("x", ref * 1.2, eager, ref, 1e-2)  # 20 % > 1.5 x 10 % + eps
    with pytest.raises(AssertionError):
        assert_close_vs_eager("x", ref * float("nan"), eager, ref, 1e-2)


def _linear(x, w):
    return x @ w.t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_check_parity_vs_eager_runs_eager_and_still_fails_a_wrong_op(dtype):
    args = dict(x=randn(64, 48), w=randn(32, 48, scale=48 ** -0.5))
    out, ref = check_parity(_linear, _linear, args, ["x", "w"], dtype, vs_eager=True)
    assert out.dtype == dtype and ref.dtype == torch.float64

    def off_in_dw(x, w):  # right output, a gradient 10 % off: eager is far better than that
        return _WrongGrad.apply(x, w)

    with pytest.raises(AssertionError, match="dw"):
        check_parity(off_in_dw, _linear, args, ["x", "w"], dtype, vs_eager=True)
    # only the names asked for get eager's allowance; the output keeps BOUNDS[dtype]
    wrong_out = lambda x, w: _linear(x, w) * (1 + 2 * BOUNDS[dtype])  # noqa: E731
    with pytest.raises(AssertionError, match="output"):
        check_parity(wrong_out, _linear, args, [], dtype, vs_eager=["dx"])


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ w, (dy.t() @ x) * 1.1


def test_rel_err_nan_never_passes():
    ref = torch.ones(3, dtype=torch.float64, device=DEVICE)
    with_nan = torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64, device=DEVICE)
    assert rel_err(with_nan, ref) != rel_err(with_nan, ref)  # NaN
    with pytest.raises(AssertionError):
        parity.assert_close("y", with_nan, ref, 1.0)
