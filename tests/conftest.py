"""Test setup: the suite always runs the real Triton kernels.

On a machine without a GPU the kernels run in Triton's CPU interpreter; that must be
switched on before triton is imported, so it is done here, before any test module loads.
``PEFTOPS_BACKEND`` defaults to ``triton`` so a parity test can never compare the
reference with itself.
"""
import os
import sys

import torch

os.environ.setdefault("PEFTOPS_BACKEND", "triton")
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; "
                           "run: TRITON_INTERPRET=1 PEFTOPS_BACKEND=triton python -m pytest tests")
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PEFTOPS_POISON", "1")  # NaN-fill outputs so unwritten elements fail

import pytest  # noqa: E402

from parity import DEVICE  # noqa: E402


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
    return DEVICE
