"""What ``moesim validate`` writes: the ``--json`` object, the summary table, ``validation.csv``
and the predicted-vs-measured figure, from its :class:`~moesim.executor.validate.ConfigResult`
list.

Split from :mod:`moesim.executor.validate`, which re-exports these names.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moesim.executor.validate import ConfigResult


def validation_json(results: list[ConfigResult], out: Path) -> dict:
    """``validate --json``: per configuration, its step-time errors and the per-quantity rows
    of validation.csv (schema in docs/cli.md)."""
    return {"out_dir": str(out), "configs": [
        {"name": r.name, "trace": r.trace, "policy": r.policy, "world_size": r.world,
         "step_mape_pct": r.comparison.step.mape_pct, "step_max_pct": r.comparison.step.max_pct,
         "rows": r.rows()} for r in results]}


def summary_table(results: list[ConfigResult]) -> str:
    """One line per configuration: step-time MAPE and max error."""
    lines = [f"{'configuration':<40}{'step MAPE %':>12}{'max %':>8}"]
    for r in results:
        s = r.comparison.step
        lines.append(f"{r.name:<40}{s.mape_pct:>12.1f}{s.max_pct:>8.1f}")
    return "\n".join(lines)


def write_csv(results: list[ConfigResult], path: Path) -> None:
    from moesim.results import atomic_write_bytes

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["config", "trace", "policy", "world_size", "quantity", "predicted_s",
                "measured_s", "mape_pct", "max_pct"])
    for r in results:
        for row in r.rows():
            w.writerow([r.name, r.trace, r.policy, r.world, row["quantity"],
                        row["predicted_s"], row["measured_s"], row["mape_pct"], row["max_pct"]])
    atomic_write_bytes(path, buf.getvalue().encode())


def write_figure(results: list[ConfigResult], path: Path) -> Path:
    """Predicted vs measured step time per iteration (left) and per-phase MAPE (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    hi = 0.0
    for r in results:
        s = r.comparison.step
        ax.scatter(s.measured_I * 1e3, s.predicted_I * 1e3, s=18, label=r.name)
        hi = max(hi, float(s.measured_I.max()), float(s.predicted_I.max()))
    ax.plot([0, hi * 1e3 * 1.05], [0, hi * 1e3 * 1.05], "k--", lw=0.8)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title("per iteration")
    ax.legend(fontsize=6)
    phases = sorted({p for r in results for p in r.comparison.phases})
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        vals = [r.comparison.phases[p].mape_pct if p in r.comparison.phases else np.nan
                for p in phases]
        bx.bar(np.arange(len(phases)) + i * width, vals, width, label=r.name)
    bx.set_xticks(np.arange(len(phases)) + 0.4 - width / 2, phases, rotation=30, fontsize=7)
    bx.set_ylabel("MAPE (%)")
    bx.set_title("per phase")
    fig.tight_layout()
    from moesim.safeio import atomic_file, writing

    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, suffix=path.suffix) as fh:
            fig.savefig(fh, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
