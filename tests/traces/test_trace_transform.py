"""spread_over_ranks: exact totals on both margins, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import TraceError
from moesim.traces import RoutingTrace, TraceMeta, spread_over_ranks


def aggregated(totals_TLE, top_k=2, variable=False):
    totals = np.asarray(totals_TLE, dtype=np.int64)[:, :, None, :]
    tokens = int(-(-totals.sum(-1).max() // top_k))
    meta = TraceMeta(num_layers=totals.shape[1], num_ranks=1, num_experts=totals.shape[3],
                     top_k=top_k, tokens_per_rank=tokens, variable_k=variable,
                     rank_resolved=False)
    return RoutingTrace(totals, meta)


def test_totals_exact_and_fixed_k_kept():
    rng = np.random.default_rng(0)
    totals = np.stack([rng.multinomial(64, np.ones(8) / 8, size=3) for _ in range(5)])
    trace = aggregated(totals, top_k=2)
    spread = spread_over_ranks(trace, 4, rng=1)
    assert spread.meta.rank_resolved and spread.meta.num_ranks == 4
    np.testing.assert_array_equal(spread.counts_TLRE.sum(axis=2), totals)
    assert (spread.counts_TLRE.sum(-1) == 16).all() and not spread.meta.variable_k
    assert spread.meta.tokens_per_rank == 8
    again = spread_over_ranks(trace, 4, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(spread.counts_TLRE, again.counts_TLRE)


def test_uneven_totals_become_variable_k():
    trace = aggregated([[[5, 0, 2, 0], [1, 1, 1, 4]]], top_k=1, variable=True)
    spread = spread_over_ranks(trace, 3, rng=0)
    np.testing.assert_array_equal(spread.counts_TLRE.sum(axis=2), trace.counts_TLRE[:, :, 0])
    assert spread.meta.variable_k and spread.meta.tokens_per_rank == 3
    assert (spread.counts_TLRE <= 3).all()


def test_each_rank_gets_about_a_fair_share():
    trace = aggregated(np.full((1, 200, 4), 1000), top_k=1)
    spread = spread_over_ranks(trace, 4, rng=3)
    share = spread.counts_TLRE[0, :, 0, 0] / 1000
    assert abs(share.mean() - 0.25) < 0.01 and share.std() > 0


def test_errors(tiny):
    with pytest.raises(TraceError, match="already per-rank"):
        spread_over_ranks(tiny, 2)
    with pytest.raises(TraceError, match="num_ranks = 0 must be >= 1"):
        spread_over_ranks(aggregated([[[1, 1]]]), 0)


def test_no_rank_gets_an_expert_twice_per_token():
    trace = aggregated([[[4, 2, 2, 0]]], top_k=2)  # expert 0 is in every one of the 4 tokens
    for seed in range(10):
        spread = spread_over_ranks(trace, 2, rng=seed)
        np.testing.assert_array_equal(spread.counts_TLRE[0, 0, :, 0], [2, 2])


def test_large_window_sums_use_the_hypergeometric_path():
    totals = np.array([[[2_000_000, 1_000_000, 600_001, 400_000]]])  # expert 0: ~every token
    trace = aggregated(totals, top_k=2, variable=True)
    spread = spread_over_ranks(trace, 8, rng=0)
    np.testing.assert_array_equal(spread.counts_TLRE.sum(axis=2), totals)
    assert (spread.counts_TLRE.sum(-1) <= 2 * spread.meta.tokens_per_rank).all()


def test_repair_caps_keeps_margins():
    from moesim.traces.transform import _repair_caps
    counts = np.array([[3, 0, 1], [1, 2, 1]])  # rank 0 has 2 tokens but 3 of expert 0
    fixed = _repair_caps(counts.copy(), np.array([2, 2]))
    np.testing.assert_array_equal(fixed.sum(0), counts.sum(0))
    np.testing.assert_array_equal(fixed.sum(1), counts.sum(1))
    assert (fixed <= 2).all()
