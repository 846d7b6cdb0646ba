"""Test setup: the suite always runs the real Triton kernels, on one device.

The device comes from ``PEFTOPS_TEST_DEVICE`` (``cpu`` or ``cuda``; by default ``cuda``
when torch sees a GPU, else ``cpu``), resolved once in tests/parity.py as ``parity.DEVICE``
and returned by the ``device`` fixture. Every test makes its tensors, modules and models
there, so the same suite is the CPU interpreter run and the GPU parity run.

* ``cpu``: the kernels run in Triton's CPU interpreter, which must be switched on before
  triton is imported, so it is done here, before any test module loads.
  ``PEFTOPS_BACKEND`` defaults to ``triton`` so a parity test can never compare the
  reference with itself (``auto`` would send CPU tensors to the reference).
* ``cuda``: the compiled kernels; ``PEFTOPS_BACKEND`` defaults to ``auto`` (CUDA tensors go
  to Triton) and the interpreter stays off. Asking for ``cuda`` without a GPU stops the
  run at collection with the reason.

Markers: ``cuda_only(reason)`` / ``cpu_only(reason)`` for the few tests that only make
sense on one device; on the other one they are skipped with that reason.
"""
import os
import sys

import pytest
import torch

try:
    from parity import DEVICE  # resolves PEFTOPS_TEST_DEVICE (parity.resolve_test_device)
except RuntimeError as exc:  # parity.TestDeviceError: stop the run at collection, with the reason
    raise pytest.UsageError(f"peftops tests: {exc}") from None

if DEVICE.type == "cpu":
    os.environ.setdefault("PEFTOPS_BACKEND", "triton")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("triton was imported before TRITON_INTERPRET=1 could be set; run: "
                                "TRITON_INTERPRET=1 PEFTOPS_BACKEND=triton python -m pytest tests")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The launch configs a GPU would pick (block sizes, warps, stages), not the interpreter's
    # few-large-programs ones: the CPU run proves the configs that run on the GPU, and the
    # launch recorder below hands exactly those variants to `python -m peftops compile-check`.
    os.environ.setdefault("PEFTOPS_GPU_CONFIGS", "1")
else:
    os.environ.setdefault("PEFTOPS_BACKEND", "auto")
os.environ.setdefault("PEFTOPS_POISON", "1")  # NaN-fill outputs so unwritten elements fail

# Records every distinct kernel launch under the interpreter into build/launches/ (for
# compile-check); does nothing on CUDA.
pytest_plugins = ["peftops.launch_log"]

# tests/adapterhub/ runs in its own environment (AdapterHub's `adapters` 1.3 pins
# transformers~=4.57; the main suite runs the newest): .ci/run builds that environment and
# runs `pytest tests/adapterhub` there, failing if nothing ran. Where `adapters` is not
# installed the directory is not collected at all (not skipped, so never counted as done).
import importlib.util  # noqa: E402

collect_ignore = [] if importlib.util.find_spec("adapters") is not None else ["adapterhub"]

_DEVICE_MARKERS = {"cuda_only": "cuda", "cpu_only": "cpu"}


@pytest.fixture
def seed_per_test(request):
    """Seeds torch from the test's id (plus ``PEFTOPS_TEST_SEED_OFFSET``): fresh inputs per
    case, the same on every run, so a failure reproduces; an offset sweep draws new ones.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("seed_per_test")``."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("PEFTOPS_TEST_SEED_OFFSET", "0")))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only(reason): runs only when the test device is cuda "
                                       "(skipped with the reason on cpu)")
    config.addinivalue_line("markers", "cpu_only(reason): runs only when the test device is cpu "
                                       "(the interpreter; skipped with the reason on cuda)")


def pytest_report_header(config):
    return (f"peftops test device: {DEVICE} (PEFTOPS_BACKEND={os.environ.get('PEFTOPS_BACKEND')}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
            f"PEFTOPS_GPU_CONFIGS={os.environ.get('PEFTOPS_GPU_CONFIGS', '0')})")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name, wanted in _DEVICE_MARKERS.items():
            mark = item.get_closest_marker(name)
            if mark is None:
                continue
            reason = mark.args[0] if mark.args else mark.kwargs.get("reason")
            if not reason:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{name} needs a reason")
            if DEVICE.type != wanted:
                item.add_marker(pytest.mark.skip(reason=f"{name} (test device is {DEVICE.type}): {reason}"))


@pytest.fixture(autouse=True)
def _fp32_highest_and_fresh_counts():
    """IEEE fp32 dots by default (tests that want tf32 set it themselves), fresh counters."""
    import peftops

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    peftops.reset_dispatch_counts()
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.fixture
def device():
    """The test device (``parity.DEVICE``)."""
    return DEVICE
