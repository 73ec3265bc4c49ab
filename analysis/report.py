"""``moesim report``: one self-contained HTML page for a search, a validation, or a set of runs.

Figures are embedded as base64 PNG and tables as HTML; the page loads nothing from elsewhere.
Inputs are search directories (holding ``results.jsonl``) and run directories (holding
``manifest.json``); runs given together are also paired into predicted-vs-measured sections.
"""

from __future__ import annotations

import base64
import html
import math
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from moesim.errors import MoesimError
from moesim.results import RunResult

from . import plots, ranking
from .compare import mape, max_error, points
from .figures import plot_all
from .fileio import atomic_write
from .runs import GiB, as_run, layout_text, pair_runs, policy_knobs, policy_name, summarize
from .search import RESULTS, load_search
from .search_plots import plot_pareto
from .traffic import metrics_section

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}
td:nth-child(2),td:nth-child(3){text-align:left}.warn{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}h2{border-bottom:2px solid #444}"""


def img_tag(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as base64."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A plain HTML table (cells are escaped)."""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in cells)
    return f"<table><tr>{th}</tr>{body}</table>"


def search_section(path: Path, tmp: Path, **constraints) -> str:
    """Ranking, Pareto front, failures and the Pareto figure of one search directory."""
    outcome = load_search(path, **constraints)
    feasible = [r for r in outcome.rows if r["feasible"]]
    failed = [r for r in outcome.rows if r["status"] != "ok"]
    parts = [f"<h2>Search: {html.escape(str(path))}</h2>",
             f"<p>{len(outcome.rows)} configurations, {len(feasible)} meet the constraints "
             f"({_constraints_text(**constraints)}), {len(failed)} failed.</p>",
             "<h3>Ranking by mean step time"
             + (f" (best 40 of {len(feasible)}; all in ranking.csv)" if len(feasible) > 40
                else "") + "</h3>",
             html_table(*ranking.table_cells(feasible[:40], outcome.rows)),
             "<h3>Pareto front (step time, peak memory, dropped tokens, bytes moved)</h3>",
             html_table(*ranking.table_cells(outcome.front, outcome.rows))]
    try:
        fig = plot_pareto(outcome.rows, outcome.front, tmp / f"pareto-{id(path)}.png",
                          constraints.get("max_memory_GiB"))
        parts.append(img_tag(fig, "search Pareto front"))
    except MoesimError as exc:
        parts.append(f'<p class="warn">{html.escape(str(exc))}</p>')
    parts += _top_run_figures(path, feasible, tmp)
    if failed:
        parts += ["<h3>Failed configurations</h3>",
                  html_table(["config", "status", "error"],
                             [[r["config"], r["status"], r["error"]] for r in failed])]
    return "\n".join(parts)


def _top_run_figures(path: Path, feasible: list[dict], tmp: Path, most: int = 6) -> list[str]:
    """Step time, drops and memory of the best configs whose runs were saved (--save-runs)."""
    runs = []
    varying = [a for a in ("trace", "model", "cluster") if len({r[a] for r in feasible}) > 1]
    for row in feasible:
        run_dir = path / "runs" / row["key"]
        if (run_dir / "manifest.json").is_file():
            run = as_run(run_dir)
            where = " / ".join(Path(str(row[a])).name for a in varying)
            run.display_name = f"#{row['rank']} {row['config']}" + (f" @ {where}" if where else "")
            runs.append(run)
        if len(runs) == most:
            break
    if not runs:
        return []
    parts = [f"<h3>The {len(runs)} best configurations, per iteration</h3>"]
    for fn in (plots.plot_step_time, plots.plot_drops, plots.plot_memory):
        try:
            parts.append(img_tag(fn(runs, tmp / f"top-{fn.__name__}-{id(path)}.png"),
                                 fn.__name__))
        except MoesimError as exc:
            parts.append(f'<p class="warn">{html.escape(str(exc))}</p>')
    return parts


def _constraints_text(max_memory_GiB: float | None = None,
                      max_drop_frac: float | None = None) -> str:
    bits = []
    if max_memory_GiB is not None:
        bits.append(f"peak memory ≤ {max_memory_GiB:g} GiB")
    if max_drop_frac is not None:
        bits.append(f"dropped fraction ≤ {max_drop_frac:g}")
    return ", ".join(bits) or "no constraints"


def runs_section(runs: list[RunResult], tmp: Path) -> str:
    """Summary table and every applicable figure of a set of runs."""
    head = ["run", "policy", "knobs", "layout", "backend", "status", "iterations", "mean ms",
            "p95 ms",
            "peak GiB", "drop %", "a2a ms"]
    cells, summaries = [], []
    for run in runs:
        s = summarize(run)
        summaries.append(s)
        cells.append([run.path.name, policy_name(run), knobs_text(run), layout_text(run),
                      run.backend, s["status"], s["iterations"], _ms(s["mean_step_s"]),
                      _ms(s["p95_step_s"]), _num(s["peak_memory_bytes"] / GiB),
                      _num(100 * s["dropped_frac"]), _ms(s["a2a_s"])])
    best = best_run_line(runs, summaries)
    parts = ["<h2>Runs</h2>", f"<p><b>{html.escape(best)}</b></p>" if best else "",
             html_table(head, cells), metrics_section(runs, html_table)]
    bad = [r for r in runs if not r.complete]
    if bad:
        parts.append('<p class="warn">Incomplete runs (plotted, marked on each figure): '
                     + html.escape(", ".join(r.path.name for r in bad)) + "</p>")
    written, skipped = plot_all(runs, tmp / f"runs-{len(runs)}", fmt="png")
    parts += [img_tag(p, p.stem) for p in written]
    if skipped:
        parts.append("<p>Figures not drawn: " + html.escape("; ".join(skipped)) + "</p>")
    return "\n".join(parts)


def knobs_text(run: RunResult) -> str:
    """Every knob of the run's policy, ``name=value`` (``none`` for None), as configured."""
    from moesim.policies.catalog import format_default

    return ", ".join(f"{k}={format_default(v)}" for k, v in policy_knobs(run).items()) or "-"


def best_run_line(runs: list[RunResult], summaries: list[dict]) -> str:
    """Which run is fastest (mean step time) and by how much, per backend ('' with fewer than
    two runs of one backend): ``Best (simulator): eplb, 1918.28 ms mean step: 1.25x faster
    than static_ep (2401.08 ms), the slowest; 1.00x than swiftmoe, the next.``"""
    lines = []
    for backend in dict.fromkeys(r.backend for r in runs):
        timed = sorted(((s["mean_step_s"], r.path.name, s["dropped_frac"])
                        for r, s in zip(runs, summaries, strict=True)
                        if r.backend == backend and math.isfinite(s["mean_step_s"])))
        if len(timed) < 2:
            continue
        (t0, name, drop), (t1, nxt, _), (tn, slow, _) = timed[0], timed[1], timed[-1]
        note = f" (it drops {100 * drop:.2f}% of tokens)" if drop > 0 else ""
        text = (f"Best ({backend}): {name}, {t0 * 1e3:.2f} ms mean step{note}: "
                f"{t1 / t0:.2f}x faster than the next, {nxt} ({t1 * 1e3:.2f} ms)")
        if len(timed) > 2:
            text += f", and {tn / t0:.2f}x faster than the slowest, {slow} ({tn * 1e3:.2f} ms)"
        lines.append(text + ".")
    return " ".join(lines)


def validation_section(runs: list[RunResult]) -> str:
    """Per-phase error of each (predicted, measured) pair (empty when there are none)."""
    pairs = pair_runs(runs)
    if not pairs:
        return ""
    parts = ["<h2>Predicted vs measured</h2>"]
    head = ["quantity", "iterations", "predicted ms", "measured ms", "MAPE %", "max error %"]
    for pred, meas in pairs:
        parts.append(f"<h3>{html.escape(pred.path.name)} (simulator) vs "
                     f"{html.escape(meas.path.name)} (executor)</h3>")
        try:
            rows = [[name, len(m), _ms(float(p.mean())), _ms(float(m.mean())),
                     _num(mape(m, p)), _num(max_error(m, p))]
                    for name, (m, p) in points(pred, meas).items()]
        except MoesimError as exc:
            parts.append(f'<p class="warn">{html.escape(str(exc))}</p>')
            continue
        parts.append(html_table(head, rows))
    return "\n".join(parts)


def _ms(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x * 1e3:.3f}"


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.2f}"


