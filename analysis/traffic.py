"""Per-GPU-pair traffic and the load metrics of :mod:`moesim.metrics`: a heatmap figure and the
report's tables.

Shape legend: ``I`` iterations, ``F`` phases, ``R`` ranks. ``traffic_bytes[I, F, R, R]`` (the
run's ``traffic.npz``) is the bytes GPU ``i`` sent GPU ``j`` in each phase of each iteration.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np

from moesim import traffic_io
from moesim.errors import MoesimError
from moesim.metrics import hottest_links
from moesim.ops import PHASES
from moesim.results import RunResult

from .runs import RunLike, as_run, column, iterations, run_label, summarize, titled


def gpus_per_node(run: RunResult) -> int:
    """The run's node size (``config.cluster.gpus_per_node``; the world when unknown)."""
    cluster = run.config.get("cluster")
    if isinstance(cluster, dict) and cluster.get("gpus_per_node"):
        return int(cluster["gpus_per_node"])
    return traffic_io.world_size(run.arrays)


def traffic_IFRR(run: RunResult) -> np.ndarray:
    """The run's per-phase GPU-pair bytes, dense; MoesimError for runs written without them."""
    _require_traffic(run)
    return np.asarray(run["traffic_bytes"], dtype=np.float64)


def _require_traffic(run: RunResult) -> None:
    if not run.has("traffic_bytes"):
        raise MoesimError(f"{run.path}: run has no traffic.npz (written before per-GPU-pair "
                          "traffic was recorded, or unfinished); re-run or resume it")


def plot_traffic_heatmap(run: RunLike, out: str | os.PathLike) -> Path:
    """Mean bytes per iteration that each GPU sent each GPU, one panel per phase that moved
    any and one for their sum; node boundaries drawn."""
    from .figio import mark_incomplete, new_figure, save_figure

    run = as_run(run)
    _require_traffic(run)   # summed from the sparse file: no [I, F, R, R] array
    T_FRR = traffic_io.summed(run.arrays, keep_iterations=False) / max(
        traffic_io.num_iterations(run.arrays), 1)
    used = [f for f in range(len(PHASES)) if T_FRR[f].sum() > 0]
    if not used:
        raise MoesimError(f"{run.path}: no GPU-to-GPU traffic in this run (one GPU?)")
    panels = [(PHASES[f], T_FRR[f]) for f in used] + ([("all", T_FRR.sum(0))]
                                                      if len(used) > 1 else [])
    scale, unit = _unit(max(float(m.max()) for _, m in panels))
    fig, axes = new_figure(1, len(panels), width=3.3 * len(panels) + 1.2, height=3.8,
                           squeeze=False)
    R, n = T_FRR.shape[-1], gpus_per_node(run)
    for ax, (name, mat) in zip(axes[0], panels, strict=True):
        img = ax.imshow(mat / scale, cmap="viridis", interpolation="nearest", origin="upper")
        for b in range(n, R, n):
            ax.axhline(b - 0.5, color="white", lw=0.8)
            ax.axvline(b - 0.5, color="white", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("destination GPU")
        fig.colorbar(img, ax=ax, shrink=0.8, label=f"{unit} per iteration")
    axes[0][0].set_ylabel("source GPU")
    fig.suptitle(titled(f"GPU-to-GPU traffic — {run_label(run)}", [run]))
    mark_incomplete(fig, [run])
    return save_figure(fig, out)


def _unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "B"


def link_rows(run: RunResult, most: int = 3, max_iterations: int = 12) -> list[list[str]]:
    """Per iteration: its hottest ``most`` GPU links (all phases) as ``src→dst GB`` cells."""
    _require_traffic(run)
    T_IRR = traffic_io.summed(run.arrays, keep_iterations=True)
    its = run.arrays.get("iterations", np.arange(T_IRR.shape[0]))
    rows = []
    for i in range(min(len(T_IRR), max_iterations)):
        cells = [f"{s}→{d} {b / 1e9:.3f}" for s, d, b in hottest_links(T_IRR[i], most)]
        rows.append([str(int(its[i]))] + cells + ["-"] * (most - len(cells)))
    return rows


METRIC_HEAD = ("run", "overload mean", "overload max", "cum max", "imbalance", "node imbal",
               "intra-node imbal", "balance p50", "balance p95", "hottest link GB",
               "inter-node GB/it")


def metric_cells(run: RunResult) -> list[str]:
    """One row of the report's metrics table (``-`` where the run lacks a column)."""
    s = summarize(run)
    keys = ("overload_mean", "overload_max", "overload_cum_max", "imbalance",
            "node_imbalance", "intra_node_imbalance", "expert_balance_p50",
            "expert_balance_p95")
    cells = [run.path.name] + [_f(s.get(k), "{:.2f}") for k in keys]
    return cells + [_f(s.get("hottest_link_bytes", math.nan) / 1e9, "{:.3f}"),
                    _f(s.get("inter_node_bytes", math.nan) / 1e9, "{:.3f}")]


def _f(value, spec: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(value) else spec.format(value)


def metrics_section(runs: list[RunResult], table) -> str:
    """The report's "Load and traffic" section: the metrics table of every run and each run's
    hottest links per iteration (``table(head, cells)`` renders HTML)."""
    if not any(column(r, "overload_mean").size for r in runs):
        return ""
    parts = ["<h2>Load and traffic</h2>",
             "<p>Overload factor: tokens on the busiest rank of the EP group over the balanced "
             "count, per layer × micro-batch (mean, max) and cumulative over the forward / "
             "backward (Megatron-Core); imbalance (max − mean) / mean of tokens per rank "
             "(TensorRT-LLM, vLLM); node and intra-node imbalance; expert balance "
             "(max / mean tokens per expert) across layers; GPU links by bytes.</p>",
             table(METRIC_HEAD, [metric_cells(r) for r in runs])]
    for run in runs:
        if not run.has("traffic_bytes") or not iterations(run).size:
            continue
        parts += [f"<h3>Hottest GPU links per iteration — {html.escape(run.path.name)}</h3>",
                  table(["iteration", "1st (GB)", "2nd", "3rd"], link_rows(run))]
    return "\n".join(parts)
