"""pytest plugin: record every distinct Triton kernel launch the test suite makes in the
interpreter, for ``python -m peftops compile-check`` (tests/conftest.py loads it).

Each process writes ``build/launches/launches-<worker>.json``: per distinct launch the
kernel, each parameter's kind and value (tensor dtype, TMA descriptor, integer, float, None,
constexpr)
and num_warps / num_stages. The controlling process writes ``manifest.json``: whether the
run was the full suite, passed, and used the GPU launch configs, and when it finished, so
compile-check knows whether the record stands for the code as it is.
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import time

_DIR = os.environ.get("PEFTOPS_LAUNCH_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "launches")
_seen: dict[str, dict] = {}
_recording = True  # off during hypothesis tests: random degenerate shapes (a dim of 1 becomes a
                   # constexpr) add specialisations, not code paths; the named tests cover those


def _describe(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).replace("torch.", "")]
    if type(value).__name__ == "TensorDescriptor":  # a TMA descriptor: its tensor's dtype and layout, the box
        return ["tensordesc", {"dtype": str(value.base.dtype).replace("torch.", ""), "shape": list(value.shape),
                               "strides": list(value.strides), "block_shape": list(value.block_shape)}]
    if value is None:
        return ["none", None]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    raise TypeError(f"cannot record launch argument {value!r}")


def _install_spy() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    if getattr(original, "_peftops_spy", False):
        return

    def spy(self, *args, grid, warmup, **kwargs):
        if not _recording:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip((p.name for p in params), args))
        bound.update({k: v for k, v in kwargs.items() if k in bound or any(p.name == k for p in params)})
        described, constexprs = [], {}
        for p in params:
            value = bound.get(p.name, p.default)
            if "constexpr" in str(p.annotation):
                value = getattr(value, "value", value)
                if p.name in ("UPCAST", "SOFT_BF16"):  # the interpreter's bf16 workarounds (dots; the
                    value = False                        # fp32 -> bf16 cast): a GPU runs the real ones
                constexprs[p.name] = value
                described.append(["constexpr", value])
            else:
                described.append(_describe(value))
        options = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        rec = {"module": self.fn.__module__, "name": self.fn.__name__, "args": described,
               "constexprs": constexprs, "options": options}
        _seen.setdefault(json.dumps(rec, sort_keys=True), rec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    spy._peftops_spy = True
    InterpretedFunction.run = spy


def pytest_runtest_call(item):
    global _recording
    _recording = not getattr(getattr(item, "obj", None), "is_hypothesis_test", False)


def _worker_id(config) -> str | None:
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    if _worker_id(config) is None:  # the controlling process starts a fresh record
        os.makedirs(_DIR, exist_ok=True)
        for path in glob.glob(os.path.join(_DIR, "*.json")):
            os.remove(path)
    _install_spy()


def _full_run(config) -> bool:
    tests_dir = os.path.join(str(config.rootpath), "tests")
    paths = [os.path.abspath(a.split("::")[0]) for a in config.args] or [tests_dir]
    return (all(p == tests_dir for p in paths) and not config.option.keyword
            and not config.option.markexpr and not getattr(config.option, "lf", False)
            and not getattr(config.option, "deselect", None))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    os.makedirs(_DIR, exist_ok=True)
    worker = _worker_id(config) or "main"
    with open(os.path.join(_DIR, f"launches-{worker}.json"), "w") as f:
        json.dump(list(_seen.values()), f)
    if _worker_id(config) is None:
        manifest = {"full": _full_run(config), "args": list(config.args), "exitstatus": int(exitstatus),
                    "gpu_configs": os.environ.get("PEFTOPS_GPU_CONFIGS") == "1", "finished": time.time()}
        with open(os.path.join(_DIR, "manifest.json"), "w") as f:
            json.dump(manifest, f)
