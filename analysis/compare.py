"""Predicted vs measured: pairs of a simulator run and an executor run of the same config.

Points are per iteration: the step time, and each phase's time (``busy_s[I, L+1, F, R]`` summed
over layers, on the busiest rank). Errors are relative to the measurement.
When ``analysis/validation.py`` is present its error tables are used for reports; the scatter
itself needs only the two runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import PHASES
from moesim.results import RunResult

from .figio import mark_incomplete, new_figure, save_figure
from .runs import RunLike, as_runs, column, iterations, pair_runs, run_label, titled

BANDS = (0.10, 0.25)


STEP = "step time"


def points(pred: RunResult, meas: RunResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{quantity: (measured_s, predicted_s)}`` over common iterations: ``"step time"`` first,
    then each phase. Uses ``analysis/validation.compare_runs`` when it is present."""
    try:
        from .validation import compare_runs
    except ImportError:
        return {STEP: step_points(pred, meas), **phase_points(pred, meas)}
    comp = compare_runs(pred, meas)
    out = {STEP: (comp.step.measured_I, comp.step.predicted_I)}
    out.update({ph: (st.measured_I, st.predicted_I) for ph, st in comp.phases.items()})
    return out


def _common(pred: RunResult, meas: RunResult) -> tuple[list[int], list[int]]:
    """Row indices of the iterations both runs recorded (summary rows)."""
    p_its, m_its = iterations(pred).tolist(), iterations(meas).tolist()
    common = sorted(set(p_its) & set(m_its))
    if not common:
        raise MoesimError(f"runs {pred.path} and {meas.path} share no iterations; run both on "
                          "the same --iterations")
    return [p_its.index(i) for i in common], [m_its.index(i) for i in common]


def step_points(pred: RunResult, meas: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """(measured, predicted) step times in seconds over the iterations both recorded."""
    pi, mi = _common(pred, meas)
    return column(meas, "step_time_s")[mi], column(pred, "step_time_s")[pi]


def phase_points(pred: RunResult, meas: RunResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{phase: (measured, predicted)}`` seconds per common iteration, busiest rank."""
    if "busy_s" not in pred.arrays or "busy_s" not in meas.arrays:
        return {}
    p_its, m_its = pred["iterations"].tolist(), meas["iterations"].tolist()
    common = sorted(set(p_its) & set(m_its))
    pi, mi = [p_its.index(i) for i in common], [m_its.index(i) for i in common]
    p_IFR, m_IFR = pred["busy_s"][pi].sum(axis=1), meas["busy_s"][mi].sum(axis=1)
    phases = [str(p) for p in pred.arrays.get("phases", PHASES)]
    out = {}
    for f, phase in enumerate(phases):
        m, p = m_IFR[:, f].max(axis=1), p_IFR[:, f].max(axis=1)
        if max(m.mean(initial=0), p.mean(initial=0)) >= 1e-5:
            out[phase] = (m, p)
    return out


def mape(measured: np.ndarray, predicted: np.ndarray) -> float:
    """Mean absolute percentage error of ``predicted`` against ``measured`` (%)."""
    ok = measured > 0
    if not ok.any():
        return float("nan")
    return float(100.0 * np.mean(np.abs(predicted[ok] - measured[ok]) / measured[ok]))


def max_error(measured: np.ndarray, predicted: np.ndarray) -> float:
    """Largest absolute percentage error (%)."""
    ok = measured > 0
    if not ok.any():
        return float("nan")
    return float(100.0 * np.max(np.abs(predicted[ok] - measured[ok]) / measured[ok]))


def plot_predicted_vs_measured(runs: RunLike | Iterable[RunLike] | Sequence[tuple],
                               out: str | os.PathLike) -> Path:
    """Scatter of predicted vs measured times (ms, log-log) with ±10% / ±25% bands."""
    pairs = _pairs(runs)
    fig, ax = new_figure(width=7, height=6.5)
    lo, hi = np.inf, 0.0
    for k, (pred, meas) in enumerate(pairs):
        tag = f" [{run_label(pred)}]" if len(pairs) > 1 else ""
        for f, (name, (m, p)) in enumerate(points(pred, meas).items()):
            style = (dict(marker="*", s=60, zorder=3, color="k" if k == 0 else f"C{k}")
                     if name == STEP else dict(s=14, alpha=0.7, color=f"C{(f - 1) % 10}"))
            ax.scatter(m * 1e3, p * 1e3, label=f"{name}{tag}  (MAPE {mape(m, p):.1f}%)",
                       **style)
            lo, hi = _extend(lo, hi, m, p)
    _bands(ax, lo * 1e3, hi * 1e3)
    ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)",
           title=titled("Predicted vs measured, per iteration and phase",
                        [r for pair in pairs for r in pair]))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    mark_incomplete(fig, [r for pair in pairs for r in pair])
    return save_figure(fig, out)


def _pairs(runs) -> list[tuple[RunResult, RunResult]]:
    items = list(runs) if not isinstance(runs, (str, os.PathLike, RunResult)) else [runs]
    if items and all(isinstance(i, tuple) for i in items):
        return [tuple(as_runs(i)) for i in items]
    pairs = pair_runs(as_runs(items))
    if not pairs:
        raise MoesimError("predicted-vs-measured needs a simulator run and an executor run of "
                          "the same config; pass both run directories")
    return pairs


def _extend(lo: float, hi: float, *arrays: np.ndarray) -> tuple[float, float]:
    vals = np.concatenate([a[a > 0] for a in arrays]) if arrays else np.zeros(0)
    if vals.size:
        lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
    return lo, hi


def _bands(ax, lo: float, hi: float) -> None:
    if not np.isfinite(lo) or hi <= 0:
        lo, hi = 1e-3, 1.0
    xs = np.geomspace(lo / 1.5, hi * 1.5, 50)
    ax.plot(xs, xs, color="k", lw=1, label="predicted = measured")
    for band, alpha in zip(BANDS, (0.18, 0.08), strict=True):
        ax.fill_between(xs, xs * (1 - band), xs * (1 + band), color="tab:blue", alpha=alpha,
                        lw=0, label=f"±{band:.0%}")
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(xs[0], xs[-1])
