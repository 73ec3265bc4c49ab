"""Balance against bytes moved: what each policy's re-plans buy and what they cost.

Migration-aware re-planning (``migration_weight``, ``min_gain``, incremental EPLB; see
``moesim.policies.migration``) trades load balance for re-layout traffic. This figure puts the
two side by side per run: the bytes its ``relayout`` ops moved (``relayout_bytes`` of
``iterations.csv``) against its load imbalance — ``imbalance`` = (max − mean) / mean tokens
per GPU where the run records it (TensorRT-LLM / vLLM's figure), else ``straggler_ratio`` − 1
(the same form on expert-compute time).

Shape legend: ``I`` iterations.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.results import RunResult

from .figio import mark_incomplete, new_figure, save_figure
from .runs import GiB, RunLike, as_runs, column, iterations, labels, titled


def balance_metric(runs: list[RunResult]) -> tuple[str, list[np.ndarray]]:
    """``(axis label, per-run [I] imbalance)``: the ``imbalance`` column when every run has
    it, else ``straggler_ratio − 1``."""
    if all(np.isfinite(column(r, "imbalance")).any() for r in runs):
        return ("imbalance (max − mean) / mean tokens per GPU",
                [column(r, "imbalance") for r in runs])
    return ("straggler ratio − 1 (max / mean expert time per GPU − 1)",
            [column(r, "straggler_ratio") - 1.0 for r in runs])


def plot_balance_vs_moved(runs: RunLike | Iterable[RunLike], out: str | os.PathLike) -> Path:
    """Left: one point per run, total GiB moved by re-layouts vs mean imbalance. Right: per
    run, imbalance at each iteration against the GiB moved up to it (the trajectory)."""
    runs = as_runs(runs)
    moved_I = [column(r, "relayout_bytes") for r in runs]
    if not any(m.size for m in moved_I):
        raise MoesimError("no run records relayout_bytes (iterations.csv); simulate or run "
                          "the policies first")
    ylabel, imb_I = balance_metric(runs)
    fig, (left, right) = new_figure(1, 2, width=12, height=4.8)
    colours = _colours(len(runs))
    for k, label in enumerate(labels(runs)):
        moved = np.nan_to_num(moved_I[k]) / GiB
        imb = imb_I[k]
        if not imb.size:
            continue
        total, mean = float(moved.sum()), float(np.nanmean(imb))
        left.scatter([total], [mean], s=60, color=colours[k], edgecolor="k", linewidth=0.4)
        left.annotate(label, (total, mean), fontsize=8, xytext=(5, 4),
                      textcoords="offset points", color=colours[k])
        n = min(len(moved), len(imb))
        right.plot(np.cumsum(moved[:n]), imb[:n], marker=".", color=colours[k], label=label)
        replans = np.flatnonzero(moved[:n] > 0)
        right.scatter(np.cumsum(moved[:n])[replans], imb[:n][replans], s=30, marker="D",
                      color=colours[k], edgecolor="k", linewidth=0.4)
    left.set(xlabel="GiB moved by re-layouts (whole run)", ylabel=f"mean {ylabel}",
             title="Balance vs bytes moved, per run")
    right.set(xlabel="GiB moved so far (◆: an iteration that re-laid out)", ylabel=ylabel,
              title="Per iteration")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    its = [iterations(r) for r in runs]
    fig.suptitle(titled(f"Balance against migration ({sum(i.size for i in its)} iterations)",
                        runs))
    mark_incomplete(fig, runs)
    return save_figure(fig, out)


def _colours(n: int) -> list:
    """Matplotlib's default cycle for up to 10 runs, ``tab20`` beyond (distinct up to 20)."""
    if n <= 10:
        return [f"C{k}" for k in range(n)]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(k % 20) for k in range(n)]
