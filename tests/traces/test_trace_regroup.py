"""trace regroup: split or merge source ranks, totals exact, recorded in the metadata."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import TraceError
from moesim.traces import load_trace, save_trace
from moesim.traces.regroup import regroup_ranks
from moesim.traces.stats import trace_stats
from tests.traces.tracetoys import make_trace


def totals(trace):
    return np.asarray(trace.counts_TLRE).sum(axis=2)


@pytest.mark.parametrize("R, N", [(4, 2), (4, 1), (2, 4), (4, 16), (4, 6), (6, 4)])
@pytest.mark.parametrize("with_topk", [False, True])
def test_regroup_keeps_expert_totals_exact(R, N, with_topk):
    trace = make_trace(T=4, L=2, R=R, E=8, k=2, N=24, with_topk=with_topk)
    out = regroup_ranks(trace, N, seed=3)
    assert out.meta.num_ranks == N and out.counts_TLRE.shape[2] == N
    np.testing.assert_array_equal(totals(out), totals(trace))
    # every new rank sends a share of the tokens: fixed-k where the sizes divide
    assert out.meta.variable_k == ((24 * R) % N != 0)
    assert out.meta.extra["regroup"][-1]["from_ranks"] == R
    assert out.meta.extra["regroup"][-1]["to_ranks"] == N
    assert out.meta.extra["note"] == [1, 2]          # the rest of extra survives
    assert (out.topk_TLRNK is not None) == with_topk


def test_merge_is_the_sum_of_consecutive_ranks():
    trace = make_trace(R=4, N=6, with_topk=True)
    out = regroup_ranks(trace, 2)
    c = trace.counts_TLRE
    np.testing.assert_array_equal(out.counts_TLRE[:, :, 1], c[:, :, 2] + c[:, :, 3])
    assert out.meta.tokens_per_rank == 12
    np.testing.assert_array_equal(out.topk_TLRNK[:, :, 1, 6:], trace.topk_TLRNK[:, :, 3])
    assert out.meta.extra["regroup"][-1]["method"] == "merge"


def test_split_with_ids_cuts_tokens_in_order():
    trace = make_trace(R=2, N=6, with_topk=True)
    out = regroup_ranks(trace, 6)
    np.testing.assert_array_equal(out.topk_TLRNK[:, :, 4], trace.topk_TLRNK[:, :, 1, 2:4])
    assert out.meta.tokens_per_rank == 2


def test_split_of_counts_keeps_each_source_ranks_share_and_per_rank_skew():
    """Parts of one source rank add back to it; a skewed rank stays skewed in its parts."""
    T, L, R, E, N, k = 3, 1, 2, 8, 400, 2
    rng = np.random.default_rng(0)
    trace = make_trace(T=T, L=L, R=R, E=E, k=k, N=N)
    counts = np.zeros((T, L, R, E), np.int64)
    for t in range(T):    # rank 0 prefers experts 0-1, rank 1 experts 6-7
        for r, hot in ((0, [0, 1]), (1, [6, 7])):
            p = np.full(E, 1.0)
            p[hot] = 20
            ids = np.array([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(N)])
            counts[t, 0, r] = np.bincount(ids.ravel(), minlength=E)
    trace = type(trace)(counts, trace.meta.replace(num_layers=L, num_ranks=R, num_experts=E,
                                                   tokens_per_rank=N, top_k=k,
                                                   micro_batches_per_iteration=1))
    out = regroup_ranks(trace, 8, seed=1)
    parts = out.counts_TLRE.reshape(T, L, R, 4, E)
    np.testing.assert_array_equal(parts.sum(axis=3), counts)
    assert (parts.sum(-1) == N // 4 * k).all() and (parts <= N // 4).all()
    assert (parts[:, 0, 0, :, :2].sum(-1) > parts[:, 0, 0, :, 6:].sum(-1)).all()
    assert (parts[:, 0, 1, :, 6:].sum(-1) > parts[:, 0, 1, :, :2].sum(-1)).all()
    assert regroup_ranks(trace, 8, seed=1).counts_TLRE.tolist() == out.counts_TLRE.tolist()


def test_regroup_rank_aggregated_spreads_and_bad_sizes():
    trace = make_trace(R=1)
    agg = type(trace)(trace.counts_TLRE, trace.meta.replace(rank_resolved=False))
    out = regroup_ranks(agg, 3)
    assert out.meta.rank_resolved and out.meta.num_ranks == 3
    assert out.meta.extra["regroup"][-1]["method"].startswith("spread")
    with pytest.raises(TraceError, match="cannot split 6 tokens"):
        regroup_ranks(make_trace(R=1, N=6), 7)
    with pytest.raises(TraceError, match="must be a whole number"):
        regroup_ranks(make_trace(), 0)


def test_regroup_bundled_to_four_ranks_keeps_statistics(tmp_path):
    from moesim.traces import bundled_trace_path

    trace = load_trace(bundled_trace_path()).select_iterations(0, 3)
    out = regroup_ranks(trace, 4)
    np.testing.assert_array_equal(totals(out), totals(trace))
    before, after = trace_stats(trace, 4), trace_stats(out, 4)
    assert after.to_dict()["overall"]["max_mean"] == pytest.approx(
        before.to_dict()["overall"]["max_mean"])


def test_regroup_cli(tmp_path, capsys):
    src = tmp_path / "t.npz"
    save_trace(make_trace(R=4, N=6), src)
    out = tmp_path / "r.npz"
    assert main(["trace", "regroup", str(src), "--ranks", "8", "-o", str(out)]) == 0
    assert "8 ranks" in capsys.readouterr().out
    assert load_trace(out).meta.extra["regroup"][0]["to_ranks"] == 8
    assert main(["trace", "regroup", str(src), "--ranks", "0", "-o", str(out)]) == 2
