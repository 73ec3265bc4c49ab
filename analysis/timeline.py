"""One-iteration timeline: a Gantt chart per rank and stream.

Prefers the run's ``timeline_iter{N}.json`` (Chrome-trace / Perfetto events, ``ph == "X"``,
``ts``/``dur`` in µs, ``pid`` = rank, ``tid`` = stream). Without one it draws, from
``times.npz``, one bar per (layer, phase) from its first start to its last end on each rank,
with communication phases on a ``comm`` row and the rest on ``compute`` — an approximation the
title says it is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.patches import Patch

from moesim.errors import MoesimError
from moesim.ops import PHASES
from moesim.results import RunResult

from .figio import mark_incomplete, new_figure, save_figure
from .runs import RunLike, as_run, require, run_label, titled

COMM_PHASES = ("dispatch", "combine", "param_gather", "grad_sync", "relayout")
MAX_DEFAULT_RANKS = 8


@dataclass
class Bar:
    """One bar of the Gantt chart (times in ms from the iteration's start)."""

    row: str
    start_ms: float
    dur_ms: float
    phase: str
    rank: int = 0


def timeline_files(run: RunResult) -> dict[int, Path]:
    """``{iteration: path}`` of the run's Chrome-trace files."""
    out = {}
    for path in run.path.glob("timeline_iter*.json"):
        m = re.fullmatch(r"timeline_iter(\d+)\.json", path.name)
        if m:
            out[int(m.group(1))] = path
    return out


def _phase_of(event: dict) -> str:
    args = event.get("args") or {}
    for cand in (args.get("phase"), event.get("cat"), event.get("name")):
        if isinstance(cand, str):
            for phase in PHASES:
                if cand == phase or cand.startswith(phase):
                    return phase
    return "other"


def _names(events: list[dict], kind: str) -> dict:
    return {(e.get("pid"), e.get("tid")) if kind == "thread_name" else e.get("pid"):
            (e.get("args") or {}).get("name") for e in events
            if e.get("ph") == "M" and e.get("name") == kind}


def bars_from_trace(path: Path) -> list[Bar]:
    """Bars from a Chrome-trace JSON file (complete ``X`` events)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MoesimError(f"{path}: unreadable timeline ({exc}); re-run with that "
                          "iteration in --timeline") from None
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = _names(events, "process_name"), _names(events, "thread_name")
    spans = [e for e in events if e.get("ph") == "X" and "ts" in e]
    t0 = min((float(e["ts"]) for e in spans), default=0.0)
    bars = []
    for e in spans:
        pid, tid = e.get("pid"), e.get("tid")
        proc = procs.get(pid) or (f"rank {pid}" if isinstance(pid, int) else str(pid))
        proc = re.sub(r"\s*\(iteration \d+\)", "", proc)
        thread = threads.get((pid, tid)) or str(tid)
        bars.append(Bar(f"{proc} / {thread}", (float(e["ts"]) - t0) / 1e3,
                        float(e.get("dur", 0.0)) / 1e3, _phase_of(e), _rank_of(pid, proc)))
    return bars


def bars_from_arrays(run: RunResult, index: int) -> list[Bar]:
    """Approximate bars from ``start_s``/``end_s[I, L+1, F, R]`` of iteration row ``index``."""
    require(run, "start_s", "end_s")
    start_LFR, end_LFR = run["start_s"][index], run["end_s"][index]
    phases = [str(p) for p in run.arrays.get("phases", PHASES)]
    bars = []
    for layer, f, r in zip(*np.nonzero(np.isfinite(start_LFR)), strict=True):
        phase = phases[f]
        stream = "comm" if phase in COMM_PHASES else "compute"
        s, e = float(start_LFR[layer, f, r]), float(end_LFR[layer, f, r])
        bars.append(Bar(f"rank {r} / {stream}", s * 1e3, max(e - s, 0.0) * 1e3, phase, int(r)))
    return bars


def _rank_of(pid, name: str) -> int:
    if isinstance(pid, int):
        return pid
    nums = re.findall(r"\d+", name)
    return int(nums[0]) if nums else 0


def _row_key(row: str) -> tuple:
    nums = [int(n) for n in re.findall(r"\d+", row)]
    return (nums[:1] or [0], row)


def plot_timeline(run: RunLike, out: str | os.PathLike, iteration: int | None = None,
                  ranks: Sequence[int] | None = None) -> Path:
    """Gantt chart of one iteration, one row per (rank, stream), bars coloured by phase.

    ``ranks``: which ranks to draw (default: the first 8; the title says when some are left
    out).
    """
    run = as_run(run)
    files = timeline_files(run)
    its = [int(i) for i in run.arrays.get("iterations", [])]
    if iteration is None:
        iteration = min(files) if files else (its[-1] if its else None)
    if iteration is None:
        raise MoesimError(f"{run.path}: no timeline_iter*.json and no times.npz to draw a "
                          "timeline from; re-run with --timeline")
    if iteration in files:
        bars, how = bars_from_trace(files[iteration]), "from timeline trace"
    elif iteration in its:
        bars = bars_from_arrays(run, its.index(iteration))
        how = "approx.: first start → last end per layer and phase"
    else:
        raise MoesimError(f"{run.path}: iteration {iteration} was not recorded; choose one of "
                          f"{sorted(set(its) | set(files))[:20]}")
    bars, shown = _select_ranks(bars, ranks)
    title = f"Iteration {iteration} timeline — {run_label(run)} ({how}{shown})"
    return _draw(run, bars, out, titled(title, [run]))


def _select_ranks(bars: list[Bar], ranks: Sequence[int] | None) -> tuple[list[Bar], str]:
    """The bars of the chosen ranks, and a title note when some ranks are left out."""
    present = sorted({b.rank for b in bars})
    if ranks is None:
        ranks = present[:MAX_DEFAULT_RANKS]
    missing = sorted(set(ranks) - set(present))
    if missing:
        raise MoesimError(f"rank(s) {missing} not in the timeline; it has ranks "
                          f"{present[0]}..{present[-1]}")
    keep = set(ranks)
    note = "" if keep == set(present) else (
        f"; ranks {', '.join(map(str, sorted(keep)))} of {len(present)}, --ranks for others")
    return [b for b in bars if b.rank in keep], note


def _draw(run: RunResult, bars: list[Bar], out: str | os.PathLike, title: str) -> Path:
    if not bars:
        raise MoesimError(f"{run.path}: the timeline has no events to draw")
    rows = sorted({b.row for b in bars}, key=_row_key)
    index = {r: i for i, r in enumerate(rows)}
    colors = {p: f"C{i % 10}" for i, p in enumerate((*PHASES, "other"))}
    fig, ax = new_figure(width=12, height=max(3.0, 0.35 * len(rows) + 1.5))
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for b in bars:
        groups.setdefault((b.row, b.phase), []).append((b.start_ms, max(b.dur_ms, 1e-6)))
    for (row, phase), spans in groups.items():
        ax.broken_barh(spans, (index[row] + 0.1, 0.8), facecolors=colors[phase],
                       edgecolor="k" if len(bars) <= 300 else "none", linewidth=0.2,
                       alpha=0.85)
    ax.set_yticks(np.arange(len(rows)) + 0.5, rows, fontsize=7)
    ax.set_ylim(0, len(rows))
    ax.invert_yaxis()
    ax.set_xlabel("time from iteration start (ms)")
    ax.set_title(title, fontsize=10)
    used = sorted({b.phase for b in bars}, key=list(colors).index)
    ax.legend(handles=[Patch(color=colors[p], label=p) for p in used], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), title="phase")
    ax.grid(axis="x", alpha=0.3)
    mark_incomplete(fig, [run])
    return save_figure(fig, out)
