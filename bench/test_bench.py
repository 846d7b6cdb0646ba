"""pytest-benchmark suite over the same cases as ``python -m peftops bench`` (GPU only).

    python -m pytest bench --benchmark-columns=median,iqr --benchmark-sort=name

Speed is measured here, never in tests/. The runner (``python -m peftops bench``) is what
writes ``bench/results/<gpu>-<date>.json``; this suite is for interactive comparisons.
"""
import pytest
import torch

from peftops.benchmarks import METHODS
from peftops.benchmarks.run import load_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="speed is measured on a GPU only")

CASES = load_cases(list(METHODS), torch.device("cuda"), torch.bfloat16, small=False) if torch.cuda.is_available() else []
PARAMS = [pytest.param(c, p, id=f"{c.op}-{'-'.join(f'{k}{v}' for k, v in c.shape.items())}-{p}")
          for c in CASES for p in c.providers]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_bench(benchmark, case, provider):
    with case.context(provider):  # peftops[<path>]: that path forced for build and timing
        fn = case.providers[provider]()

        def step():
            fn()
            torch.cuda.synchronize()

        benchmark.group = f"{case.op} {case.shape}"
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
