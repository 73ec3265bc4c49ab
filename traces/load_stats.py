"""Expert-load statistics per layer and across layers (Megatron-LM issue 2398), for `trace info`.

Shape legend: ``T`` passes, ``L`` layers, ``E`` experts. Per pass, each layer's expert load is
summed over ranks; then

- per layer (means over passes): the fewest, the most and the standard deviation of tokens per
  expert, and the balance metric max / mean tokens per expert;
- across layers: p50 / p75 / p90 / p95 of the per-layer balance in each pass (means over
  passes), and the fewest / most tokens any expert of any layer received in any pass.

The same per-iteration numbers go into RunResults (:func:`moesim.metrics.expert_load_stats`).
"""

from __future__ import annotations

import numpy as np

from moesim.metrics import BALANCE_PERCENTILES, expert_load_stats
from moesim.traces.format import RoutingTrace


def expert_load_summary(trace: RoutingTrace) -> dict:
    """``{"per_layer": {name: [L]}, "across_layers": {name: float}}`` (module docstring)."""
    from moesim.traces.stats import expert_load_TLE

    load_TLE = expert_load_TLE(trace)                     # streams a memory-mapped trace
    if load_TLE.shape[0] == 0:
        return {"per_layer": {}, "across_layers": {}}
    mean_TL = load_TLE.mean(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        balance_TL = np.where(mean_TL > 0, load_TLE.max(axis=2) / mean_TL, np.nan)
    per_layer = {
        "tokens_min": load_TLE.min(axis=2).mean(axis=0),
        "tokens_max": load_TLE.max(axis=2).mean(axis=0),
        "tokens_std": load_TLE.std(axis=2).mean(axis=0),
        "balance": _nanmean0(balance_TL),
    }
    per_pass = [expert_load_stats(load_LE) for load_LE in load_TLE]
    across = {f"balance_p{q}": float(np.mean([s[f"expert_balance_p{q}"] for s in per_pass]))
              for q in BALANCE_PERCENTILES}
    across.update(tokens_min=float(load_TLE.min()), tokens_max=float(load_TLE.max()),
                  tokens_std=float(np.mean([s["expert_tokens_std"] for s in per_pass])))
    return {"per_layer": {k: [_round(x) for x in v] for k, v in per_layer.items()},
            "across_layers": {k: _round(v) for k, v in across.items()}}


def _nanmean0(x_TL: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x_TL)
    n = ok.sum(axis=0)
    return np.where(n > 0, np.where(ok, x_TL, 0).sum(axis=0) / np.maximum(n, 1), np.nan)


def _round(value: float) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else round(value, 4)


def format_expert_load(summary: dict) -> str:
    """The text block `trace info` prints under its main table."""
    per, across = summary["per_layer"], summary["across_layers"]
    if not per:
        return ""
    cols = ("balance", "tokens_min", "tokens_max", "tokens_std")
    rows = ["", "expert load per layer (tokens per expert, means over passes):",
            f"{'layer':>6}  " + "".join(f"{c:>12}" for c in cols), "-" * (8 + 12 * len(cols))]
    for layer in range(len(per["balance"])):
        rows.append(f"{layer:>6}  " + "".join(_cell(per[c][layer]) for c in cols))
    pct = "  ".join(f"p{q} {_num(across[f'balance_p{q}'])}" for q in BALANCE_PERCENTILES)
    rows.append(f"balance (max/mean per layer) across layers: {pct}; tokens per expert "
                f"min {_num(across['tokens_min'], '.0f')} max {_num(across['tokens_max'], '.0f')}"
                f" std {_num(across['tokens_std'], '.1f')}")
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return f"{'-':>12}" if value is None else f"{value:>12.3f}"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
