"""``python -m peftops report FILE [--readme README.md] [--png PATH]``: the README's
performance section and a chart, both written from a results file (no number typed by hand).

* markdown: the GPU, torch / triton, commit and file above a table of the bars
  (bench/targets.toml) and, folded, every case against the fastest of eager / compile /
  peft; written into the README between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``
  (or printed when no README is given);
* PNG (matplotlib, Agg): one row per case, each provider's time as x-times the case's
  denominator (the bar's denominator where the case has a bar, else the cuBLAS base layer /
  SDPA without prefix / eager), log scale, the bar drawn as a black tick, one panel per method.
"""
from __future__ import annotations

import os

from .check import (FLOOR_DENOMINATORS, Case, bar_rows, environment_line, floor_ms, floors, fmt_bar, fmt_ms,
                    fmt_ratio, fmt_value, group, load_results, load_targets, rule_rows, shape_str)

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
CPU_NOTE = "the rehearsal of bench/gpu_session.sh"

# Chart: colour and marker per provider (peftops stands out; forced paths are hollow).
STYLE = {
    "peftops": dict(color="#d62728", marker="o", s=46, zorder=5),
    "peftops_compile": dict(color="#d62728", marker="D", s=34, zorder=5, facecolors="none"),
    "eager": dict(color="#1f77b4", marker="s", s=26),
    "compile": dict(color="#2ca02c", marker="^", s=30),
    "peft": dict(color="#9467bd", marker="v", s=30),
    "cublas_base": dict(color="#7f7f7f", marker="X", s=26),
    "sdpa_no_prefix": dict(color="#7f7f7f", marker="X", s=26),
    "sdpa_concat": dict(color="#ff7f0e", marker="P", s=34),
}
PATH_STYLE = dict(color="#d62728", marker="o", s=30, facecolors="none", zorder=4)
FAMILIES = [("lora", "LoRA"), ("gated_lora", "gated LoRA (UniPELT)"), ("ia3", "IA3"),
            ("bottleneck_adapter", "bottleneck adapter"), ("adapter_fusion", "AdapterFusion"),
            ("prefix_attention", "prefix attention"), ("unipelt", "UniPELT block"), ("e2e", "end to end")]


def _family_key(op: str) -> str | None:
    for key, _ in FAMILIES:
        if op == key or op.startswith(key + ".") or op.startswith(key + "_"):
            return key
    return None


def family(op: str) -> str:
    key = _family_key(op)
    return dict(FAMILIES)[key] if key else op


def op_short(op: str) -> str:
    """The op without its family: 'lora.fwd_bwd' -> 'fwd_bwd', 'e2e_llama_lora_train_step' -> 'llama_lora_train_step'."""
    key = _family_key(op)
    rest = op[len(key):].lstrip("._") if key else op
    return rest or op


FLOOR_NAMES = {"hbm_floor": "HBM floor", "gemm_floor": "GEMM floor"}


def denominator(case: Case, targets: dict, fl: dict | None = None) -> tuple[str | None, float | None]:
    """(name, ms) a case's times are divided by in the chart; ``fl``: the file's floors
    (``check.floors``: measured, else nominal)."""
    fl = fl or floors(list(case.providers.values()), targets)
    for t in targets["target"]:
        if (t["op"] == case.op and t["shape"] == case.shape and t.get("metric", "median_ms") == "median_ms"):
            den = t["denominator"]
            if den in FLOOR_DENOMINATORS:
                rec = case.providers.get(t.get("provider", "peftops")) or next(iter(case.providers.values()))
                ms = floor_ms(den, rec, fl)
            else:
                ms = case.ms(den)
            if ms:
                return FLOOR_NAMES.get(den, den), ms
    for den in ("cublas_base", "sdpa_no_prefix", "eager", "peft", "compile"):
        if case.ms(den):
            return den, case.ms(den)
    return None, None


