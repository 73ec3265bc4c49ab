"""Statistics of a routing trace: skew, imbalance, burstiness, rank similarity and their drift.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts, ``G`` GPUs of the expert-
parallel group. ``load_TLE`` is the pass's expert load summed over ranks.

All per-pass statistics are averaged over passes (NaN-aware: all-zero layers are skipped):

- ``max_mean`` — max / mean expert load of a layer in a pass (1 = perfect balance; E/k at most).
- ``gini`` — Gini coefficient of the expert loads (0 balanced, → 1 one expert takes all).
- ``gpu_imbalance`` — max / mean GPU load when experts sit contiguously, E/G per GPU
  (expert ``e`` on GPU ``e // (E/G)``: plain expert parallelism, the baseline every policy beats).
- ``tv`` — total-variation distance between consecutive passes' load distributions.
- ``consecutive_corr`` — Pearson correlation of consecutive passes' expert loads.
- ``rank_corr`` — mean pairwise Pearson correlation of the ranks' expert histograms in a pass
  (NaN for rank-aggregated traces).

The reference ranges (shared/TRACE_FORMATS.md): max/mean 2.6–13.7, consecutive TV 0.06–0.08 at
~100K tokens per pass with correlation 0.985–0.99, rank correlation ≈0.8 at ~8K tokens per rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.traces.format import RoutingTrace
from moesim.traces.stream import pass_chunks

STAT_NAMES = ("max_mean", "gini", "gpu_imbalance", "tv", "consecutive_corr", "rank_corr")
_CHUNK_CELLS = 2**24  # cells of counts processed at once by rank_corr (bounds memory)


def default_ep_size(num_experts: int, num_ranks: int) -> int:
    """``num_ranks`` if it divides ``num_experts``, else the largest divisor of E that is ≤ R."""
    if num_experts % num_ranks == 0:
        return num_ranks
    return max(g for g in range(1, min(num_ranks, num_experts) + 1) if num_experts % g == 0)


def expert_load_TLE(trace: RoutingTrace) -> np.ndarray:
    """Per-pass expert load summed over ranks, float64 ``[T, L, E]`` (read a chunk of passes at
    a time, so a memory-mapped trace larger than memory streams)."""
    counts = trace.counts_TLRE
    out = np.empty((counts.shape[0], counts.shape[1], counts.shape[3]))
    for t0, chunk in pass_chunks(counts):
        out[t0:t0 + chunk.shape[0]] = chunk.sum(axis=2, dtype=np.int64)
    return out


def max_over_mean_TL(load_TLE: np.ndarray) -> np.ndarray:
    """Max / mean expert load per pass and layer, ``[T, L]`` (NaN where a layer is empty)."""
    mean = load_TLE.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, load_TLE.max(axis=-1) / mean, np.nan)


def gini_TL(load_TLE: np.ndarray) -> np.ndarray:
    """Gini coefficient of expert loads per pass and layer, ``[T, L]``."""
    x = np.sort(load_TLE, axis=-1)
    n = x.shape[-1]
    total = x.sum(axis=-1)
    weighted = (x * np.arange(1, n + 1)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * weighted / (n * total) - (n + 1) / n, np.nan)


def gpu_imbalance_TL(load_TLE: np.ndarray, ep_size: int) -> np.ndarray:
    """Max / mean GPU load under contiguous placement over ``ep_size`` GPUs, ``[T, L]``."""
    T, L, E = load_TLE.shape
    if ep_size < 1 or E % ep_size:
        raise MoesimError(f"--ep-size {ep_size} must divide the {E} experts; pick a divisor "
                          f"of {E}")
    gpu_TLG = load_TLE.reshape(T, L, ep_size, E // ep_size).sum(axis=-1)
    return max_over_mean_TL(gpu_TLG)


def tv_TL(load_TLE: np.ndarray) -> np.ndarray:
    """Total-variation distance between passes t and t+1 per layer, ``[T-1, L]``."""
    p = _normalise(load_TLE)
    return 0.5 * np.abs(p[1:] - p[:-1]).sum(axis=-1)


def consecutive_corr_TL(load_TLE: np.ndarray) -> np.ndarray:
    """Pearson correlation of passes t and t+1's expert loads per layer, ``[T-1, L]``."""
    z = _zscore(load_TLE)
    a, b = z[1:], z[:-1]
    ok = (a != 0).any(axis=-1) & (b != 0).any(axis=-1)
    return np.where(ok, (a * b).mean(axis=-1), np.nan)


