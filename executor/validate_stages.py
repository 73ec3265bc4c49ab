"""Per-stage errors of a layout run: predicted vs measured phase times of each pipeline stage.

Both backends write the layout into ``config.json`` (``parallel.stages[k].ranks`` = the
stage's world ranks ``[first, last + 1)``, :func:`moesim.layout_run.config_entry`) and per-rank
busy times into ``times.npz`` (``busy_s[I, L+1, F, R]``). A stage's phase time per iteration is
what :func:`moesim.analysis.validation.phase_time_IF` computes — max over ranks of busy time
summed over layers — over that stage's ranks only; measured repeats are reduced by the median,
iteration by iteration, as :func:`~moesim.analysis.validation.compare_runs` does for the whole
world. Rows are named ``s<k> <phase>`` and have the columns of
:meth:`~moesim.analysis.validation.Comparison.rows`.

Shape legend: ``I`` matched iterations, ``F`` phases, ``R`` ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moesim.results import RunResult


def stage_ranks(run: RunResult) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` world ranks of each pipeline stage of ``run``'s layout; empty
    for the default layout."""
    stages = (run.config.get("parallel") or {}).get("stages") or []
    return [(int(s["ranks"][0]), int(s["ranks"][1])) for s in stages]


def _stage_phase_IF(run: RunResult, iterations: np.ndarray, first: int, stop: int
                    ) -> np.ndarray:
    """``[I, F]`` phase times of the ranks ``first..stop-1`` (analysis's own reduction)."""
    from moesim.analysis.validation import phase_time_IF

    view = {"iterations": run["iterations"], "busy_s": np.asarray(run["busy_s"])[..., first:stop]}
    return phase_time_IF(view, iterations)


def stage_rows(predicted: RunResult, measured: Sequence[RunResult], iterations: np.ndarray,
               *, min_phase_s: float = 1e-5) -> list[dict]:
    """One row per (stage, phase) of a pipeline layout (none with fewer than 2 stages);
    phases (close to) zero on both sides are left out, as in ``compare_runs``."""
    from moesim.analysis.validation import ErrorStats
    from moesim.ops import PHASES

    stages = stage_ranks(predicted)
    if len(stages) < 2:
        return []
    its = np.asarray(iterations, dtype=np.int64)
    rows = []
    for k, (first, stop) in enumerate(stages):
        p_IF = _stage_phase_IF(predicted, its, first, stop)
        m_IF = np.median([_stage_phase_IF(r, its, first, stop) for r in measured], axis=0)
        for f, phase in enumerate(PHASES):
            if max(p_IF[:, f].mean(), m_IF[:, f].mean()) < min_phase_s:
                continue
            st = ErrorStats(p_IF[:, f], m_IF[:, f])
            rows.append({"quantity": f"s{k} {phase}", "predicted_s": float(p_IF[:, f].mean()),
                         "measured_s": float(m_IF[:, f].mean()), "mape_pct": st.mape_pct,
                         "max_pct": st.max_pct})
    return rows
