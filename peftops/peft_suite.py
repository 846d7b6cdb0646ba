"""pytest plugin: peft's own test suite with every peft model it builds run through
``peftops.accelerate`` (the CI step "peft's own suite, accelerated" in ``.ci/run``; README).

Run it inside peft's unpacked sdist (the sdist carries ``tests/``; it lacks
``tests/__init__.py``, which the relative imports need: create it empty)::

    TRITON_INTERPRET=1 PEFTOPS_BACKEND=triton python -m pytest -p peftops.peft_suite \\
        -o addopts= -n 2 tests/test_custom_models.py -k "LoRA or IA3 ..."

* **Every model accelerated.** peft builds and changes tuner layers only in
  ``BaseTuner.inject_adapter`` (``get_peft_model``, ``PeftModel(...)``,
  ``PeftModel.from_pretrained``, ``add_adapter``, ``load_adapter``, ``inject_adapter_in_model``,
  ``add_weighted_adapter``, a tuner model built directly) and changes which adapters a layer
  holds or runs in ``set_adapter`` / ``delete_adapter``. Each of those (on ``BaseTuner`` and on
  every tuner that overrides it) is wrapped to call ``peftops.accelerate`` on the model when it
  returns; ``accelerate`` is idempotent, so a layer is swapped once and later calls only pick up
  new layers. The wrapper counts the layers it swapped; the kernel launches are
  ``dispatch_counts()["launch.*"]``.
* **A failure counts only if it is ours.** A test that fails accelerated is run again in the
  same process without acceleration (the wrappers off): if it fails there too it is peft's or
  the environment's problem and is reported as xfailed ("fails without peftops too"), not
  fatal; if it passes plain, it is run accelerated once more (to tell a flaky test from ours)
  and, failing again, it fails the run, its report marked "passes without peftops.accelerate".
  Only failing tests are run twice, so the step costs one accelerated run of the selection.
* **It cannot pass vacuously.** The session fails when no test swapped a layer or no peftops
  kernel was launched; the terminal summary gives the counts (tests that swapped layers, layers
  swapped, tests that launched kernels, launches, layer calls sent to peft's forward at run
  time) and names every test that failed plain too, failed only accelerated, or was flaky.
  ``--peftops-suite-json PATH`` writes them, per test, as JSON.
* ``--peftops-plain`` runs the same selection with nothing accelerated (no wrappers, reruns or
  zero check) for a plain baseline.
* peft's ``testing_common`` / ``testing_utils`` import ``diffusers`` and ``datasets`` at module
  level, for tests outside ``test_custom_models``' LoRA / IA3 cases; where they are not
  installed, placeholders (using them raises) stand in for them while pytest imports the test
  modules, and are removed from ``sys.modules`` right after, so availability checks
  (``importlib.util.find_spec``) still see them missing.

Counts and verdicts travel on each test's teardown report (``user_properties``), so under
pytest-xdist the controlling process sums what the workers ran.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
import re
import sys
import types

import pytest

_PROP = "peftops_suite"
_WRAPPED = ("inject_adapter", "set_adapter", "delete_adapter")
_state = {"accelerate": False, "swapped": 0}  # the wrappers' switch; layers swapped in this attempt
_tests: dict[str, dict] = {}  # nodeid -> counts and verdict (the process that reports)


# ------------------------------------------------------------------------- options / setup
def pytest_addoption(parser):
    group = parser.getgroup("peftops", "peft's suite through peftops.accelerate")
    group.addoption("--peftops-plain", action="store_true",
                    help="run the selection without accelerating anything (a plain baseline)")
    group.addoption("--peftops-suite-json", metavar="PATH", default=None,
                    help="write per-test counts and verdicts as JSON")
    group.addoption("--peftops-select", metavar="KINDS", default=None,
                    help="keep only the tests of these kinds (comma-separated: lora, dora, ia3, mixed; see _kind)")
    group.addoption("--peftops-cases", metavar="KIND=N,...", default="",
                    help="keep at most N parametrised cases of each test function of KIND, spread evenly over "
                         "its cases (a stratified subset: every test function stays, fewer model / config cases)")


def _plain(config) -> bool:
    return bool(config.getoption("--peftops-plain"))


def pytest_configure(config):
    if _plain(config):
        return
    _wrap_peft()
    logging.getLogger("peftops").setLevel(logging.ERROR)  # accelerate's summary of left layers, per model


def _accelerated_classes() -> set:
    from .integrations.accelerate import accelerated_classes

    return set(accelerated_classes().values())


def _after(method_name: str, method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if _state["accelerate"]:
            model = args[0] if method_name == "inject_adapter" and args else kwargs.get("model", self.model)
            _accelerate(model)
        return out

    wrapper._peftops_suite = True
    return wrapper


def _accelerate(model) -> None:
    from .integrations.accelerate import accelerate

    ours = _accelerated_classes()
    before = sum(type(m) in ours for m in model.modules())
    accelerate(model)
    _state["swapped"] += sum(type(m) in ours for m in model.modules()) - before


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _wrap_peft() -> None:
    import peft  # noqa: F401  (imports every tuner, so every BaseTuner subclass exists)
    from peft.tuners.tuners_utils import BaseTuner

    for cls in (BaseTuner, *_subclasses(BaseTuner)):
        for name in _WRAPPED:
            method = vars(cls).get(name)
            if method is not None and not getattr(method, "_peftops_suite", False):
                setattr(cls, name, _after(name, method))


# -------------------------------------------------------------------------- selection
_OURS = {"LoraConfig": "lora", "IA3Config": "ia3"}
_CONFIG_CALL = re.compile(r"\b(\w+Config)\(")


def _config_names(value) -> set[str]:
    if isinstance(value, type):
        return {value.__name__} if value.__name__.endswith("Config") else set()
    if type(value).__name__.endswith("Config"):
        return {type(value).__name__}
    return set()


def _uses_dora(params: dict) -> bool:
    for v in params.values():
        if getattr(v, "use_dora", False) is True or (isinstance(v, dict) and v.get("use_dora") is True):
            return True
    return False


def _kind(item) -> str | None:
    """lora / dora / ia3 / mixed, or None (another tuner, or several).

    Mixed: peft's mixed-adapter-batch tests (``adapter_names=``). Parametrised tests: by the
    peft config classes / instances among the parameters (DoRA: ``use_dora=True``). Others: by
    the ``...Config(`` calls in the test's source, then by the words of its name (``lora``,
    ``dora``, ``ia3``: so ``test_repr_lora_linear``, not ``test_requires_grad_adalora_...``)."""
    name = getattr(item, "originalname", item.name)
    if "mixed_adapter_batches" in name:
        return "mixed"
    params = getattr(getattr(item, "callspec", None), "params", {})
    configs = set().union(*(_config_names(v) for v in params.values())) if params else set()
    dora = _uses_dora(params)
    if not configs:
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError, AttributeError):
            source = ""
        configs = set(_CONFIG_CALL.findall(source)) - {"PeftConfig"}
        dora = "use_dora=True" in source
    if configs:
        kinds = {_OURS.get(c) for c in configs}
        if len(kinds) != 1 or None in kinds:
            return None
        (kind,) = kinds
    else:
        words = set(name.split("_"))
        found = [k for k in ("dora", "lora", "ia3") if k in words]
        if not found:
            return None
        kind = found[0]
    return "dora" if kind == "lora" and (dora or "dora" in name.split("_")) else kind


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (first and last included)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def pytest_collection_modifyitems(config, items):
    select = config.getoption("--peftops-select")
    if not select:
        return
    kinds = {k.strip() for k in select.split(",") if k.strip()}
    unknown = kinds - {"lora", "dora", "ia3", "mixed"}
    if unknown:
        raise pytest.UsageError(f"--peftops-select: unknown kind(s) {sorted(unknown)}")
    caps = {}
    for part in filter(None, (p.strip() for p in config.getoption("--peftops-cases").split(","))):
        kind, _, n = part.partition("=")
        caps[kind.strip()] = int(n)
    keep, groups = [], {}
    for item in items:
        kind = _kind(item)
        if kind in kinds:
            groups.setdefault((kind, item.module.__name__, getattr(item.cls, "__name__", ""),
                               getattr(item, "originalname", item.name)), []).append(item)
    chosen = set()
    for (kind, *_), group in groups.items():
        cap = caps.get(kind)
        picked = group if cap is None else [group[i] for i in _spread(len(group), cap)]
        chosen.update(id(i) for i in picked)
    keep = [i for i in items if id(i) in chosen]
    dropped = [i for i in items if id(i) not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


# ----------------------------------------------------------- placeholders while importing
def _placeholder(name: str, attrs: tuple[str, ...]) -> types.ModuleType:
    mod = types.ModuleType(name, f"peftops.peft_suite placeholder: {name} is not installed")

    def missing(*args, **kwargs):
        raise ModuleNotFoundError(f"{name} is not installed (a peftops.peft_suite placeholder stood in for it)")

    for attr in attrs:
        setattr(mod, attr, type(attr, (), {"__init__": missing, "from_pretrained": staticmethod(missing)})
                if attr[0].isupper() else missing)
    return mod


_PLACEHOLDERS = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    if not isinstance(collector, pytest.Module):
        yield
        return
    added = [n for n in _PLACEHOLDERS if n not in sys.modules and importlib.util.find_spec(n) is None]
    for n in added:
        sys.modules[n] = _placeholder(n, _PLACEHOLDERS[n])
    try:
        yield
    finally:
        for n in added:
            sys.modules.pop(n, None)


# -------------------------------------------------------------------- the test protocol
def _launches() -> tuple[int, int]:
    from ._dispatch import dispatch_counts

    c = dispatch_counts()
    return (sum(v for k, v in c.items() if k.startswith("launch.")),
            sum(v for k, v in c.items() if k.startswith("accelerate.") and k.endswith(".peft_forward")))


def _attempt(item, nextitem, accelerated: bool):
    from _pytest.runner import runtestprotocol

    _state["accelerate"], _state["swapped"] = accelerated, 0
    launches0, peft0 = _launches()
    try:
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    finally:
        _state["accelerate"] = False
    launches1, peft1 = _launches()
    counts = {"swapped": _state["swapped"], "launches": launches1 - launches0, "peft_forward": peft1 - peft0}
    return reports, counts


def _failed(reports) -> bool:
    return any(r.failed for r in reports)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if _plain(item.config):
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports, counts = _attempt(item, nextitem, accelerated=True)
    verdict = "passed" if not _failed(reports) else None
    if verdict is None:
        plain, _ = _attempt(item, nextitem, accelerated=False)
        if _failed(plain):
            verdict = "fails_plain"
            for r in reports:
                if r.failed:  # shown as xfailed: peft's / the environment's, not ours
                    crash = (getattr(getattr(r.longrepr, "reprcrash", None), "message", "") or "?").splitlines()[0][:160]
                    r.outcome, r.wasxfail = "skipped", f"fails without peftops.accelerate too ({r.when}: {crash})"
        else:
            again, _ = _attempt(item, nextitem, accelerated=True)
            if _failed(again):
                verdict = "accelerated_only"
                for r in reports:
                    if r.failed:
                        r.sections.append(("peftops.peft_suite", "passes without peftops.accelerate; failed "
                                                                 "accelerated twice (before and after the plain run)"))
            else:
                verdict, reports = "flaky", again
    if verdict == "passed" and any(hasattr(r, "wasxfail") for r in reports):
        verdict = "xfailed"  # peft's own xfail marks
    elif verdict == "passed" and any(r.skipped for r in reports):
        verdict = "skipped"
    counts["verdict"], counts["kind"] = verdict, _kind(item)
    last = reports[-1]
    last.user_properties = [*last.user_properties, (_PROP, counts)]
    for r in reports:
        ihook.pytest_runtest_logreport(report=r)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == _PROP:
            _tests[report.nodeid] = dict(value)


# ------------------------------------------------------------------------ session verdict
def _totals() -> dict:
    t = {"tests": len(_tests), "tests_swapping": 0, "swapped": 0, "tests_launching": 0, "launches": 0,
         "peft_forward": 0}
    for c in _tests.values():
        t["tests_swapping"] += c["swapped"] > 0
        t["tests_launching"] += c["launches"] > 0
        for k in ("swapped", "launches", "peft_forward"):
            t[k] += c[k]
    for verdict in ("passed", "skipped", "xfailed", "fails_plain", "accelerated_only", "flaky"):
        t[verdict] = sorted(n for n, c in _tests.items() if c["verdict"] == verdict)
    return t


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _vacuous(t: dict) -> str | None:
    if t["swapped"] == 0:
        return "no test swapped a peft layer to a peftops class"
    if t["launches"] == 0:
        return "no peftops kernel was launched"
    return None


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if _plain(config) or _is_worker(config) or config.option.collectonly:
        return
    t = _totals()
    path = config.getoption("--peftops-suite-json")
    if path:
        with open(path, "w") as f:
            json.dump({"totals": t, "tests": _tests}, f, indent=1, sort_keys=True)
    if (_vacuous(t) is not None and session.exitstatus == 0) or session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _plain(config) or _is_worker(config) or config.option.collectonly:
        return
    t = _totals()
    w = terminalreporter
    w.section("peftops.peft_suite")
    from ._dispatch import backend

    w.line(f"backend {backend()}; {t['tests']} tests ran accelerated: {t['tests_swapping']} swapped "
           f"{t['swapped']} peft layer(s) to peftops classes, {t['tests_launching']} launched {t['launches']} "
           f"peftops kernel(s); {t['peft_forward']} layer call(s) went to peft's forward at run time")
    w.line(f"passed {len(t['passed'])}, skipped {len(t['skipped'])}, xfailed by peft {len(t['xfailed'])}, failed without peftops too (xfailed, "
           f"not ours) {len(t['fails_plain'])}, failed only accelerated {len(t['accelerated_only'])}, "
           f"flaky (failed once accelerated, then passed) {len(t['flaky'])}")
    by_kind: dict[str, list[int]] = {}
    for c in _tests.values():
        row = by_kind.setdefault(str(c.get("kind")), [0, 0, 0])
        row[0] += 1
        row[1] += c["swapped"] > 0
        row[2] += c["launches"] > 0
    w.line("by kind (tests / swapped a layer / launched a kernel): " + ", ".join(
        f"{k} {n} / {s} / {la}" for k, (n, s, la) in sorted(by_kind.items())))
    for verdict, title in (("accelerated_only", "FAILED ONLY ACCELERATED"), ("fails_plain", "failed plain too"),
                           ("flaky", "flaky")):
        for nodeid in t[verdict]:
            w.line(f"  {title}: {nodeid}")
    why = _vacuous(t)
    if why is not None:
        w.line(f"peftops.peft_suite: FAILED: {why}: the step would pass without testing peftops", red=True)
