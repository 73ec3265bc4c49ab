"""Regrouping a trace's source ranks: the same routing recorded on R ranks, replayed on N.

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks, ``N`` new ranks, ``E`` experts,
``n`` tokens of one rank in one pass, ``K`` top-k.

- **Merge** (``R`` a multiple of ``N``): new rank ``j`` is source ranks ``j·R/N … (j+1)·R/N - 1``
  together — their counts summed, their tokens (when stored) concatenated. Exact.
- **Split** (``N`` a multiple of ``R``): each source rank's tokens are shared out over ``f =
  N/R`` new ranks. With per-token ids the tokens are cut into ``f`` contiguous runs (exact).
  With counts only, a rank's assignments are rebuilt as a token table of distinct experts and
  dealt, tokens shuffled, ``n // f`` (+1 for the first ``n mod f``) to each part
  (:func:`moesim.traces.transform.spread_over_ranks`'s dealing): every expert's total over the
  parts equals the source rank's, each part sends exactly its tokens, and its histogram is a
  without-replacement sample of its source rank's, so the source ranks' differences carry over
  and the parts of one rank differ only by sampling.
- **Otherwise** split to ``lcm(R, N)`` ranks, then merge to ``N``.

Always exact: every (pass, layer, expert) total over ranks. Kept where the sizes allow: fixed-k
when ``n·R/N`` is a whole number of tokens (else the trace becomes ``variable_k``). What was done
is appended to ``meta.extra["regroup"]`` (``from_ranks``, ``to_ranks``, ``method``, ``seed``).
A rank-aggregated trace (``R = 1``, ``rank_resolved = false``) is spread instead.
"""

from __future__ import annotations

import math

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace
from moesim.traces.transform import _deal, spread_over_ranks
from moesim.traces.validate import validate

MAX_RANKS = 1 << 16


def regroup_ranks(trace: RoutingTrace, num_ranks: int, seed: int = 0) -> RoutingTrace:
    """``trace`` with its source ranks merged or split to ``num_ranks`` (module docstring)."""
    R = trace.meta.num_ranks
    if not isinstance(num_ranks, int) or not 1 <= num_ranks <= MAX_RANKS:
        raise TraceError(f"--ranks {num_ranks} must be a whole number in [1, {MAX_RANKS}]")
    if not trace.meta.rank_resolved:
        spread = spread_over_ranks(trace, num_ranks, seed)
        return _record(spread, R, num_ranks, "spread (rank-aggregated source)", seed)
    if num_ranks == R:
        return trace
    middle = math.lcm(R, num_ranks)
    if middle > MAX_RANKS:
        raise TraceError(f"regrouping {R} ranks to {num_ranks} goes through lcm = {middle} "
                         f"ranks, more than {MAX_RANKS}; choose a rank count that divides or is "
                         f"a multiple of {R}")
    rng = np.random.default_rng(seed)
    out = trace if middle == R else _split(trace, middle // R, rng)
    if middle != num_ranks:
        out = _merge(out, middle // num_ranks)
    method = "merge" if middle == R else "split" if middle == num_ranks else \
        f"split to {middle} then merge"
    if middle != R and trace.topk_TLRNK is None:
        method += " (counts dealt token by token)"
    return _record(validate(out), R, num_ranks, method, seed)


def _record(trace: RoutingTrace, before: int, after: int, method: str, seed: int
            ) -> RoutingTrace:
    m = trace.meta
    steps = [*m.extra.get("regroup", []), {"from_ranks": before, "to_ranks": after,
                                           "method": method, "seed": seed}]
    return RoutingTrace(trace.counts_TLRE, m.replace(extra={**m.extra, "regroup": steps}),
                        trace.topk_TLRNK)


def _merge(trace: RoutingTrace, group: int) -> RoutingTrace:
    """Sum consecutive groups of ``group`` ranks; concatenate their tokens."""
    T, L, R, E = trace.counts_TLRE.shape
    counts = np.asarray(trace.counts_TLRE).reshape(T, L, R // group, group, E).sum(
        axis=3, dtype=np.int64)                  # a directory trace may store uint16
    m = trace.meta
    topk = None
    if trace.topk_TLRNK is not None:
        n, K = trace.topk_TLRNK.shape[3:]
        topk = np.asarray(trace.topk_TLRNK).reshape(T, L, R // group, group * n, K)
    meta = m.replace(num_ranks=R // group, tokens_per_rank=m.tokens_per_rank * group)
    return RoutingTrace(counts, meta, topk)


def _split(trace: RoutingTrace, parts: int, rng: np.random.Generator) -> RoutingTrace:
    """Share each rank's tokens out over ``parts`` new ranks (exact with ids, dealt without)."""
    m = trace.meta
    n = m.tokens_per_rank
    if n < parts:
        raise TraceError(f"cannot split {n} tokens per rank into {parts} ranks each; "
                         "regroup to fewer ranks")
    fixed = not m.variable_k and n % parts == 0
    size = -(-n // parts)
    meta = m.replace(num_ranks=m.num_ranks * parts, tokens_per_rank=size, variable_k=not fixed)
    if trace.topk_TLRNK is not None:
        counts, topk = _split_tokens(trace.topk_TLRNK, parts, size, m.num_experts)
        return RoutingTrace(counts, meta, topk)
    return RoutingTrace(_deal_counts(trace.counts_TLRE, parts, m.top_k, rng), meta)


def _split_tokens(topk_TLRnK: np.ndarray, parts: int, size: int, E: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of ``size`` tokens per part (the last ones ``-1``-padded)."""
    T, L, R, n, K = topk_TLRnK.shape
    padded = np.full((T, L, R, parts * size, K), -1, dtype=np.int32)
    padded[:, :, :, :n] = topk_TLRnK
    topk = padded.reshape(T, L, R * parts, size, K)
    rows = T * L * R * parts
    ids = topk.reshape(rows, -1).astype(np.int64)
    flat = (ids + (np.arange(rows, dtype=np.int64) * E)[:, None])[ids >= 0]
    counts = np.bincount(flat, minlength=rows * E).reshape(T, L, R * parts, E)
    return counts, topk


def _deal_counts(counts_TLRE: np.ndarray, parts: int, top_k: int, rng: np.random.Generator
                 ) -> np.ndarray:
    T, L, R, E = counts_TLRE.shape
    out = np.zeros((T, L, R, parts, E), dtype=np.int64)
    for t, layer, r in np.ndindex(T, L, R):
        out[t, layer, r], _ = _deal(np.asarray(counts_TLRE[t, layer, r], dtype=np.int64),
                                    top_k, parts, rng)
    return out.reshape(T, L, R * parts, E)