def rank_corr_TL(counts_TLRE: np.ndarray) -> np.ndarray:
    """Mean pairwise Pearson correlation of rank histograms per pass and layer, ``[T, L]``.

    Uses ``mean_{r≠s} z_r·z_s / E = (|Σ_r z_r|² / E − R') / (R'(R'−1))`` with ``z`` the
    standardised histograms and ``R'`` the ranks with non-constant histograms, and ``Σ_r z_r =
    Σ_r c_r / σ_r − Σ_r μ_r / σ_r``: per rank its sum and sum of squares (exact in float64 for
    counts, so ``E²σ² = E·Σc² − (Σc)²`` is too), then one weighted sum over ranks (a matrix
    product, by einsum) — four passes over the counts, processed in chunks of passes so memory stays
    bounded on memory-mapped traces.
    """
    T, L, R, E = counts_TLRE.shape
    out = np.full((T, L), np.nan)
    if R < 2:
        return out
    buf = None
    for start, chunk in pass_chunks(counts_TLRE, _CHUNK_CELLS):
        for layer in range(L):                 # a layer at a time: the float buffer is reused
            if buf is None or buf.shape[0] != chunk.shape[0]:
                buf = np.empty((chunk.shape[0], R, E))
            buf[...] = chunk[:, layer]
            out[start:start + chunk.shape[0], layer] = _rank_corr_T(buf)
    return out


def _rank_corr_T(c_TRE: np.ndarray) -> np.ndarray:
    """:func:`rank_corr_TL` of one layer's float64 counts ``[T, R, E]``."""
    E = c_TRE.shape[-1]
    s1 = c_TRE.sum(axis=-1)                                            # [T, R]
    var_E2 = E * np.einsum("tre,tre->tr", c_TRE, c_TRE) - s1 * s1      # E² σ², exact
    valid = var_E2 > 0
    w = np.zeros_like(s1)
    np.divide(E, np.sqrt(var_E2, where=valid, out=np.zeros_like(s1)), out=w, where=valid)
    zsum = np.einsum("tr,tre->te", w, c_TRE) - (w * s1 / E).sum(axis=-1)[:, None]  # no BLAS:
    # a threaded gemv on a busy machine is ~40x slower than einsum's loop here
    total = (zsum * zsum).sum(axis=-1) / E
    n = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, (total - n) / (n * (n - 1)), np.nan)


def _normalise(x: np.ndarray) -> np.ndarray:
    total = x.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, x / total, np.nan)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Standardise along the last axis; constant rows become all zeros."""
    centred = x - x.mean(axis=-1, keepdims=True)
    std = centred.std(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(std > 0, centred / std, 0.0)


@dataclass(frozen=True)
class TraceStats:
    """Summary of a trace: per-layer means, overall means and per-window drift."""

    ep_size: int
    per_layer: dict[str, list[float]]      # stat name → [L] mean over passes
    overall: dict[str, float]              # stat name → mean over passes and layers
    windows: list[dict]                    # [{"name", "iterations": [a, b], stat: value}]

    def to_dict(self) -> dict:
        return {"ep_size": self.ep_size, "overall": self.overall,
                "per_layer": self.per_layer, "windows": self.windows}


def per_pass_stats(trace: RoutingTrace, ep_size: int) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STAT_NAMES` per pass and layer (``[T, L]`` or ``[T-1, L]``)."""
    load = expert_load_TLE(trace)
    return {"max_mean": max_over_mean_TL(load), "gini": gini_TL(load),
            "gpu_imbalance": gpu_imbalance_TL(load, ep_size), "tv": tv_TL(load),
            "consecutive_corr": consecutive_corr_TL(load),
            "rank_corr": rank_corr_TL(trace.counts_TLRE)}


