"""Figures of a search: step time vs peak memory, dropped tokens as colour, Pareto front drawn."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

from .figio import new_figure, save_figure


def plot_pareto(rows: Sequence[dict], front: Sequence[dict], out: str | os.PathLike,
                max_memory_GiB: float | None = None) -> Path:
    """Scatter of finished configs (mean step ms vs peak GiB), colour = dropped %; front ringed."""
    ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r["mean_step_s"])]
    if not ok:
        raise MoesimError("no finished configuration to plot; every config failed")
    fig, ax = new_figure(width=8, height=5.5)
    drop = np.array([0.0 if math.isnan(r["dropped_frac"]) else r["dropped_frac"] for r in ok])
    sc = ax.scatter([r["peak_memory_GiB"] for r in ok], [r["mean_step_s"] * 1e3 for r in ok],
                    c=drop * 100, cmap="viridis", s=40, edgecolor="k", linewidth=0.3,
                    label="configuration")
    fig.colorbar(sc, ax=ax, label="dropped tokens (%)")
    if front:
        fx = [r["peak_memory_GiB"] for r in front]
        fy = [r["mean_step_s"] * 1e3 for r in front]
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="crimson", linewidth=1.5,
                   label="Pareto front")
        _annotate_ranks(ax, front, fx, fy)
    if max_memory_GiB is not None:
        ax.axvline(max_memory_GiB, color="crimson", ls="--", lw=1,
                   label=f"memory limit {max_memory_GiB:g} GiB")
    ax.set(xlabel="peak memory per GPU (GiB)", ylabel="mean step time (ms)",
           title="Search: step time vs memory (colour: dropped tokens; #N = rank in the table)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def _annotate_ranks(ax, front: Sequence[dict], xs: list[float], ys: list[float]) -> None:
    """Label front points with their ranking number (``#3``); coincident points share a label."""
    groups: dict[tuple[float, float], list[str]] = {}
    for row, x, y in zip(front, xs, ys, strict=True):
        groups.setdefault((round(x, 3), round(y, 3)), []).append(f"#{row.get('rank', '?')}")
    for (x, y), names in groups.items():
        ax.annotate(",".join(names), (x, y), fontsize=8, xytext=(6, 4),
                    textcoords="offset points", color="crimson")
