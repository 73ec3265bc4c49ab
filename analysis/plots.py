"""One function per figure. Each takes runs (RunResults or run directories) and an output path
(``.png`` or ``.pdf``), writes the figure atomically and returns the path.

Shape legend: ``I`` iterations, ``L`` MoE layers, ``F`` phases, ``R`` ranks, ``E`` experts,
``C`` memory components. Times are plotted in milliseconds, memory in GiB.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.results import RunResult

from .figio import iteration_axis, mark_incomplete, new_figure, save_figure
from .runs import (
    GiB,
    RunLike,
    as_run,
    as_runs,
    column,
    iterations,
    labels,
    policy_name,
    require,
    run_label,
    titled,
)

BASELINE_POLICY = "static_ep"


def _step_ms(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, step time in ms) of a run; MoesimError when it has no step times."""
    step = column(run, "step_time_s")
    if not step.size:
        raise MoesimError(f"{run.path}: no per-iteration step times (iterations.csv is missing "
                          "or empty); finish or resume the run")
    return iterations(run), step * 1e3


def plot_step_time(runs: RunLike | Iterable[RunLike], out: str | os.PathLike) -> Path:
    """Per-iteration step time, one line per run (policy)."""
    runs = as_runs(runs)
    fig, ax = new_figure()
    for run, label in zip(runs, labels(runs), strict=True):
        its, ms = _step_ms(run)
        ax.plot(its, ms, marker="." if its.size < 60 else None,
                label=f"{label}  (mean {np.nanmean(ms):.2f} ms)")
    iteration_axis(ax)
    ax.set_ylabel("step time (ms)")
    ax.set_title(titled("Step time per iteration", runs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    mark_incomplete(fig, runs)
    return save_figure(fig, out)


def find_baseline(runs: Sequence[RunResult], baseline: RunLike | None = None) -> RunResult:
    """The ``baseline`` run if given, else the run whose policy is ``static_ep``."""
    if baseline is not None:
        return as_run(baseline)
    for run in runs:
        if policy_name(run) == BASELINE_POLICY:
            return run
    raise MoesimError(f"no {BASELINE_POLICY} run among the inputs to compare against; add one "
                      "or pass --baseline RUN")


def plot_speedup(runs: RunLike | Iterable[RunLike], out: str | os.PathLike,
                 baseline: RunLike | None = None) -> Path:
    """Speedup over static EP (or ``baseline``): mean-step bars and per-iteration lines."""
    runs = as_runs(runs)
    base = find_baseline(runs, baseline)
    base_its, base_ms = _step_ms(base)
    base_by_it = dict(zip(base_its.tolist(), base_ms.tolist(), strict=True))
    fig, (bar_ax, line_ax) = new_figure(1, 2, width=11, gridspec_kw={"width_ratios": [1, 2]})
    names, speedups = [], []
    for run, label in zip(runs, labels(runs), strict=True):
        its, ms = _step_ms(run)
        speedups.append(np.nanmean(base_ms) / np.nanmean(ms))
        names.append(label)
        common = [i for i, it in enumerate(its.tolist()) if it in base_by_it]
        if common:
            ratio = [base_by_it[its[i]] / ms[i] for i in common]
            line_ax.plot(its[common], ratio, label=label)
    bars = bar_ax.bar(range(len(names)), speedups, color=[f"C{i}" for i in range(len(names))])
    bar_ax.bar_label(bars, labels=[f"{s:.2f}×" for s in speedups], fontsize=8)
    bar_ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    bar_ax.axhline(1.0, color="k", lw=0.8, ls="--")
    bar_ax.set_ylabel("speedup of mean step time (×)")
    bar_ax.set_title("Mean speedup")
    line_ax.axhline(1.0, color="k", lw=0.8, ls="--")
    iteration_axis(line_ax)
    line_ax.set_ylabel("speedup (×)")
    line_ax.set_title("Per-iteration speedup")
    line_ax.grid(alpha=0.3)
    line_ax.legend(fontsize=8)
    name = run_label(base)
    name = name if name == policy_name(base) else f"{name} ({policy_name(base)})"
    fig.suptitle(titled(f"Speedup vs {name}", [*runs, base]))
    mark_incomplete(fig, [*runs, base])
    return save_figure(fig, out)


def _default_layers(num_layers: int, most: int = 4) -> list[int]:
    return sorted(set(np.linspace(0, num_layers - 1, min(most, num_layers)).round().astype(int)))


def plot_load_heatmap(run: RunLike, out: str | os.PathLike,
                      layers: Sequence[int] | None = None) -> Path:
    """Expert load over time for a few layers: expert × iteration, relative to the mean."""
    run = as_run(run)
    require(run, "expert_load")
    load_ILE = run["expert_load"].astype(float)
    L = load_ILE.shape[1]
    layers = list(layers) if layers is not None else _default_layers(L)
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise MoesimError(f"layer(s) {bad} out of range; the run has layers 0..{L - 1}")
    its = run.arrays.get("iterations", np.arange(load_ILE.shape[0]))
    fig, axes = new_figure(1, len(layers), width=3.2 * len(layers) + 1.5, height=4.5,
                           squeeze=False, sharey=True)
    mean = load_ILE.mean(axis=2, keepdims=True)
    rel_ILE = np.divide(load_ILE, mean, out=np.zeros_like(load_ILE), where=mean > 0)
    vmax = max(2.0, float(np.percentile(rel_ILE[:, layers], 99)))
    for ax, layer in zip(axes[0], layers, strict=True):
        img = ax.imshow(rel_ILE[:, layer].T, aspect="auto", origin="lower", cmap="magma",
                        vmin=0, vmax=vmax, interpolation="nearest",
                        extent=(its[0] - 0.5, its[-1] + 0.5, -0.5, load_ILE.shape[2] - 0.5))
        ax.set_title(f"layer {layer}")
        iteration_axis(ax)
    axes[0][0].set_ylabel("expert")
    fig.colorbar(img, ax=axes[0].tolist(), label="load / mean expert load (1 = balanced)")
    fig.suptitle(titled(f"Expert load over time — {run_label(run)}", [run]))
    mark_incomplete(fig, [run])
    return save_figure(fig, out)


def plot_rank_load(runs: RunLike | Iterable[RunLike], out: str | os.PathLike,
                   layer: int | None = None) -> Path:
    """Per-GPU load: max/mean imbalance over iterations, and mean tokens per rank, per run."""
    runs = as_runs(runs)
    fig, (imb_ax, bar_ax) = new_figure(1, 2, width=12)
    names = labels(runs)
    width = 0.8 / len(runs)
    for k, (run, label) in enumerate(zip(runs, names, strict=True)):
        require(run, "rank_tokens")
        tok_ILR = run["rank_tokens"].astype(float)
        tok_IR = tok_ILR[:, layer] if layer is not None else tok_ILR.sum(axis=1)
        mean_I = tok_IR.mean(axis=1)
        imb = np.divide(tok_IR.max(axis=1), mean_I, out=np.ones_like(mean_I), where=mean_I > 0)
        imb_ax.plot(run.arrays.get("iterations", np.arange(imb.size)), imb, label=label)
        ranks = np.arange(tok_IR.shape[1])
        bar_ax.bar(ranks + (k - (len(runs) - 1) / 2) * width, tok_IR.mean(axis=0), width,
                   yerr=[tok_IR.mean(0) - tok_IR.min(0), tok_IR.max(0) - tok_IR.mean(0)],
                   capsize=1, error_kw={"elinewidth": 0.6, "alpha": 0.6}, label=label)
    where = f"layer {layer}" if layer is not None else "all layers"
    imb_ax.axhline(1.0, color="k", lw=0.8, ls="--")
    iteration_axis(imb_ax)
    imb_ax.set(ylabel="max / mean tokens per GPU",
               title=f"Load imbalance across GPUs ({where})")
    imb_ax.grid(alpha=0.3)
    imb_ax.legend(fontsize=8)
    bar_ax.set(xlabel="GPU (rank)", ylabel="tokens computed per iteration",
               title="Tokens per GPU (mean, whiskers min–max)")
    bar_ax.legend(fontsize=8)
    fig.suptitle(titled("Per-GPU load", runs))
    mark_incomplete(fig, runs)
    return save_figure(fig, out)


def _drop_pct(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
    dropped, total = column(run, "tokens_dropped"), column(run, "tokens_total")
    if dropped.size and total.size:
        with np.errstate(invalid="ignore", divide="ignore"):
            return iterations(run), 100.0 * dropped / total
    require(run, "dropped", "expert_load")
    tot = run["expert_load"].sum(axis=(1, 2)).astype(float)
    return run["iterations"], 100.0 * run["dropped"].sum(axis=(1, 2)) / np.maximum(tot, 1)


def plot_drops(runs: RunLike | Iterable[RunLike], out: str | os.PathLike) -> Path:
    """Dropped-token fraction per iteration, one line per run."""
    runs = as_runs(runs)
    fig, ax = new_figure()
    drops = [_drop_pct(run) for run in runs]
    if all(not np.nansum(pct) for _, pct in drops):  # dropless: say so, not an empty plot
        ax.text(0.5, 0.5, f"no drops: {', '.join(labels(runs))} dropped 0 tokens",
                ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
        ax.set_title(titled("Dropped tokens per iteration", runs))
        mark_incomplete(fig, runs)
        return save_figure(fig, out)
    for (its, pct), label in zip(drops, labels(runs), strict=True):
        ax.plot(its, pct, label=f"{label}  (mean {np.nanmean(pct):.2f}%)")
    iteration_axis(ax)
    ax.set(ylabel="dropped tokens (% of routed)",
           title=titled("Dropped tokens per iteration", runs))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    mark_incomplete(fig, runs)
    return save_figure(fig, out)


def _gpu_memory_GiB(run: RunResult) -> float | None:
    cluster = run.config.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("gpu_memory_GiB"), (int, float)):
        return float(cluster["gpu_memory_GiB"])
    return None


def _peak_breakdown(run: RunResult) -> dict[str, float]:
    """Memory components (bytes) at the (iteration, rank) with the highest total."""
    require(run, "memory_bytes", "components")
    mem_ICR = run["memory_bytes"]
    if mem_ICR.ndim != 3 or mem_ICR.shape[1] == 0:
        raise MoesimError(f"{run.path}: memory.npz has no components to plot")
    total_IR = mem_ICR.sum(axis=1)
    i, r = np.unravel_index(np.argmax(total_IR), total_IR.shape)
    return {str(c): float(mem_ICR[i, k, r]) for k, c in enumerate(run["components"])}


def _byte_unit(largest: float) -> tuple[float, str]:
    """(bytes per unit, unit name) so that ``largest`` reads as 1..1023 of the unit."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 2 ** (10 * power):
            return float(2 ** (10 * power)), name
    return 1.0, "bytes"


def plot_memory(runs: RunLike | Iterable[RunLike], out: str | os.PathLike) -> Path:
    """Peak per-GPU memory per run as stacked bars of its components, against capacity."""
    runs = as_runs(runs)
    breakdowns = [_peak_breakdown(r) for r in runs]
    comps = sorted({c for b in breakdowns for c in b})
    peak = max(sum(b.values()) for b in breakdowns)
    scale, unit = _byte_unit(peak)
    fig, ax = new_figure(width=max(6.0, 1.2 * len(runs) + 3))
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for k, comp in enumerate(comps):
        vals = np.array([b.get(comp, 0.0) for b in breakdowns]) / scale
        ax.bar(x, vals, 0.6, bottom=bottom, label=comp, color=f"C{k}")
        bottom += vals
    for xi, top in zip(x, bottom, strict=True):
        ax.text(xi, top, f"{top:.3g}", ha="center", va="bottom", fontsize=8)
    for cap in sorted({c for c in (_gpu_memory_GiB(r) for r in runs) if c}):
        label = f"GPU memory {cap:g} GiB"
        if cap * GiB <= 10 * peak:  # draw the limit only where it does not flatten the bars
            ax.axhline(cap * GiB / scale, color="crimson", ls="--", lw=1, label=label)
        else:
            ax.plot([], [], color="crimson", ls="--", lw=1, label=f"{label} (off scale)")
    ax.set_xticks(x, labels(runs), rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=f"peak memory per GPU ({unit})",
           title=titled("Peak GPU memory by component", runs))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    mark_incomplete(fig, runs)
    return save_figure(fig, out)