def trace_stats(trace: RoutingTrace, ep_size: int | None = None,
                num_windows: int = 3) -> TraceStats:
    """Compute :class:`TraceStats`; windows split the iterations into ``num_windows`` parts."""
    m = trace.meta
    ep = ep_size or default_ep_size(m.num_experts, m.num_ranks)
    stats = per_pass_stats(trace, ep)
    per_layer = {k: [_r(v) for v in _nanmean(s, axis=0)] for k, s in stats.items()}
    overall = {k: _r(_nanmean(s)) for k, s in stats.items()}
    return TraceStats(ep, per_layer, overall, _windows(trace, stats, num_windows))


def _windows(trace: RoutingTrace, stats: dict[str, np.ndarray], num_windows: int) -> list[dict]:
    mb, iters = trace.meta.micro_batches_per_iteration, trace.num_iterations
    bounds = np.linspace(0, iters, min(num_windows, iters) + 1).round().astype(int)
    names = {3: ("first", "middle", "last")}.get(len(bounds) - 1)
    numbers = trace.iteration_numbers()
    out = []
    for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        row = {"name": names[w] if names else f"window{w}",
               "iterations": [int(numbers[a]), int(numbers[b - 1])]}
        for k, s in stats.items():
            row[k] = _r(_nanmean(s[a * mb:b * mb]))
        out.append(row)
    return out


def _nanmean(x: np.ndarray, axis: int | None = None):
    """``np.nanmean`` without the all-NaN warning (all-NaN slices give NaN)."""
    if x.size == 0:
        return np.full(x.shape[1:], np.nan) if axis == 0 else np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _r(value) -> float | None:
    """Round for display/JSON; NaN becomes None (JSON null)."""
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def format_table(trace: RoutingTrace, stats: TraceStats) -> str:
    """A fixed-width text report: shape line, per-layer table, drift table."""
    m = trace.meta
    head = (f"trace: {trace.num_passes} passes = {trace.num_iterations} iterations x "
            f"{m.micro_batches_per_iteration} micro-batches (iterations {m.first_iteration}.."
            f"{int(trace.iteration_numbers()[-1]) if trace.num_iterations else '-'} stride "
            f"{m.iteration_stride}), {m.num_layers} layers, {m.num_ranks} ranks"
            f"{'' if m.rank_resolved else ' (rank-aggregated)'}, {m.num_experts} experts, "
            f"top-{m.top_k}{' (variable)' if m.variable_k else ''}, {m.tokens_per_rank} "
            f"tokens/rank/pass\nsource: {m.source or '-'}"
            f"{' (synthetic: no recorded data)' if 'synth_config' in m.extra else ''}   "
            f"license: {m.license or '-'}   "
            f"EP size for gpu_imb: {stats.ep_size}")
    cols = ("max/mean", "gini", "gpu_imb", "tv", "corr", "rank_corr")
    line = "-" * (8 + 11 * len(cols))
    rows = [head, "", f"{'layer':>6}  " + "".join(f"{c:>11}" for c in cols), line]
    for layer in range(m.num_layers):
        vals = [stats.per_layer[k][layer] for k in STAT_NAMES]
        rows.append(f"{layer:>6}  " + "".join(_cell(v) for v in vals))
    rows += [line, f"{'all':>6}  " + "".join(_cell(stats.overall[k]) for k in STAT_NAMES), "",
             "drift over iterations (means over layers and passes):",
             f"{'window':>16}  " + "".join(f"{c:>11}" for c in cols), "-" * len(line + "-" * 10)]
    for w in stats.windows:
        label = f"{w['name']} {w['iterations'][0]}-{w['iterations'][1]}"
        rows.append(f"{label:>16}  " + "".join(_cell(w[k]) for k in STAT_NAMES))
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return f"{'-':>11}" if value is None else f"{value:>11.3f}"
