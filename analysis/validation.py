"""Predicted vs measured: the one comparison both backends' RunResults feed.

:func:`compare_runs` takes a predicted run (simulator) and a measured one (executor) of the same
trace slice and policy, matches their iterations, and reports

- per iteration: ``step_time_s`` predicted and measured, and the error;
- per phase: the phase's time per iteration — max over ranks of the rank's busy time in that
  phase summed over layers (``times.npz`` ``busy_s[I, L+1, F, R]``) — predicted and measured;

and ``routing_gaps``: for each load / traffic metric of :mod:`moesim.metrics` (the overload
factor, imbalance, hottest link, …), the largest relative difference between the backends over
the matched iterations. Both compute them from the same routing and program, so every gap
should be 0; a gap means the two backends did not route alike.

Step and phase times are each summarised as MAPE (mean of ``|pred − meas| / meas``, in
percent) and max relative error (percent, signed by its direction in ``worst_sign``: +1
over-prediction). Phases that are (close to) zero in both runs are left out (``min_phase_s``).
Both backends count a collective's wait for stragglers as idle, so busy times mean the same
thing on both sides.

``measured`` may be several executor runs of the same configuration (repeats): each measured
quantity is then the median over the repeats, iteration by iteration, so one run's preemption
by another process on a shared machine does not count as the program's time.

Shape legend: ``I`` matched iterations, ``L`` layers (+1), ``F`` phases, ``R`` ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import PHASES
from moesim.results import RunResult


@dataclass
class ErrorStats:
    """Relative errors of one quantity over matched iterations (percent)."""

    predicted_I: np.ndarray
    measured_I: np.ndarray

    @property
    def rel_I(self) -> np.ndarray:
        """Signed relative error per iteration, ``(pred − meas) / meas``."""
        return (self.predicted_I - self.measured_I) / np.maximum(self.measured_I, 1e-30)

    @property
    def mape_pct(self) -> float:
        return float(np.mean(np.abs(self.rel_I)) * 100) if len(self.rel_I) else float("nan")

    @property
    def max_pct(self) -> float:
        return float(np.max(np.abs(self.rel_I)) * 100) if len(self.rel_I) else float("nan")

    @property
    def worst_sign(self) -> int:
        return int(np.sign(self.rel_I[np.argmax(np.abs(self.rel_I))])) if len(self.rel_I) else 0


@dataclass
class Comparison:
    """Result of :func:`compare_runs`: step time and per-phase errors."""

    iterations: np.ndarray
    step: ErrorStats
    phases: dict[str, ErrorStats] = field(default_factory=dict)
    routing_gaps: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """Table rows: ``quantity, predicted_s, measured_s, mape_pct, max_pct`` (means over
        iterations for the times)."""
        out = []
        for name, st in [("step", self.step), *self.phases.items()]:
            out.append({"quantity": name, "predicted_s": float(np.mean(st.predicted_I)),
                        "measured_s": float(np.mean(st.measured_I)),
                        "mape_pct": st.mape_pct, "max_pct": st.max_pct})
        return out


def phase_time_IF(run: RunResult, iterations: np.ndarray) -> np.ndarray:
    """Per iteration and phase: max over ranks of busy time summed over layers, ``[I, F]``."""
    its = np.asarray(run["iterations"])
    index = [int(np.flatnonzero(its == i)[0]) for i in iterations]
    busy = np.asarray(run["busy_s"], dtype=np.float64)[index]          # [I, L+1, F, R]
    return busy.sum(axis=1).max(axis=2)


def compare_runs(predicted: RunResult, measured: RunResult | Sequence[RunResult], *,
                 min_phase_s: float = 1e-5) -> Comparison:
    """Compare a predicted run and a measured one (or the median of several repeats of it)
    on the iterations all of them hold."""
    runs = [measured] if isinstance(measured, RunResult) else list(measured)
    if not runs:
        raise MoesimError("compare_runs needs at least one measured run")
    common = np.asarray(predicted.summary.get("iteration", []), dtype=np.int64)
    for run in runs:
        common = np.intersect1d(common, np.asarray(run.summary.get("iteration", []),
                                                   dtype=np.int64))
    if len(common) == 0:
        raise MoesimError(f"runs {predicted.path} and {runs[0].path} share no iterations; "
                          "run both on the same --iterations")
    step = ErrorStats(_column(predicted, "step_time_s", common),
                      np.median([_column(r, "step_time_s", common) for r in runs], axis=0))
    comp = Comparison(iterations=common, step=step)
    p_IF = phase_time_IF(predicted, common)
    m_IF = np.median([phase_time_IF(r, common) for r in runs], axis=0)
    for f, phase in enumerate(PHASES):
        if max(p_IF[:, f].mean(), m_IF[:, f].mean()) < min_phase_s:
            continue
        comp.phases[phase] = ErrorStats(p_IF[:, f], m_IF[:, f])
    comp.routing_gaps = routing_gaps(predicted, runs[0], common)
    return comp


def routing_gaps(predicted: RunResult, measured: RunResult, iterations: np.ndarray
                 ) -> dict[str, float]:
    """Largest ``|pred − meas| / max(|meas|, 1)`` of each :data:`moesim.metrics.COLUMNS`
    column both runs hold, over ``iterations``."""
    from moesim.metrics import COLUMNS

    out = {}
    for name in COLUMNS:
        if name in predicted.summary and name in measured.summary:
            p, m = _column(predicted, name, iterations), _column(measured, name, iterations)
            out[name] = float(np.max(np.abs(p - m) / np.maximum(np.abs(m), 1.0)))
    return out


def routing_gap_line(comp: Comparison, tolerance: float = 1e-9) -> str:
    """One line: the metrics identical in both backends, or the ones that differ."""
    bad = {k: v for k, v in comp.routing_gaps.items() if not v <= tolerance}
    if not comp.routing_gaps:
        return "load/traffic metrics: not recorded by both runs"
    if not bad:
        return f"load/traffic metrics: identical in both backends ({len(comp.routing_gaps)})"
    return "load/traffic metrics DIFFER: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items())


def _column(run: RunResult, name: str, iterations: np.ndarray) -> np.ndarray:
    its = np.asarray(run.summary["iteration"], dtype=np.int64)
    col = np.asarray(run.summary[name], dtype=np.float64)
    return np.array([col[np.flatnonzero(its == i)[0]] for i in iterations])


def format_table(rows: list[dict], title: str = "") -> str:
    """A plain-text table of :meth:`Comparison.rows` (times in ms)."""
    lines = [title] if title else []
    lines.append(f"{'quantity':<14}{'pred ms':>10}{'meas ms':>10}{'MAPE %':>9}{'max %':>9}")
    for r in rows:
        lines.append(f"{r['quantity']:<14}{r['predicted_s'] * 1e3:>10.2f}"
                     f"{r['measured_s'] * 1e3:>10.2f}{r['mape_pct']:>9.1f}{r['max_pct']:>9.1f}")
    return "\n".join(lines)
