"""The AdapterHub bench case where ``adapters`` is not installed (the GPU image): every
provider is recorded as skipped with the reason, and the parity pass leaves it out."""
import torch

from peftops.benchmarks import METHODS, adapterhub, run


def test_adapterhub_cases_recorded_as_skipped_without_adapters(monkeypatch):
    assert METHODS["adapterhub"] == "peftops.benchmarks.adapterhub"
    monkeypatch.setattr(adapterhub, "_available", lambda: False)
    cases = adapterhub.cases(torch.device("cpu"), torch.float32, small=True)
    assert {c.shape["setup"] for c in cases} == set(adapterhub.SETUPS) and len(cases) == 2 * len(adapterhub.SETUPS)
    assert all(c.compare == () for c in cases)  # the parity pass lists them as timing only
    records = run.run_timing(cases[:1], torch.device("cpu"), None)
    assert {r["provider"] for r in records} == {"peftops", "eager", "cublas_base"}
    for r in records:
        assert r["median_ms"] is None and "AdapterHub's `adapters` is not installed" in r["skipped"], r
        assert not r.get("error"), r  # a skip, not a failure (bench/gpu_session.sh's checker fails on errors)
    assert run.run_parity(cases)
