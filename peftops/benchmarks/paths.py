"""``python -m peftops paths FILE [FILE...]``: the dispatch tables read from measurements.

A GPU run times every op with each of its implementation paths forced (``peftops[<path>]``,
one per path of the op's ``PATHS`` table, ``peftops._dispatch.PathTable``) and with each
unmeasured kernel knob switched (``peftops[<path>:<name>]``: a module attribute such as
``peftops.kernels.lora.TMA_FUSE_S`` set for that provider). This reads a results file and prints

1. per op and measured shape: the fastest path, by how much (the runner-up / the winner), the
   path the shipped ``peftops`` took there and by which table row (the ``<op>.row:<i>`` counter
   the bench records in ``dispatch``; for files without it, the row the table picks for the
   case's shape where its rules can read that shape), and each knob variant against its path;
2. every ``PATHS`` row of every op (``peftops/ops/*.py``): **confirms** (the row's path won, or
   lost by less than ``TIE``, at every measured shape that reaches the row), **contradicts**
   (another path won by more than ``TIE`` at some shape), or **unmeasured**, with the row to
   write (path and evidence text);
3. every knob (discovered from the bench cases' knob providers, ``core.add_knob_provider``, and
   from the file's ``knob`` fields: a new knob joins when a bench module adds its provider):
   confirms / contradicts / unmeasured for its shipped value, with the assignment to write.

Nothing is changed: flipping a row or a knob stays a commit, but a reading, not a judgement.
A file timed on a CPU (the rehearsal) is read the same way, with a warning: its times are
Triton's interpreter's.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import sys

from .check import group, load_results, shape_str

TIE = 0.03  # a path within 3 % of the fastest is not contradicted by it (do_bench's p20-p80 spread at these sizes)


@dataclasses.dataclass
class Knob:
    module: str
    attr: str
    shipped: object
    variants: dict  # provider -> value it sets
    where: set  # ops whose bench cases carry it


def path_tables() -> dict:
    """``PathTable.op`` -> (ops module, table) for every ``PATHS`` in ``peftops.ops``."""
    from .. import ops
    from .._dispatch import PathTable

    tables = {}
    for info in pkgutil.iter_modules(ops.__path__):
        name = f"{ops.__name__}.{info.name}"
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        table = getattr(module, "PATHS", None)
        if isinstance(table, PathTable):
            tables[table.op] = (name, table)
    return tables


def case_tables() -> dict:
    """Bench op -> the ``PathTable.op`` its ``peftops[<path>]`` providers force (from the bench
    cases' ``paths_from`` / ``forced``), for files whose records carry no ``dispatch``."""
    import torch

    from . import METHODS
    from .run import load_cases

    out = {}
    for small in (False, True):
        for case in load_cases(list(METHODS), torch.device("cpu"), torch.bfloat16, small=small):
            for table_op, _path in case.forced.values():
                out.setdefault(case.op, table_op)
    return out


def bench_knobs(records: list[dict] = ()) -> dict:
    """(module, attribute) -> ``Knob``: from every bench case's knob providers (full-size cases,
    built lazily: nothing is allocated) and the ``knob`` fields of ``records``."""
    import torch

    from . import METHODS
    from .run import load_cases

    knobs: dict = {}

    def add(module, values, provider, op):
        for attr, value in values.items():
            key = (module, attr)
            if key not in knobs:
                try:
                    shipped = getattr(importlib.import_module(module), attr)
                except (ImportError, AttributeError):
                    shipped = "(not in this checkout)"
                knobs[key] = Knob(module, attr, shipped, {}, set())
            knobs[key].variants[provider] = value
            knobs[key].where.add(op)

    for case in load_cases(list(METHODS), torch.device("cpu"), torch.bfloat16, small=False):
        for provider, (module, values) in case.knobs.items():
            add(module, values, provider, case.op)
    for r in records:
        if r.get("knob"):
            add(r["knob"]["module"], r["knob"]["set"], r["provider"], r["op"])
    return knobs


def rule_text(rule) -> str:
    try:
        src = inspect.getsource(rule)
    except (OSError, TypeError):
        return "?"
    m = re.search(r"lambda[^:]*:.*?(?=,\s*[\"'f])", src, re.S)
    return " ".join(m.group(0).split()) if m else "?"


def row_reached(table, shape: dict, dispatch: dict | None) -> int | None:
    """The row of ``table`` the shipped path took for a case: the recorded ``<op>.row:<i>``
    counter, else the first row whose rule holds for the case's shape (None where the rules
    need keywords the shape does not have)."""
    if dispatch:
        rows = [int(k.rsplit(":", 1)[1]) for k in dispatch if k.startswith(f"{table.op}.row:")]
        if rows:
            return rows[0]
        if any(k.startswith(f"{table.op}.path:") for k in dispatch):
            return None  # the default (off CUDA) or forced: no row chose it
    for i, (rule, _path, _ev) in enumerate(table.rows):
        try:
            if rule(**shape):
                return i
        except (TypeError, KeyError):
            return None
    return None


def _fmt(ms) -> str:
    from .check import fmt_ms

    return fmt_ms(ms)


def _provider_path(provider: str) -> tuple[str, str | None] | None:
    """``peftops[kernel]`` -> ("kernel", None); ``peftops[kernel:no_fuse_s]`` -> ("kernel", "no_fuse_s")."""
    m = re.fullmatch(r"peftops\[([^\]:]+)(?::([^\]]+))?\]", provider)
    return (m.group(1), m.group(2)) if m else None


def read(records: list[dict], tables: dict | None = None, knobs: dict | None = None, source: str = "",
         op_tables: dict | None = None) -> dict:
    """The three readings (``cases``, ``rows``, ``knobs``) as lists of dicts. ``tables``,
    ``knobs``, ``op_tables``: ``path_tables()``, ``bench_knobs()``, ``case_tables()`` by default."""
    tables = path_tables() if tables is None else tables
    knobs = bench_knobs(records) if knobs is None else knobs
    op_tables = case_tables() if op_tables is None else op_tables
    where = ", ".join(sorted({str(r.get("gpu_name") or r.get("device")) for r in records})) or "?"
    tag = f"{where} ({source})" if source else where
    case_rows, row_cases, knob_cases = [], {}, {}
    for c in group(records):
        paths = {}
        variants = {}
        for p, rec in c.providers.items():
            pp = _provider_path(p)
            if not pp or not rec.get("median_ms"):
                continue
            (paths if pp[1] is None else variants)[pp if pp[1] else pp[0]] = rec["median_ms"]
        # the table the case's forced providers force (a block such as UniPELT's dispatches
        # several ops), else the one its forced-path records counted
        table_op = op_tables.get(c.op)
        for p, rec in c.providers.items():
            if table_op is None and _provider_path(p):
                table_op = next((k.split(".path:")[0] for k in rec.get("dispatch") or {} if ".path:" in k), None)
        shipped = c.providers.get("peftops", {})
        table = tables.get(table_op, (None, None))[1] if table_op else None
        row = row_reached(table, c.shape, shipped.get("dispatch")) if table is not None else None
        took = next((k.split(".path:")[1] for k in shipped.get("dispatch") or {}
                     if table_op and k.startswith(f"{table_op}.path:")), None)
        if took is None and table is not None and row is not None:
            took = table.rows[row][1]
        if not paths and not variants:
            continue
        ranked = sorted(paths.items(), key=lambda kv: kv[1])
        best, best_ms = ranked[0] if ranked else (None, None)
        nxt, nxt_ms = ranked[1] if len(ranked) > 1 else (None, None)
        entry = {"op": c.op, "shape": shape_str(c.shape), "table": table_op, "shipped_path": took, "row": row,
                 "peftops_ms": shipped.get("median_ms"), "fastest": best, "fastest_ms": best_ms, "next": nxt,
                 "next_ms": nxt_ms, "margin": nxt_ms / best_ms if nxt_ms and best_ms else None, "knobs": []}
        case_rows.append(entry)
        if table is not None and row is not None and len(ranked) > 1:
            row_path = table.rows[row][1]
            row_ms = paths.get(row_path)
            if row_ms:
                verdict = "confirms" if row_ms <= best_ms * (1 + TIE) else "contradicts"
                evidence = (f"{tag}: {c.op} {shape_str(c.shape)}: " + ", ".join(f"{p} {_fmt(ms)} ms" for p, ms in ranked))
                row_cases.setdefault((table_op, row), []).append({"verdict": verdict, "winner": best,
                                                                  "ratio": row_ms / best_ms, "evidence": evidence})
        for (path, name), ms in variants.items():
            base = paths.get(path)
            provider = f"peftops[{path}:{name}]"
            entry["knobs"].append(f"{name} {_fmt(ms)}" + (f" ({ms / base:.2f}x {path})" if base else ""))
            if not base:
                continue
            for key, k in knobs.items():
                if provider in k.variants:
                    faster = ms < base * (1 - TIE)
                    knob_cases.setdefault(key, []).append({
                        "verdict": "contradicts" if faster else "confirms", "value": k.variants[provider],
                        "ratio": ms / base,
                        "evidence": f"{tag}: {c.op} {shape_str(c.shape)}: {path} {_fmt(base)} ms, {name} {_fmt(ms)} ms"})
    rows = []
    for table_op, (module, table) in sorted(tables.items()):
        for i, (rule, path, _evidence) in enumerate(table.rows):
            seen = row_cases.get((table_op, i), [])
            bad = [s for s in seen if s["verdict"] == "contradicts"]
            if not seen:
                verdict, write = "unmeasured", "keep (no measured shape reaches this row)"
            elif bad:
                winners = sorted({s["winner"] for s in bad})
                verdict = "contradicts"
                write = (f"({rule_text(rule)}, {winners[0]!r}, \"{'; '.join(s['evidence'] for s in bad)}\")"
                         + ("" if len(winners) == 1 else f"  (winners differ by shape: {winners}: split the row)"))
            else:
                verdict = "confirms"
                write = f"({rule_text(rule)}, {path!r}, \"{'; '.join(s['evidence'] for s in seen)}\")"
            rows.append({"table": table_op, "module": module, "row": i, "rule": rule_text(rule), "path": path,
                         "verdict": verdict, "shapes": len(seen), "write": write})
    knob_rows = []
    for key, k in sorted(knobs.items()):
        seen = knob_cases.get(key, [])
        bad = [s for s in seen if s["verdict"] == "contradicts"]
        if not seen:
            verdict, write = "unmeasured", f"keep {k.attr} = {k.shipped!r} (no case times {', '.join(sorted(k.variants))})"
        elif bad:
            verdict = "contradicts" if len(bad) == len(seen) else "contradicts (at some shapes)"
            write = (f"{k.attr} = {bad[0]['value']!r}" + ("" if len(bad) == len(seen) else " where it wins")
                     + f"  # {'; '.join(s['evidence'] for s in bad)}")
        else:
            verdict, write = "confirms", f"{k.attr} = {k.shipped!r}  # {'; '.join(s['evidence'] for s in seen)}"
        knob_rows.append({"knob": f"{k.module}.{k.attr}", "shipped": k.shipped, "providers": ", ".join(sorted(k.variants)),
                          "verdict": verdict, "shapes": len(seen), "write": write})
    return {"cases": case_rows, "rows": rows, "knobs": knob_rows}


def main(paths: list[str], out=sys.stdout) -> int:
    from .core import table

    records = load_results(paths)
    source = ", ".join(os.path.basename(p) for p in paths)
    result = read(records, source=source)

    def p(*a):
        print(*a, file=out)

    p(f"paths: {source} ({len(records)} records)")
    if any(r.get("device") == "cpu" for r in records):
        p("WARNING: records timed on a CPU (the rehearsal): Triton's interpreter, not a GPU -- write nothing from these")
    p("")
    p("Per op and measured shape: the fastest path (peftops[<path>]), by how much, and the knob variants")
    if result["cases"]:
        p(table([{**c, "margin": None if c["margin"] is None else f"{c['margin']:.2f}x",
                  "knobs": "; ".join(c["knobs"]) or "-",
                  "shipped": f"{c['shipped_path'] or '?'}" + (f" (row {c['row']})" if c["row"] is not None else "")}
                 for c in result["cases"]],
                [("op", "op"), ("shape", "shape"), ("shipped", "shipped"), ("peftops ms", "peftops_ms"),
                 ("fastest", "fastest"), ("ms", "fastest_ms"), ("next", "next"), ("next ms", "next_ms"),
                 ("next/fastest", "margin"), ("knob variants (ms)", "knobs")]))
    else:
        p("(no peftops[<path>] or knob provider timed in this file)")
    p("")
    p(f"PATHS rows (peftops/ops/*.py): confirmed / contradicted (another path > {TIE:.0%} faster) / unmeasured")
    p(table(result["rows"], [("op", "table"), ("row", "row"), ("rule", "rule"), ("path", "path"),
                             ("verdict", "verdict"), ("shapes", "shapes")]))
    p("")
    p("Knobs (from the bench's knob providers)")
    p(table(result["knobs"], [("knob", "knob"), ("shipped", "shipped"), ("providers", "providers"),
                              ("verdict", "verdict"), ("shapes", "shapes")]))
    todo = [r for r in result["rows"] if r["verdict"] != "unmeasured"] + \
           [k for k in result["knobs"] if k["verdict"] != "unmeasured"]
    p("")
    p("To write:" if todo else "To write: nothing (every row and knob unmeasured in this file)")
    for r in result["rows"]:
        if r["verdict"] != "unmeasured":
            p(f"  {r['module']} PATHS row {r['row']} ({r['verdict']}): {r['write']}")
    for k in result["knobs"]:
        if k["verdict"] != "unmeasured":
            p(f"  {k['knob']} ({k['verdict']}): {k['write']}")
    n = {v: sum(1 for r in result["rows"] + result["knobs"] if r["verdict"].startswith(v))
         for v in ("confirms", "contradicts", "unmeasured")}
    p(f"\nrows + knobs: {n['confirms']} confirmed, {n['contradicts']} contradicted, {n['unmeasured']} unmeasured")
    return 0
