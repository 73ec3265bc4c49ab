"""Reshaping traces: splitting rank-aggregated counts over ranks.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts.
"""

from __future__ import annotations

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace
from moesim.traces.validate import validate

TOKEN_TABLE_LIMIT = 1 << 20  # assignments per pass-layer dealt token by token


def spread_over_ranks(trace: RoutingTrace, num_ranks: int,
                      rng: np.random.Generator | int | None = None) -> RoutingTrace:
    """Split a rank-aggregated trace (``rank_resolved=False``, ``R = 1``) over ``num_ranks``.

    Per pass and layer, the ``n = ceil(sum / top_k)`` tokens are rebuilt as an ``[n, top_k]``
    table of distinct experts (expert ids laid out column by column, so an expert with at most
    ``n`` assignments never lands twice in one token), the tokens are shuffled, and rank ``r``
    takes the next ``n // R`` (+1 for the first ``n mod R`` ranks). Each rank's share of an
    expert is therefore hypergeometric — the assignments are dealt *without replacement* — and,
    unlike an independent multinomial per expert, both margins stay exact: every expert's total
    equals the input, every rank sends exactly its tokens, and no rank sends an expert more
    assignments than it has tokens. A fixed-k trace stays fixed-k when ``R`` divides the tokens.
    Deterministic given ``rng`` (a Generator or an int seed).

    Passes with more than :data:`TOKEN_TABLE_LIMIT` assignments (window-summed EPLB weights)
    are dealt rank by rank with multivariate hypergeometric draws instead — the same
    distribution of each rank's counts without materialising the tokens — and the rare cell
    where a rank would get an expert more often than it has tokens is repaired by swaps that
    keep both margins.
    """
    if num_ranks < 1:
        raise TraceError(f"num_ranks = {num_ranks} must be >= 1")
    if trace.meta.rank_resolved:
        raise TraceError("trace is already per-rank (rank_resolved=true); spread_over_ranks "
                         "only splits rank-aggregated traces (SGLang stat, EPLB weights)")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    m = trace.meta
    totals_TLE = np.asarray(trace.counts_TLRE[:, :, 0, :], dtype=np.int64)
    T, L, E = totals_TLE.shape
    counts = np.zeros((T, L, num_ranks, E), dtype=np.int64)
    tokens_max = 0
    for t in range(T):
        for layer in range(L):
            counts[t, layer], n = _deal(totals_TLE[t, layer], m.top_k, num_ranks, rng)
            tokens_max = max(tokens_max, n)
    sums_TL = totals_TLE.sum(axis=-1)
    fixed = (not m.variable_k and (sums_TL == sums_TL.flat[0]).all()
             and sums_TL.flat[0] % (num_ranks * m.top_k) == 0)
    meta = m.replace(num_ranks=num_ranks, rank_resolved=True, variable_k=not fixed,
                     tokens_per_rank=max(1, -(-tokens_max // num_ranks)),
                     extra={**m.extra, "spread_over_ranks": num_ranks})
    return validate(RoutingTrace(counts, meta))


def _deal(totals_E: np.ndarray, top_k: int, num_ranks: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, int]:
    """One pass-layer's totals ``[E]`` → per-rank counts ``[R, E]`` and the token count ``n``."""
    if totals_E.sum() <= TOKEN_TABLE_LIMIT:
        return _deal_tokens(totals_E, top_k, num_ranks, rng)
    return _deal_hypergeometric(totals_E, top_k, num_ranks, rng)


def _quotas(n: int, num_ranks: int) -> np.ndarray:
    """Tokens per rank ``[R]``: ``n // R`` each, one more for the first ``n mod R`` ranks."""
    return n // num_ranks + (np.arange(num_ranks) < n % num_ranks)


def _deal_hypergeometric(totals_E: np.ndarray, top_k: int, num_ranks: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, int]:
    total = int(totals_E.sum())
    n = -(-total // top_k)
    budget_R = np.minimum(_quotas(n, num_ranks) * top_k, total)
    budget_R[-1] = total - budget_R[:-1].sum()  # the padding of a variable-k pass goes last
    left = totals_E.astype(np.int64)
    counts = np.zeros((num_ranks, totals_E.shape[0]), dtype=np.int64)
    for r in range(num_ranks - 1):
        counts[r] = rng.multivariate_hypergeometric(left, int(budget_R[r]), method="marginals")
        left -= counts[r]
    counts[-1] = left
    return _repair_caps(counts, _quotas(n, num_ranks)), n


def _repair_caps(counts_RE: np.ndarray, tokens_R: np.ndarray) -> np.ndarray:
    """Move units so no rank sends an expert more than its tokens; margins stay exact."""
    for _ in range(int(np.maximum(counts_RE - tokens_R[:, None], 0).sum())):
        over = counts_RE > tokens_R[:, None]
        if not over.any():
            break
        r, e = np.argwhere(over)[0]
        room_R = (counts_RE[:, e] < tokens_R) & (np.arange(len(tokens_R)) != r)
        # an expert e2 that rank r can take more of and some other rank can give up
        swap = (counts_RE[r] < tokens_R[r])[None, :] & (counts_RE > 0) & room_R[:, None]
        swap[:, e] = False
        if not swap.any():
            break
        r2, e2 = np.argwhere(swap)[0]
        step = min(counts_RE[r, e] - tokens_R[r], tokens_R[r2] - counts_RE[r2, e],
                   tokens_R[r] - counts_RE[r, e2], counts_RE[r2, e2])
        counts_RE[r, e] -= step
        counts_RE[r2, e] += step
        counts_RE[r2, e2] -= step
        counts_RE[r, e2] += step
    return counts_RE


def _deal_tokens(totals_E: np.ndarray, top_k: int, num_ranks: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, int]:
    """One pass-layer's totals ``[E]`` → per-rank counts ``[R, E]`` and the token count ``n``."""
    E = totals_E.shape[0]
    n = int(-(-int(totals_E.sum()) // top_k))
    ids = np.full(n * top_k, -1, dtype=np.int64)
    ids[:totals_E.sum()] = np.repeat(np.arange(E), totals_E)
    table_NK = ids.reshape(top_k, n).T[rng.permutation(n)]
    per_rank = _quotas(n, num_ranks)
    owner_NK = np.broadcast_to(np.repeat(np.arange(num_ranks), per_rank)[:, None], table_NK.shape)
    used = table_NK >= 0
    flat = owner_NK[used] * E + table_NK[used]
    return np.bincount(flat, minlength=num_ranks * E).reshape(num_ranks, E), n
