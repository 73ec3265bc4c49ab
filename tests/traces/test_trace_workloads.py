"""The eight workloads, routing constraints and variable top-k of trace synthesis."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import TraceError
from moesim.traces.routing_limits import (
    RoutingOptions,
    choose_experts,
    count_violations,
    groups_reached,
)
from moesim.traces.workloads import WORKLOADS, WorkloadConfig, synthesize_workload

SMALL = dict(num_layers=2, num_experts=16, top_k=2, micro_batches_per_iteration=2,
             num_iterations=4)


def _cfg(workload: str, ranks: int = 4, tokens: int = 64, **kw) -> WorkloadConfig:
    return WorkloadConfig(workload=workload, num_ranks=ranks, tokens_per_rank=tokens,
                          **{**SMALL, **kw})


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_token_has_exactly_top_k_distinct_experts(workload):
    trace = synthesize_workload(_cfg(workload), seed=3)  # validate() ran inside
    topk = trace.topk_TLRNK
    assert topk is not None
    ids = topk.reshape(-1, 2)
    real = (ids >= 0).any(axis=1)
    assert real.sum() == trace.num_passes * 2 * 4 * 64  # every token of the stream
    assert (ids[real] >= 0).all() and (ids[real, 0] != ids[real, 1]).all()
    assert trace.counts_TLRE.sum() == 2 * real.sum()


@pytest.mark.parametrize("workload", WORKLOADS)
def test_same_logical_workload_at_every_layout(workload):
    """4 ranks x 64 tokens and 8 x 32 (and 2 x 128) are one stream of 256 tokens a pass."""
    base = synthesize_workload(_cfg(workload, 4, 64), seed=5)
    for ranks, tokens in ((8, 32), (2, 128)):
        other = synthesize_workload(_cfg(workload, ranks, tokens), seed=5)
        np.testing.assert_array_equal(other.counts_TLRE.sum(axis=2),
                                      base.counts_TLRE.sum(axis=2))
        a, b = base.topk_TLRNK, other.topk_TLRNK
        if workload != "source_ragged":
            T, L = a.shape[:2]
            np.testing.assert_array_equal(a.reshape(T, L, -1, 2), b.reshape(T, L, -1, 2))


def test_seed_and_step_change_the_workload():
    a = synthesize_workload(_cfg("hot_expert_set"), seed=0).counts_TLRE
    b = synthesize_workload(_cfg("hot_expert_set"), seed=1).counts_TLRE
    assert not np.array_equal(a, b)


def _load_TE(workload: str, **kw) -> np.ndarray:
    return synthesize_workload(_cfg(workload, **kw), seed=2).counts_TLRE.sum(axis=2)[:, 0]


def test_workload_shapes_hand_checked():
    E, h = 16, 2  # hot_fraction 1/8 of 16
    bal = _load_TE("balanced")
    assert (bal == bal[0, 0]).all()  # 256 tokens x 2 / 16 experts = 32 each, exactly
    hot = _load_TE("hot_rank")
    assert hot[:, :h].sum() > 0.3 * hot.sum()  # ids 0..1 hold about half of the mass
    spread = _load_TE("spread_hot_experts")
    assert spread[:, [0, 8]].sum() > 0.3 * spread.sum()
    zero = _load_TE("zero_expert_rank")
    assert (zero[:, E - 4:] == 0).all() and (zero[:, :E - 4] > 0).all()
    rot = _load_TE("rotating_hotspot")
    its = rot.reshape(4, 2, E).sum(axis=1)  # per step: hot block at (step*h) mod E
    assert [int(np.argmax(its[s].reshape(-1, h).sum(1))) for s in range(4)] == [0, 1, 2, 3]
    burst = _load_TE("burst")
    steps = burst.reshape(4, 2, E).sum(axis=1)
    assert steps[3].max() > 3 * steps[:3].max(axis=1).mean()  # step 3 = burst_period - 1


def test_source_ragged_sends_uneven_amounts():
    trace = synthesize_workload(_cfg("source_ragged", 8, 64), seed=0)
    sent_R = trace.counts_TLRE[0, 0].sum(axis=1) // 2
    assert sent_R.sum() == 8 * 64 and sent_R[-1] > 2 * sent_R[0]
    assert trace.meta.variable_k and trace.meta.tokens_per_rank == sent_R.max()


def test_choose_experts_group_limited_hand_worked():
    # 4 experts in 2 groups; token scores favour experts 0 and 3 (different groups)
    s = np.log(np.array([[0.5, 0.01, 0.05, 0.44]]))
    plain = choose_experts(s, 2, RoutingOptions())
    assert plain.tolist() == [[0, 3]]
    limited = choose_experts(s, 2, RoutingOptions(expert_groups=2, topk_groups=1))
    # group {0,1} scores 0.51, group {2,3} 0.49: both experts from group 0
    assert limited.tolist() == [[0, 1]]
    node = choose_experts(s, 2, RoutingOptions(node_limit=1, route_nodes=2))
    assert node.tolist() == [[0, 1]]


def test_variable_top_k_hand_worked():
    s = np.log(np.array([[0.6, 0.3, 0.05, 0.05], [0.3, 0.3, 0.2, 0.2]]))
    out = choose_experts(s, 3, RoutingOptions(top_p=0.8))
    # token 0: 0.6 < 0.8, 0.9 >= 0.8 -> 2 experts; token 1: 0.3, 0.6, 0.8 -> 3
    assert out.tolist() == [[0, 1, -1], [0, 1, 2]] or out.tolist() == [[0, 1, -1], [1, 0, 2]]
    assert (choose_experts(s, 3, RoutingOptions(top_p=0.5, min_k=2)) >= 0).sum(1).tolist() \
        == [2, 2]


def test_synthesized_limits_hold_and_violations_are_counted():
    opts = RoutingOptions(node_limit=1, route_nodes=4)
    trace = synthesize_workload(_cfg("hot_expert_set", routing=opts), seed=1)
    assert count_violations(trace, 4, 1) == (0, trace.num_passes * 2 * 256)
    free = synthesize_workload(_cfg("hot_expert_set"), seed=1)
    bad, total = count_violations(free, 4, 1)
    assert 0 < bad < total
    ids = free.topk_TLRNK.reshape(-1, 2)
    assert bad == int((ids[:, 0] // 4 != ids[:, 1] // 4).sum())
    assert groups_reached(np.array([[0, 5, -1], [1, 2, 3]]), 8, 2).tolist() == [2, 1]


def test_counts_only_trace_check_is_one_line_error():
    trace = synthesize_workload(_cfg("balanced", store_topk=False), seed=0)
    assert trace.topk_TLRNK is None
    with pytest.raises(TraceError, match="per-token choices") as err:
        count_violations(trace, 4, 1)
    assert "\n" not in str(err.value)


def test_variable_k_trace_is_valid_and_lighter():
    trace = synthesize_workload(_cfg("hot_expert_set", top_k=4,
                                     routing=RoutingOptions(top_p=0.5)), seed=0)
    k_tok = (trace.topk_TLRNK >= 0).sum(axis=-1)
    assert trace.meta.variable_k and k_tok.min() >= 1 and k_tok.max() <= 4
    assert 1 < k_tok.mean() < 4
    assert trace.counts_TLRE.sum() == k_tok.sum()


@pytest.mark.parametrize("bad, match", [
    (dict(workload="nope"), "unknown"), (dict(hot_share=1.0), "hot_share"),
    (dict(routing=RoutingOptions(expert_groups=3, topk_groups=1)), "divide"),
    (dict(routing=RoutingOptions(expert_groups=8, topk_groups=1), top_k=3), "fewer than"),
])
def test_bad_configs_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**{"workload": "balanced", **bad})


def test_synth_cli_workload(tmp_path, capsys):
    from moesim.cli import main
    from moesim.traces.io import load_trace

    out = tmp_path / "w.npz"
    assert main(["trace", "synth", "--workload", "rotating_hotspot", "-o", str(out),
                 "--ranks", "4", "--experts", "16", "--layers", "2", "--iterations", "2",
                 "--tokens-per-rank", "32", "--node-limit", "2", "--route-nodes", "4",
                 "--top-p", "0.7", "--top-k", "4"]) == 0
    trace = load_trace(out)
    assert trace.meta.extra["workload"]["workload"] == "rotating_hotspot"
    assert count_violations(trace, 4, 2)[0] == 0
    assert main(["trace", "info", str(out), "--expert-groups", "4", "--topk-groups", "1"]) == 0
    assert "reach more than 1 of 4 expert groups" in capsys.readouterr().out
    assert main(["trace", "synth", "-o", str(out), "--top-p", "0.5"]) == 2
    assert "needs --workload" in capsys.readouterr().err
    assert main(["trace", "synth", "--workload", "burst", "-o", str(out), "--skew", "2"]) == 2
    assert "does not apply to --workload" in capsys.readouterr().err