def _bar_tick(case: Case, targets: dict, den: str) -> float | None:
    """The case's bar on the chart's scale (time / denominator, lower is better)."""
    for t in targets["target"]:
        if (t["op"] == case.op and t["shape"] == case.shape and t.get("metric", "median_ms") == "median_ms"
                and t.get("provider", "peftops") == "peftops"
                and (t["denominator"] == den or FLOOR_NAMES.get(t["denominator"]) == den)):
            return t["must"] if t["bar"] == "<=" else 1.0 / t["must"]
    return None


def chart(records: list[dict], targets: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cases = [c for c in group(records) if c.ms("peftops") or any(p.startswith("peftops") for p in c.providers)]
    fl = floors(records, targets)
    panels: dict[str, list] = {}
    for c in cases:
        den, den_ms = denominator(c, targets, fl)
        if den_ms:
            panels.setdefault(family(c.op), []).append((c, den, den_ms))
    if not panels:
        raise ValueError("nothing to plot: no case has a denominator")
    heights = [len(v) + 1.6 for v in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.25 * sum(heights) + 1.8),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels.items()):
        # keys (and a denominator) shared by every row go into the panel's title
        shared = {k: v for k, v in rows[0][0].shape.items() if all(c.shape.get(k, object()) == v for c, _, _ in rows)}
        dens = {den for _, den, _ in rows}
        heading = name + (f"   {shape_str(shared)}" if shared else "")
        if len(dens) == 1:
            heading += f"   (÷ {next(iter(dens))})"
        labels, xs = [], [1.0]
        for y, (c, den, den_ms) in enumerate(rows):
            own = shape_str({k: v for k, v in c.shape.items() if k not in shared})
            labels.append(f"{op_short(c.op)}  {own}" + ("" if len(dens) == 1 else f"  (÷ {den})"))
            for p, rec in c.providers.items():
                ms = rec.get("median_ms")
                if not ms or p == den:
                    continue
                style = PATH_STYLE if p.startswith("peftops[") else STYLE.get(p, dict(color="k", marker="x", s=24))
                ax.scatter([ms / den_ms], [y], linewidths=1.2, **style)
                xs.append(ms / den_ms)
            tick = _bar_tick(c, targets, den)
            if tick:
                xs.append(tick)
                ax.scatter([tick], [y], marker="|", color="black", s=140, linewidths=2.2, zorder=6)
        ax.axvline(1.0, color="#7f7f7f", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(heading, fontsize=8.5, loc="left")
        ax.grid(axis="x", which="major", color="#dddddd", lw=0.7)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("time / the row's denominator (log scale; lower is faster; black tick = the bar)",
                           fontsize=8)
    handles = [Line2D([], [], ls="", marker=st["marker"], color=st["color"],
                      markerfacecolor="none" if st.get("facecolors") == "none" else st["color"], label=p)
               for p, st in STYLE.items() if p != "sdpa_no_prefix"]
    handles.append(Line2D([], [], ls="", marker="o", color="#d62728", markerfacecolor="none", label="peftops[path]"))
    handles.append(Line2D([], [], ls="", marker="|", color="black", markersize=10, markeredgewidth=2, label="bar"))
    h = fig.get_figheight()
    fig.suptitle(title, fontsize=8.5, y=1.0 - 0.05 / h, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=(len(handles) + 1) // 2, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.45 / h))
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.8 / h))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rel(path: str, base_dir: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir)).replace(os.sep, "/")


