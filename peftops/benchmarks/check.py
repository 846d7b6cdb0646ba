"""``python -m peftops bench --check FILE...``: a results file against ``bench/targets.toml``.

Two verdicts, both from numbers that ran side by side in one process (one results file):

* the rule, on every case in the file: ``peftops`` must not be slower than the fastest of
  the rival providers present for that case (``eager``, ``compile``, ``peft``; for prefix
  attention also ``sdpa_concat``);
* the bars, one per op and shape in targets.toml: a ratio against a denominator (the cuBLAS
  base layer, SDPA without a prefix, torch.compile, the HBM floor ...) that must be met.
  A bar whose case or denominator is not in the file is "not measured", never passed.

Exit status, a bit mask (0 when all is well): 1 = a case slower than its best rival,
2 = a bar missed, 4 = a bar not measured. No GPU or Triton needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

RULE_FAIL, BAR_MISSED, NOT_MEASURED = 1, 2, 4
DEFAULT_TARGETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "bench", "targets.toml")


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib
    return tomllib


def load_targets(path: str | None = None) -> dict:
    path = path or find_targets()
    with open(path, "rb") as f:
        data = _toml().load(f)
    data.setdefault("rule", {})
    data["rule"].setdefault("provider", "peftops")
    data["rule"].setdefault("rivals", ["eager", "compile", "peft"])
    data["rule"].setdefault("slack", 1.0)
    data["rule"].setdefault("dtype", "bfloat16")
    data["rule"].setdefault("extra_rivals", {})
    data.setdefault("floor", {})
    data.setdefault("target", [])
    for t in data["target"]:
        for key in ("op", "shape", "denominator", "bar", "must"):
            if key not in t:
                raise ValueError(f"{path}: a [[target]] has no {key!r}: {t}")
        if t["bar"] not in ("<=", ">="):
            raise ValueError(f"{path}: bar must be '<=' or '>=', got {t['bar']!r} in {t}")
    data["path"] = path
    return data


def find_targets() -> str:
    """bench/targets.toml of this checkout, else of the current directory."""
    for p in (DEFAULT_TARGETS, os.path.join("bench", "targets.toml")):
        if os.path.exists(p):
            return p
    raise FileNotFoundError("bench/targets.toml not found (pass --targets)")


def load_results(paths: list[str]) -> list[dict]:
    """The records of one or more results files; a later file's record replaces an earlier
    one of the same (op, shape, dtype, provider)."""
    from .core import load_records, merge

    records: list[dict] = []
    for p in paths:
        records = merge(records, load_records(p))
    return records


def shape_key(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items())


@dataclasses.dataclass
class Case:
    op: str
    shape: dict
    dtype: str
    providers: dict  # name -> record

    def ms(self, provider: str) -> float | None:
        r = self.providers.get(provider)
        return r.get("median_ms") if r else None

    @property
    def label(self) -> str:
        return f"{self.op} {shape_str(self.shape)}"


def group(records: list[dict]) -> list[Case]:
    """Records by case (op, shape, dtype), in file order."""
    cases: dict = {}
    for r in records:
        key = (r["op"], shape_key(r["shape"]), r.get("dtype"))
        if key not in cases:
            cases[key] = Case(r["op"], r["shape"], r.get("dtype"), {})
        cases[key].providers[r["provider"]] = r
    return list(cases.values())


@dataclasses.dataclass
class RuleRow:
    case: Case
    provider: str
    ms: float | None
    rival: str | None
    rival_ms: float | None
    status: str  # "ok", "SLOWER", "no peftops", "no rival"
    ratio: float | None  # provider / best rival

    @property
    def failed(self) -> bool:
        return self.status == "SLOWER"


@dataclasses.dataclass
class BarRow:
    target: dict
    case: Case | None
    provider: str
    value: float | None  # the provider's metric
    den_value: float | None
    ratio: float | None
    status: str  # "met", "MISSED", "not measured"
    reason: str = ""
    moon: bool | None = None

    @property
    def op(self) -> str:
        return self.target["op"]

    @property
    def label(self) -> str:
        return f"{self.target['op']} {shape_str(self.target['shape'])}"


HBM_OP, GEMM_OP = "floor.hbm_copy", "floor.gemm"  # peftops.benchmarks.floors
FLOOR_DENOMINATORS = ("hbm_floor", "gemm_floor")


def floors(records: list[dict], targets: dict | None = None) -> dict:
    """The floors a file's ratios use: ``hbm_bytes_per_s`` (the fastest ``floor.hbm_copy``
    record: a device-to-device copy, read + write bytes) and ``gemm_flops_per_s`` (the fastest
    ``floor.gemm`` record, the vendor GEMM at the bench's shapes), each measured in the same run
    as the cases; for a file without them (runs before the floors were recorded, e.g. the H100
    baseline) the targets' ``[floor]`` constants, labelled nominal. ``source`` says which:
    ``"measured"``, ``"nominal"``, ``"mixed"`` or ``"none"``; ``hbm_label`` / ``gemm_label``
    the words printed with them."""
    nominal = (targets or {}).get("floor", {})

    def best(op: str, key: str, scale: float):
        timed = [r for r in records if r.get("op") == op and r.get("median_ms") and r.get(key)]
        top = max(timed, key=lambda r: r[key], default=None)
        return (top[key] * scale, top) if top else (None, None)

    hbm, hrec = best(HBM_OP, "gb_per_s", 1e9)
    gemm, grec = best(GEMM_OP, "tflops", 1e12)
    out = {"hbm_bytes_per_s": hbm, "gemm_flops_per_s": gemm, "hbm_measured": hbm is not None,
           "gemm_measured": gemm is not None}
    where = lambda r: r.get("gpu_name") or r.get("device") or "?"  # noqa: E731
    if hbm:
        out["hbm_label"] = (f"{_rate(hbm, 'B/s')} measured ({HBM_OP} {shape_str(hrec['shape'])}, {where(hrec)})")
    elif nominal.get("hbm_bytes_per_s"):
        out["hbm_bytes_per_s"] = nominal["hbm_bytes_per_s"]
        out["hbm_label"] = (f"{_rate(nominal['hbm_bytes_per_s'], 'B/s')} NOMINAL (targets [floor]; "
                            f"no {HBM_OP} record in the file)")
    else:
        out["hbm_label"] = "none (no floor.hbm_copy record, no [floor] hbm_bytes_per_s)"
    if gemm:
        out["gemm_label"] = (f"{_rate(gemm, 'FLOP/s')} measured ({GEMM_OP} {shape_str(grec['shape'])} "
                             f"{grec.get('dtype')}, {where(grec)})")
    elif nominal.get("gemm_flops_per_s"):
        out["gemm_flops_per_s"] = nominal["gemm_flops_per_s"]
        out["gemm_label"] = (f"{_rate(nominal['gemm_flops_per_s'], 'FLOP/s')} NOMINAL (targets [floor]; "
                             f"no {GEMM_OP} record in the file)")
    else:
        out["gemm_label"] = f"none (no {GEMM_OP} record, no [floor] gemm_flops_per_s)"
    kinds = {out["hbm_measured"], out["gemm_measured"]}
    if out["hbm_bytes_per_s"] is None and out["gemm_flops_per_s"] is None:
        out["source"] = "none"
    else:
        out["source"] = "mixed" if len(kinds) == 2 else "measured" if True in kinds else "nominal"
    return out


def _rate(v: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def floors_line(fl: dict) -> str:
    return f"floors: HBM {fl['hbm_label']}; GEMM {fl['gemm_label']}"


def _floor_ms(record: dict, hbm: float | None) -> float | None:
    """The HBM floor of a case in ms: its bytes (recorded, or from GB/s x ms) / bandwidth."""
    if not hbm:
        return None
    nbytes = record.get("bytes")
    if not nbytes and record.get("gb_per_s") and record.get("median_ms"):
        nbytes = record["gb_per_s"] * 1e6 * record["median_ms"]
    return nbytes / hbm * 1e3 if nbytes else None


def _gemm_floor_ms(record: dict, rate: float | None) -> float | None:
    """The GEMM floor of a case in ms: its useful FLOPs / the measured GEMM rate."""
    if not rate:
        return None
    flops = record.get("flops")
    if not flops and record.get("tflops") and record.get("median_ms"):
        flops = record["tflops"] * 1e9 * record["median_ms"]
    return flops / rate * 1e3 if flops else None


def floor_ms(den: str, record: dict, fl: dict) -> float | None:
    """A floor denominator (``hbm_floor`` / ``gemm_floor``) of a case, in ms."""
    if den == "hbm_floor":
        return _floor_ms(record, fl["hbm_bytes_per_s"])
    return _gemm_floor_ms(record, fl["gemm_flops_per_s"])


def is_case(c: Case) -> bool:
    """A benchmark case (not a ``floor.*`` measurement, nor the ``*`` record of a method that
    could not run here)."""
    return not c.op.startswith("floor.") and set(c.providers) != {"*"}


def rule_rows(cases: list[Case], targets: dict) -> list[RuleRow]:
    rule = targets["rule"]
    provider = rule["provider"]
    rows = []
    for c in cases:
        if not is_case(c):
            continue
        ms = c.ms(provider)
        rivals = [*rule["rivals"], *rule["extra_rivals"].get(c.op, [])]
        timed = [(c.ms(p), p) for p in rivals if c.ms(p)]
        best_ms, best = min(timed) if timed else (None, None)
        if not ms:
            status, ratio = "no peftops", None
        elif best_ms is None:
            status, ratio = "no rival", None
        else:
            ratio = ms / best_ms
            status = "ok" if ratio <= rule["slack"] else "SLOWER"
        rows.append(RuleRow(c, provider, ms, best, best_ms, status, ratio))
    return rows


def bar_rows(cases: list[Case], targets: dict, fl: dict | None = None) -> list[BarRow]:
    """``fl``: the floors (``floors``) of the records the cases come from; without it, the
    floors of the cases' own records (measured where the file has ``floor.*`` records)."""
    index = {(c.op, shape_key(c.shape), c.dtype): c for c in cases}
    if fl is None:
        fl = floors([r for c in cases for r in c.providers.values()], targets)
    rows = []
    for t in targets["target"]:
        dtype = t.get("dtype", targets["rule"]["dtype"])
        provider = t.get("provider", targets["rule"]["provider"])
        metric = t.get("metric", "median_ms")
        c = index.get((t["op"], shape_key(t["shape"]), dtype))
        row = BarRow(t, c, provider, None, None, None, "not measured")
        rows.append(row)
        if c is None:
            row.reason = "case not in the file"
            continue
        rec = c.providers.get(provider)
        row.value = rec.get(metric) if rec else None
        if not row.value:
            row.reason = f"no {provider}" + (f" ({rec['error'][:60]})" if rec and rec.get("error") else "")
            continue
        den = t["denominator"]
        if den in FLOOR_DENOMINATORS:
            row.den_value = floor_ms(den, rec, fl)
        else:
            drec = c.providers.get(den)
            row.den_value = drec.get(metric) if drec else None
        if not row.den_value:
            row.reason = f"no {den}"
            continue
        row.ratio = row.value / row.den_value if t["bar"] == "<=" else row.den_value / row.value
        better = (lambda a, b: a <= b) if t["bar"] == "<=" else (lambda a, b: a >= b)
        row.status = "met" if better(row.ratio, t["must"]) else "MISSED"
        if "moonshot" in t:
            row.moon = better(row.ratio, t["moonshot"])
    return rows


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_ratio(t: dict, v: float | None) -> str:
    """A bar's ratio in its own words: '7.74x cublas_base', '67% of HBM floor', '0.39x speed-up vs eager'."""
    if v is None:
        return "-"
    if t["denominator"] in FLOOR_DENOMINATORS:
        return f"{v:.0%} of {'HBM' if t['denominator'] == 'hbm_floor' else 'GEMM'} floor"
    if t.get("metric", "median_ms") != "median_ms":
        return f"{v:.2f}x {t['denominator']} mem"
    return f"{v:.2f}x {t['denominator']}" if t["bar"] == "<=" else f"{v:.2f}x speed-up vs {t['denominator']}"


def fmt_bar(t: dict, key: str = "must") -> str:
    if key not in t:
        return "-"
    v = t[key]
    return f"{t['bar']} {v:.0%}" if t["denominator"] in FLOOR_DENOMINATORS else f"{t['bar']} {v:g}x"


def fmt_value(row: BarRow) -> str:
    if row.value is None:
        return "-"
    metric = row.target.get("metric", "median_ms")
    return fmt_ms(row.value) if metric == "median_ms" else f"{row.value / 2**30:.1f} GiB"


def paths_str(c: Case) -> str:
    out = [f"{p[len('peftops['):-1]} {fmt_ms(r.get('median_ms'))}" for p, r in c.providers.items()
           if p.startswith("peftops[")]
    return ", ".join(out) or "-"


def environment_line(records: list[dict]) -> str:
    def values(key):
        return ", ".join(sorted({str(r.get(key)) for r in records if r.get(key) is not None})) or "?"
    gpu = values("gpu_name")
    if gpu == "?":
        gpu = values("device")
    return f"{gpu}; torch {values('torch')}; triton {values('triton')}; commit {values('commit')}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    from .core import table

    keys = [str(i) for i in range(len(header))]
    return table([dict(zip(keys, r)) for r in rows], list(zip(header, keys)))


def check(paths: list[str], targets_path: str | None = None, out=sys.stdout) -> int:
    records = load_results(paths)
    targets = load_targets(targets_path)
    cases = group(records)
    rules = rule_rows(cases, targets)
    fl = floors(records, targets)
    bars = bar_rows(cases, targets, fl)
    rivals = " / ".join(targets["rule"]["rivals"])

    def p(*a):
        print(*a, file=out)

    p(f"results: {', '.join(paths)} ({len(records)} records, {len(cases)} cases)")
    p(f"         {environment_line(records)}")
    p(f"targets: {targets['path']} ({len(bars)} bars)")
    p(floors_line(fl))
    if any(r.get("device") == "cpu" for r in records):
        p("WARNING: records timed on a CPU (the rehearsal of bench/gpu_session.sh): Triton's interpreter, not speeds")
    for c in cases:
        if set(c.providers) == {"*"}:
            p(f"not benchmarked here: {c.op}: {c.providers['*'].get('skipped') or c.providers['*'].get('error')}")
    p("")
    p(f"Bars (bench/targets.toml): {targets['rule']['provider']} against each bar's denominator")
    p(_table([[b.op, shape_str(b.target["shape"]) + ("" if b.provider == "peftops" else f" [{b.provider}]"),
               fmt_value(b), b.target["denominator"] + (f" {fmt_ms(b.den_value)}" if b.den_value else ""),
               fmt_ratio(b.target, b.ratio), fmt_bar(b.target), fmt_bar(b.target, "moonshot"),
               b.status + (f" ({b.reason})" if b.reason else ""),
               "-" if b.moon is None else "yes" if b.moon else "no"] for b in bars],
             ["op", "shape", "peftops", "denominator", "ratio", "bar", "moonshot", "status", "moon met"]))
    p("")
    p(f"Every case: {targets['rule']['provider']} vs the fastest of {rivals} (+ sdpa_concat for prefix attention)")
    p(_table([[r.case.op, shape_str(r.case.shape), fmt_ms(r.ms), r.rival or "-", fmt_ms(r.rival_ms),
               "-" if r.ratio is None else f"{r.ratio:.2f}x", r.status, paths_str(r.case)] for r in rules],
             ["op", "shape", "peftops ms", "best rival", "rival ms", "peftops/best", "verdict", "paths (ms)"]))
    p("")

    slower = [r for r in rules if r.failed]
    judged = [r for r in rules if r.status in ("ok", "SLOWER")]
    missed = [b for b in bars if b.status == "MISSED"]
    unmeasured = [b for b in bars if b.status == "not measured"]
    met = [b for b in bars if b.status == "met"]
    moons = [b for b in bars if b.moon]
    p(f"RULE: peftops slower than the best of {rivals} in {len(slower)} of {len(judged)} cases"
      + (f" ({len(rules) - len(judged)} without peftops or a rival)" if len(rules) > len(judged) else ""))
    for r in slower:
        p(f"  SLOWER  {r.case.label}: {fmt_ms(r.ms)} ms = {r.ratio:.2f}x {r.rival} ({fmt_ms(r.rival_ms)} ms)")
    p(f"BARS: {len(met)} met, {len(missed)} missed, {len(unmeasured)} not measured (of {len(bars)}); "
      f"moonshots met: {len(moons)}")
    for b in missed:
        who = "" if b.provider == "peftops" else f" [{b.provider}]"
        p(f"  MISSED  {b.label}{who}: {fmt_ratio(b.target, b.ratio)}, bar {fmt_bar(b.target)}")
    for b in unmeasured:
        who = "" if b.provider == "peftops" else f" [{b.provider}]"
        p(f"  NOT MEASURED  {b.label}{who}: {b.reason}")
    code = (RULE_FAIL if slower else 0) | (BAR_MISSED if missed else 0) | (NOT_MEASURED if unmeasured else 0)
    p(f"exit {code} (bits: {RULE_FAIL} = a case slower than its best rival, {BAR_MISSED} = a bar missed, "
      f"{NOT_MEASURED} = a bar not measured)")
    return code
