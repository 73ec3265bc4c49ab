"""What ``moesim train`` reports of a policy comparison: the smoothed loss
(:func:`running_mean`), the wall time to a target loss (:func:`time_to_target`), and
``train_results.json`` with ``loss_vs_time.png`` (:func:`write_results`, written atomically).

Split from :mod:`moesim.executor.train`, which re-exports these names.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from moesim.safeio import atomic_file, atomic_write_bytes, writing


def running_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], values]))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def time_to_target(records: list[dict], target: float | None, smooth: int) -> float | None:
    """Wall time at which the mean loss of the last ``smooth`` steps first reaches ``target``."""
    if target is None:
        return None
    hit = np.flatnonzero(running_mean([r["loss"] for r in records], smooth) <= target)
    return records[int(hit[0])]["wall_s"] if len(hit) else None


def fmt(v) -> str:
    """A summary value for the log line (``n/a`` for None, 4 significant digits for floats)."""
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def config_dict(cfg: Any) -> dict:
    """``train_results.json``'s config: the TrainConfig's fields and the torch version."""
    d = asdict(cfg)
    import torch

    d["torch_version"] = torch.__version__
    return d


def write_results(result: dict, out_dir: Path) -> None:
    """``train_results.json`` and ``loss_vs_time.png`` (loss vs wall clock, drops per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "train_results.json", json.dumps(result, indent=1).encode())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    smooth = result["config"]["smooth"]
    for name, recs in result["steps"].items():
        ax1.plot([r["wall_s"] for r in recs], running_mean([r["loss"] for r in recs], smooth),
                 label=name)
        ax2.plot([r["step"] for r in recs], [r["dropped"] for r in recs], label=name)
    target = result["config"]["target_loss"]
    if target is not None:
        ax1.axhline(target, color="grey", linestyle=":", label="target")
    ax1.set(xlabel="wall clock (s)", ylabel=f"LM loss, mean of last {smooth} steps",
            title="loss vs time")
    ax2.set(xlabel="step", ylabel="dropped assignments", title="drops per step")
    ax1.legend()
    fig.tight_layout()
    path = out_dir / "loss_vs_time.png"
    with writing(path), atomic_file(path, suffix=".png") as fh:
        fig.savefig(fh, dpi=120, format="png")
    plt.close(fig)