def markdown(paths: list[str], targets: dict, base_dir: str = ".", png: str | None = None) -> str:
    records = load_results(paths)
    cases = group(records)
    rules = rule_rows(cases, targets)
    fl = floors(records, targets)
    bars = bar_rows(cases, targets, fl)
    rivals = " / ".join(targets["rule"]["rivals"])
    judged = [r for r in rules if r.status in ("ok", "SLOWER")]
    slower = [r for r in rules if r.failed]
    met = [b for b in bars if b.status == "met"]
    missed = [b for b in bars if b.status == "MISSED"]
    unmeasured = [b for b in bars if b.status == "not measured"]
    files = ", ".join(f"[`{_rel(p, '.')}`]({_rel(p, base_dir)})" for p in paths)
    lines = [
        f"<!-- written by `python -m peftops report`; edit bench/targets.toml or rerun the bench, not this -->",
        f"Measured on **{environment_line(records).replace('; ', '**; ', 1)}; "
        f"{len(records)} records in {files}; bars from "
        f"[`bench/targets.toml`]({_rel(targets['path'], base_dir)}).",
        "",
        f"Floors: HBM {fl['hbm_label']}; GEMM {fl['gemm_label']}.",
        "",
    ]
    if any(r.get("device") == "cpu" for r in records):
        lines += [f"**Timed on a CPU** ({CPU_NOTE}): the times below are Triton's interpreter's, not speeds.", ""]
    lines += [
        f"peftops was **slower than the fastest of {rivals}** (+ `sdpa_concat` for prefix attention) in "
        f"**{len(slower)} of {len(judged)}** cases; bars met: **{len(met)} of {len(bars)}** "
        f"({len(missed)} missed, {len(unmeasured)} not measured in this file); moonshots met: "
        f"{sum(1 for b in bars if b.moon)}.",
        "",
    ]
    if png:
        lines += [f"![peftops vs each provider, per case, as x-times its denominator]({_rel(png, base_dir)})", ""]
    measured = [b for b in bars if b.status != "not measured"]
    lines += ["| op | shape | peftops | ratio | bar | moonshot | verdict |", "|---|---|---|---|---|---|---|"]
    for b in measured:
        who = "" if b.provider == "peftops" else f" ({b.provider})"
        lines.append(f"| `{b.op}`{who} | {shape_str(b.target['shape'])} | {fmt_value(b)} ms | "
                     f"{fmt_ratio(b.target, b.ratio)} | {fmt_bar(b.target)} | {fmt_bar(b.target, 'moonshot')} | "
                     f"{'met' if b.status == 'met' else '**missed**'} |")
    if not measured:
        lines.append("| (no bar measured in this file) | | | | | | |")
    if unmeasured:
        counts: dict = {}
        for b in unmeasured:
            counts[b.op] = counts.get(b.op, 0) + 1
        lines += ["", f"Not measured in this file: {len(unmeasured)} bars ("
                  + ", ".join(f"`{op}` x{n}" for op, n in counts.items())
                  + "); `python -m peftops bench --check` lists each."]
    lines += ["", f"<details><summary>Every case in the file: peftops vs the fastest of {rivals} "
                  f"({len(rules)} cases)</summary>", "",
              "| op | shape | peftops ms | fastest rival | rival ms | peftops / rival | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in rules:
        verdict = {"SLOWER": "**slower**", "ok": "faster"}.get(r.status, r.status)
        lines.append(f"| `{r.case.op}` | {shape_str(r.case.shape)} | {fmt_ms(r.ms)} | {r.rival or '-'} | "
                     f"{fmt_ms(r.rival_ms)} | {'-' if r.ratio is None else f'{r.ratio:.2f}x'} | {verdict} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def update_readme(readme: str, block: str) -> None:
    with open(readme) as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one '{BEGIN}' followed by one '{END}'")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main(paths: list[str], *, readme: str | None = None, png: str | None = None, targets: str | None = None) -> int:
    tg = load_targets(targets)
    if png:
        records = load_results(paths)
        names = ", ".join(os.path.basename(p) for p in paths)
        chart(records, tg, png, f"peftops vs eager / compile / peft / vendor baselines, time as x-times each "
                                f"row's denominator\n{environment_line(records)} -- {names}")
        print(f"wrote {png}")
    base_dir = os.path.dirname(os.path.abspath(readme)) if readme else "."
    block = markdown(paths, tg, base_dir, png)
    if readme:
        update_readme(readme, block)
        print(f"wrote the performance table into {readme}")
    else:
        print(block)
    return 0