def classify(inputs: Sequence[str | Path]) -> tuple[list[Path], list[RunResult], list[str]]:
    """Split inputs into search directories and runs; anything else (``runs/demo/*`` also
    matches ``figures/`` and the report itself) is skipped, with a note why. MoesimError when
    nothing is left."""
    searches, runs, skipped = [], [], []
    for item in inputs:
        path = Path(item)
        if (path / RESULTS).is_file():
            searches.append(path)
        elif (path / "manifest.json").is_file():
            runs.append(as_run(path))
        else:
            skipped.append(f"{path}: neither a run directory (manifest.json) nor a search "
                           f"directory ({RESULTS})")
    if not searches and not runs:
        detail = f" ({skipped[0]})" if len(skipped) == 1 else ""
        raise MoesimError(f"nothing to report{detail}; pass run or search directories written "
                          "by moesim")
    return searches, runs, skipped


def build_report(inputs: Sequence[str | Path], out: str | Path, *,
                 max_memory_GiB: float | None = None,
                 max_drop_frac: float | None = None) -> Path:
    """Write the HTML report of ``inputs`` to ``out`` atomically; returns its path."""
    searches, runs, skipped = classify(inputs)
    for note in skipped:
        print(f"moesim: skipped {note}", file=sys.stderr)
    constraints = {"max_memory_GiB": max_memory_GiB, "max_drop_frac": max_drop_frac}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>moesim report</h1><p>Generated {stamp} from "
            f"{html.escape(', '.join(str(i) for i in inputs))}.</p>"]
    with tempfile.TemporaryDirectory() as tmp:
        body += [search_section(s, Path(tmp), **constraints) for s in searches]
        if runs:
            body += [validation_section(runs), runs_section(runs, Path(tmp))]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moesim report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return atomic_write(out, page.encode())
