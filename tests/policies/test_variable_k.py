"""Every registered policy and the cost model on a variable top-k trace (tokens picking
experts until a cumulative probability threshold): it simulates, conserves tokens, and the
all-to-all and expert work follow the assignments actually made, not ``tokens · top_k``."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.metrics import PHASE_INDEX
from moesim.policies import available_policies
from moesim.traces.routing_limits import RoutingOptions
from moesim.traces.workloads import WorkloadConfig, synthesize_workload

from .policytoys import solver_missing
from .test_invariants import make_cluster, make_model

SHAPE = dict(num_layers=2, num_ranks=4, num_experts=8, top_k=2, tokens_per_rank=64,
             micro_batches_per_iteration=2, num_iterations=3)


@pytest.fixture(scope="module")
def traces():
    fixed = synthesize_workload(WorkloadConfig(workload="hot_expert_set", **SHAPE), seed=4)
    variable = synthesize_workload(WorkloadConfig(workload="hot_expert_set",
                                                  routing=RoutingOptions(top_p=0.5), **SHAPE),
                                   seed=4)
    return fixed, variable


def test_the_variable_trace_has_fewer_assignments(traces):
    fixed, variable = traces
    k_tok = (variable.topk_TLRNK >= 0).sum(axis=-1)
    assert variable.meta.variable_k and k_tok.min() == 1 and k_tok.max() == 2
    assert variable.counts_TLRE.sum() == k_tok.sum() < fixed.counts_TLRE.sum()


@pytest.mark.parametrize("name", available_policies())
def test_policy_runs_variable_k(traces, name):
    from moesim.simulate import simulate

    reason = solver_missing(name)
    if reason:
        pytest.skip(f"{name}: {reason}")
    fixed, variable = traces
    model, cluster = make_model(), make_cluster(1, 4)
    out = {}
    for label, trace in (("fixed", fixed), ("variable", variable)):
        summ = simulate(trace, model, cluster, name, progress=False, allow_oom=True)
        rows = summ.rows
        assert len(rows) == 3
        for i, row in enumerate(rows):
            assert np.isfinite(row["step_time_s"]) and row["step_time_s"] > 0
            assert row["tokens_total"] == trace.iteration_counts(i).sum()
        out[label] = summ
    # the cost model sees the assignments made: fewer of them, less all-to-all and expert work
    assert out["variable"].column("tokens_total").sum() < out["fixed"].column("tokens_total").sum()


def test_static_ep_dispatch_bytes_follow_the_assignments(traces, tmp_path):
    from moesim.results import load_run
    from moesim.simulate import simulate

    model, cluster = make_model(), make_cluster(1, 4)
    per_assignment = []
    for i, trace in enumerate(traces):
        simulate(trace, model, cluster, "static_ep", out_dir=tmp_path / str(i), progress=False)
        T = load_run(tmp_path / str(i))["traffic_bytes"][:, PHASE_INDEX["dispatch"]]
        c = trace.counts_TLRE.reshape(3, 2, 2, 4, 4, 2).sum(axis=(1, 5))  # [I, L, R, G]
        off = c.sum(axis=1) * (1 - np.eye(4))  # static EP: expert e on rank e // 2
        per_assignment.append(T.sum() / off.sum())
    assert per_assignment[0] == pytest.approx(per_assignment[1])
