"""The ``peftops.peft_suite`` pytest plugin (peft's own suite, accelerated) on small stand-in
test files, each run in a pytest subprocess (the plugin wraps peft's tuner methods for the
process it is loaded in): a failure only accelerated fails the run, a failure plain too is
xfailed, a run that accelerates nothing fails, and ``--peftops-select`` keeps LoRA / DoRA /
IA3 / mixed-batch tests only.
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("peft")
pytest_plugins = ["pytester"]

from parity import DEVICE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEADER = f'''
import pytest, torch, torch.nn as nn
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model

DEVICE = torch.device("{DEVICE}")

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)
    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))

def build(config, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(MLP().to(DEVICE), config).eval()
'''

CASES = HEADER + '''
def test_lora_forward_and_reload(tmp_path):
    model = build(LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(3, 10, device=DEVICE)
    y = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(MLP().to(DEVICE), tmp_path).eval()  # accelerated on loading
    assert type(again.base_model.model.lin0).__name__ == "PeftopsLoraLinear"
    torch.testing.assert_close(again(x), y)

def test_ia3_add_adapter_new_target():
    model = build(IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.add_adapter("other", IA3Config(target_modules=["lin1"], feedforward_modules=[]))  # a new layer
    assert type(model.base_model.model.lin1).__name__ == "PeftopsIA3Linear"
    model(torch.randn(2, 10, device=DEVICE))

def test_fails_only_accelerated():
    model = build(LoraConfig(target_modules=["lin0"]))
    assert type(model.base_model.model.lin0).__name__ == "Linear"  # true of peft's own layer only

def test_fails_plain_too():
    build(LoraConfig(target_modules=["lin0"]))
    assert 1 == 2

def test_lora_skipped():
    pytest.skip("not here")

@pytest.mark.parametrize("config_cls", [LoraConfig, AdaLoraConfig])
def test_deselected_unless_lora(config_cls):
    pass
'''


def _run(pytester, monkeypatch, source, *args):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_cases=source)
    out = pytester.path / "suite.json"
    out.unlink(missing_ok=True)
    result = pytester.runpytest_subprocess("-p", "peftops.peft_suite", "-p", "no:cacheprovider",
                                           f"--peftops-suite-json={out}", *args)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_verdicts_and_selection(pytester, monkeypatch):
    result, report = _run(pytester, monkeypatch, CASES, "--peftops-select=lora,ia3", "-rxX")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    # AdaLoRA is another tuner: deselected; LoRA's parametrised case kept
    result.assert_outcomes(passed=3, failed=1, xfailed=1, skipped=1, deselected=1)
    t = report["totals"]
    assert t["accelerated_only"] == ["test_cases.py::test_fails_only_accelerated"]
    assert t["fails_plain"] == ["test_cases.py::test_fails_plain_too"]
    assert t["flaky"] == [] and t["skipped"] == ["test_cases.py::test_lora_skipped"]
    tests = report["tests"]
    assert tests["test_cases.py::test_lora_forward_and_reload"]["swapped"] == 4  # 2 built + 2 loaded
    assert tests["test_cases.py::test_ia3_add_adapter_new_target"]["swapped"] == 2
    assert tests["test_cases.py::test_ia3_add_adapter_new_target"]["kind"] == "ia3"
    assert tests["test_cases.py::test_deselected_unless_lora[LoraConfig]"]["kind"] == "lora"
    assert tests["test_cases.py::test_lora_forward_and_reload"]["launches"] > 0
    assert tests["test_cases.py::test_deselected_unless_lora[LoraConfig]"]["swapped"] == 0
    assert t["swapped"] == 4 + 2 + 1 + 1 and t["launches"] > 0
    text = result.stdout.str()
    assert "FAILED ONLY ACCELERATED: test_cases.py::test_fails_only_accelerated" in text
    assert "by kind (tests / swapped a layer / launched a kernel): ia3 1 / 1 / 1, lora 5 / 3 / 1" in text
    assert "passes without peftops.accelerate" in text


def test_nothing_accelerated_fails_the_run(pytester, monkeypatch):
    source = HEADER + "def test_no_peft_model():\n    MLP()(torch.randn(2, 10))\n"
    result, report = _run(pytester, monkeypatch, source)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert report["totals"]["swapped"] == 0
    assert "no test swapped a peft layer" in result.stdout.str()
    # the plain baseline runs the same selection with nothing wrapped, and no zero check
    result, report = _run(pytester, monkeypatch, CASES, "--peftops-plain", "-k", "lora_forward or fails_only")
    result.assert_outcomes(failed=1, passed=1, deselected=5)  # peft's own layer: "Linear", no PeftopsLoraLinear
    assert report is None
