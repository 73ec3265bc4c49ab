"""The figure catalogue: ``moesim plot KIND`` names, and ``plot all`` over a set of runs."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from moesim.errors import MoesimError
from moesim.results import RunResult

from .runs import RunLike, as_runs, labels, pair_runs

# kind -> ("module:function", takes one run (True) or several (False), what it shows).
# Functions are looked up lazily so `moesim --help` does not import matplotlib.
KINDS: dict[str, tuple[str, bool, str]] = {
    "step_time": ("plots:plot_step_time", False, "per-iteration step time per policy"),
    "speedup": ("plots:plot_speedup", False, "speedup vs static EP (or --baseline)"),
    "load_heatmap": ("plots:plot_load_heatmap", True, "expert load, layer × expert over time "
                     "(the trace's: drawn once for runs of one trace in `plot all`)"),
    "gpu_load_heatmap": ("gpu_load_plot:plot_gpu_load_heatmap", True,
                         "tokens each GPU computed per layer (the policy's GPU load)"),
    "rank_load": ("plots:plot_rank_load", False, "per-GPU load and imbalance"),
    "timeline": ("timeline:plot_timeline", True, "one-iteration Gantt per rank and stream"),
    "memory": ("plots:plot_memory", False, "peak memory breakdown per policy"),
    "drops": ("plots:plot_drops", False, "dropped-token fraction over iterations"),
    "traffic_heatmap": ("traffic:plot_traffic_heatmap", True,
                        "bytes each GPU sent each GPU, per phase"),
    "balance_vs_moved": ("migration_plot:plot_balance_vs_moved", False,
                         "load imbalance against bytes moved by re-layouts, per run"),
    "pred_vs_meas": ("compare:plot_predicted_vs_measured", False,
                     "predicted vs measured (simulator + executor runs)"),
}


def figure_function(kind: str) -> Callable:
    """The plotting function of a figure kind."""
    module, name = KINDS[kind][0].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def plot_kind(kind: str, runs: Sequence[RunLike], out: str | Path, **options) -> list[Path]:
    """Draw one figure kind; single-run kinds with several runs write one file per run."""
    if kind not in KINDS:
        raise MoesimError(f"unknown figure {kind!r}; choose one of {', '.join(KINDS)} or all")
    fn, single = figure_function(kind), KINDS[kind][1]
    options = {k: v for k, v in options.items() if v is not None}
    loaded = as_runs(runs)
    if not single:
        return [fn(loaded, out, **options)]
    if len(loaded) == 1:
        return [fn(loaded[0], out, **options)]
    out = Path(out)
    return [fn(run, out.with_name(f"{out.stem}-{_slug(label)}{out.suffix}"), **options)
            for run, label in zip(loaded, labels(loaded), strict=True)]


def plot_all(runs: Sequence[RunLike], out_dir: str | Path, *, fmt: str = "png",
             baseline: RunLike | None = None) -> tuple[list[Path], list[str]]:
    """Every figure the runs support, into ``out_dir``; returns (written, skipped reasons)."""
    loaded = as_runs(runs)
    out_dir = Path(out_dir)
    written, skipped = [], []
    for kind in KINDS:
        reason = _not_applicable(kind, loaded, baseline)
        if reason:
            skipped.append(f"{kind}: {reason}")
            continue
        opts = {"baseline": baseline} if kind == "speedup" else {}
        targets = loaded
        if kind == "load_heatmap" and len(loaded) > 1 and len(_traces(loaded)) == 1:
            targets = loaded[:1]  # the trace's expert load: no policy changes it
        try:
            written += plot_kind(kind, targets, out_dir / f"{kind}.{fmt}", **opts)
        except MoesimError as exc:
            skipped.append(f"{kind}: {exc}")
    return written, skipped


def _traces(runs: list[RunResult]) -> set[str]:
    """What the runs replayed (trace path and iteration range): one element when they all
    saw the same expert loads."""
    import json

    def trace_of(run: RunResult):
        trace = run.config.get("trace")
        return trace.get("path") if isinstance(trace, dict) else trace

    return {json.dumps([trace_of(r), r.config.get("iterations")], default=str) for r in runs}


def _not_applicable(kind: str, runs: list[RunResult], baseline: RunLike | None) -> str:
    if kind == "speedup" and baseline is None:
        from .plots import find_baseline

        try:
            find_baseline(runs)
        except MoesimError as exc:
            return str(exc)
    if kind == "pred_vs_meas" and not pair_runs(runs):
        return "needs a simulator run and an executor run of the same config"
    return ""
