"""Tests of laer_fsep and oracle_ilp against naive references (tiny shapes, < 60 s); hecate's
own tests are in ``test_hecate.py``.

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks, ``E`` experts, ``G`` GPUs,
``N`` nodes, ``K`` candidates.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.placement import Decision
from moesim.policies import make_policy
from moesim.policies.greedy import greedy_place, precise_replicas
from moesim.policies.oracle_ilp import gap_to_oracle, max_load_lower_bound
from moesim.routing import split_tokens
from moesim.specs import Cluster, ModelSpec
from tests.policies.policytoys import (
    check_placement,
    history_of,
    lower_run,
    skewed_counts_TLRE,
    tiny_cluster,
    tiny_model,
)

# --------------------------------------------------------------------------------------------
# fixtures












# --------------------------------------------------------------------------------------------
# LAER-MoE


def _naive_fsep_cost(copies_GE: np.ndarray, counts_RE: np.ndarray, model: ModelSpec,
                     cluster: Cluster, recompute: bool) -> float:
    """LAER's cost by explicit loops: fractional node_first routing, comm summed, comp maxed."""
    G, E = copies_GE.shape
    node = np.arange(G) // cluster.gpus_per_node
    tokens_GG = np.zeros((G, G))                           # source → destination GPU
    for i in range(G):
        for e in range(E):
            local = [g for g in range(G) if node[g] == node[i] and copies_GE[g, e] > 0]
            dests = local or [g for g in range(G) if copies_GE[g, e] > 0]
            weight = sum(copies_GE[g, e] for g in dests)
            for g in dests:
                tokens_GG[i, g] += counts_RE[i, e] * copies_GE[g, e] / weight
    b = model.token_bytes
    comm = np.zeros(G)
    for i in range(G):
        for j in range(G):
            if i == j:
                continue
            bw = (cluster.intra if node[i] == node[j] else cluster.inter).bw_GBps * 1e9
            comm[i] += tokens_GG[i, j] * b / bw               # i sends
            comm[j] += tokens_GG[i, j] * b / bw               # j receives
    comp = tokens_GG.sum(0) * model.expert_flops_per_token / cluster.hardware.peak_flops
    return 4.0 * comm.sum() + (4.0 if recompute else 3.0) * comp.max()


@pytest.mark.parametrize("recompute", [False, True])
def test_laer_keeps_the_cheapest_candidate(recompute: bool) -> None:
    model, cluster = tiny_model(E=8, L=2), tiny_cluster(2, 4)
    counts = skewed_counts_TLRE(model, cluster.world_size, 6, seed=1)
    policy = make_policy("laer_fsep", {"num_random_candidates": 4, "recompute": recompute,
                                       "lag_iterations": 0, "window": 3,
                                       "keep_candidates": True})
    d = policy.decide(history_of(counts), model, cluster, np.random.default_rng(0))
    check_placement(d, cluster.world_size, model.num_experts, model.num_layers)
    assert d.routing == "node_first" and d.slot_capacity is None
    window = counts[-3:].sum(0) / 3.0                              # per-pass counts [L, R, E]
    for l in range(model.num_layers):
        copies_KGE = d.info["candidate_copies_L"][l]
        costs = [_naive_fsep_cost(c, window[l], model, cluster, recompute) for c in copies_KGE]
        np.testing.assert_allclose(costs, d.info["candidate_costs_L"][l], rtol=1e-9)
        chosen = d.info["chosen_L"][l]
        assert costs[chosen] == pytest.approx(min(costs), rel=1e-12)
        kept = np.bincount(d.placement.layer(l), minlength=model.num_experts)
        assert (kept == copies_KGE[chosen].sum(0)).all()
        assert (copies_KGE.sum(1) == np.array(d.info["candidate_replicas_L"][l])).all()


def test_laer_precise_split_multiples_of_nodes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        N, gpn, C, E = 4, int(rng.integers(1, 5)), int(rng.integers(2, 5)), 6
        G = N * gpn
        if N * E > G * C:
            continue
        r = precise_replicas(rng.pareto(1.0, E) * 100, G * C, N, G)
        assert (r >= N).all() and (r % N == 0).all() and (r <= G).all()
        assert r.sum() <= G * C
    # fewer slots than N·E: one replica each to start, steps of 1, all slots used
    load = np.array([50.0, 30.0, 10.0, 5.0, 5.0])
    r = precise_replicas(load, 8, 4, 8)
    assert (r >= 1).all() and r.sum() == 8 and r[0] == r.max()


def test_laer_precise_is_a_load_per_replica_heap() -> None:
    load = np.array([900.0, 300.0, 100.0, 100.0])
    r = precise_replicas(load, 16, 2, 8)                      # N·E = 8 ≤ 16: start at 2, step 2
    assert r.tolist() == [8, 4, 2, 2]


def test_laer_plan_is_applied_one_iteration_later() -> None:
    model, cluster = tiny_model(E=8, L=2), tiny_cluster(2, 2)
    G = cluster.world_size
    counts = skewed_counts_TLRE(model, G, 12, seed=5).reshape(6, 2, model.num_layers, G, 8)
    counts = counts.reshape(12, model.num_layers, G, 8)              # 6 iterations × 2 passes
    changed = counts.copy()
    changed[-2:] = changed[-2:, :, :, ::-1]                          # iteration t−1 reversed
    policy = make_policy("laer_fsep")
    a = policy.decide(history_of(counts, 2), model, cluster, np.random.default_rng(7))
    b = policy.decide(history_of(changed, 2), model, cluster, np.random.default_rng(7))
    assert (a.placement.phy2log_LP == b.placement.phy2log_LP).all()
    assert a.info["planned_through_iteration"] == 4                  # t = 6 uses ≤ t − 2
    older = counts.copy()
    older[-4:-2] = older[-4:-2, :, :, ::-1]                          # iteration t−2 reversed
    c = policy.decide(history_of(older, 2), model, cluster, np.random.default_rng(7))
    assert a.info["candidate_costs_L"] != c.info["candidate_costs_L"]


def test_laer_empty_history_is_an_even_split() -> None:
    model, cluster = tiny_model(E=8, L=1), tiny_cluster(2, 2)
    d = make_policy("laer_fsep").decide(history_of(np.zeros((0, 1, 4, 8), np.int64)), model,
                                        cluster, np.random.default_rng(0))
    check_placement(d, 4, 8, 1)
    assert (d.placement.logcnt_LE == 1).all()


def _naive_greedy(replicas_E, load_E, gpn, free_G, copies_GE, gload_G, allow_dup):
    """One replica at a time, exactly as the paper words it."""
    copies, free, gload = copies_GE.copy(), free_G.copy(), gload_G.astype(float).copy()
    G, E = copies.shape
    node = np.arange(G) // gpn
    per_copy = load_E / np.maximum(copies.sum(0) + replicas_E, 1)
    for e in np.argsort(-per_copy, kind="stable"):
        for _ in range(replicas_E[e]):
            ok = (free > 0) & ((copies[:, e] == 0) | allow_dup)
            if not ok.any():                              # nowhere left: skipped
                break
            node_copies = np.bincount(node, weights=copies[:, e], minlength=G // gpn)
            level = node_copies[node[ok]].min()
            ok &= node_copies[node] == level
            key = [(copies[g, e] > 0, gload[g], g) for g in np.flatnonzero(ok)]
            g = min(key)[2]
            copies[g, e] += 1
            free[g] -= 1
            gload[g] += per_copy[e]
    return copies


@pytest.mark.parametrize("seed", range(6))
def test_greedy_rounds_equal_one_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    N, gpn, E, S = 3, 3, 7, 3
    G = N * gpn
    load = rng.pareto(1.0, E) * 100
    if seed % 2:                                       # Hecate-style: owners pre-placed
        owners = rng.permutation(G)[:E] % G
        init = np.zeros((G, E), np.int64)
        init[owners, np.arange(E)] = 1
        reps = precise_replicas(load, E + G * 2, 1, G) - 1
        free, gl, dup = np.full(G, 2), init @ (load / (reps + 1)), False
    else:
        init, reps = np.zeros((G, E), np.int64), precise_replicas(load, G * S, N, G)
        free, gl, dup = np.full(G, S), np.zeros(G), True
    fast = greedy_place(reps, load, gpn, free, init, gl, allow_duplicates=dup,
                        skip_unplaceable=not dup)
    slow = _naive_greedy(reps, load, gpn, free, init, gl, dup)
    assert (fast == slow).all()


# --------------------------------------------------------------------------------------------
# oracle_ilp


def _realised_max_load(d: Decision, counts_LRE: np.ndarray, gpn: int) -> np.ndarray:
    """Max tokens per GPU per layer when the decision's own routing rule splits the tokens."""
    pl = d.placement
    out = []
    for l in range(pl.num_layers):
        tok = split_tokens(counts_LRE[l], pl.layer(l), pl.num_ranks, pl.slots_per_rank,
                           d.routing, gpn)
        out.append(tok.sum(0).reshape(pl.num_ranks, -1).sum(1).max())
    return np.array(out, dtype=float)


@pytest.mark.parametrize("seed", range(3))
def test_oracle_max_load_is_below_every_heuristic(seed: int) -> None:
    model, cluster = tiny_model(E=6, L=1), tiny_cluster(2, 2)
    G, S = cluster.world_size, 3
    counts = skewed_counts_TLRE(model, G, 6, seed=20 + seed)
    past, current = counts[:5], counts[5:]
    oracle = make_policy("oracle_ilp", {"slots_per_rank": S, "mip_gap": 0.0,
                                        "time_limit_s": 20.0})
    do = oracle.decide(history_of(past, current=current), model, cluster,
                       np.random.default_rng(0))
    check_placement(do, G, 6, 1)
    assert do.info["status_L"] == ["optimal"]
    heuristics = {
        "laer_fsep": make_policy("laer_fsep", {"slots_per_rank": S, "lag_iterations": 0}),
        "hecate": make_policy("hecate", {"extra_slots_per_rank": S - 2, "overlap_degree": 4}),
        "hecate_top": make_policy("hecate", {"extra_slots_per_rank": S - 2,
                                             "overlap_degree": 1}),
    }
    heuristics.update(_other_heuristics(S))
    decisions = {}
    for name, p in heuristics.items():
        try:
            decisions[name] = p.decide(history_of(past), model, cluster, np.random.default_rng(1))
        except MoesimError:                       # e.g. static EP needs G | E
            continue
    assert {"laer_fsep", "hecate", "hecate_top"} <= set(decisions)
    counts_LRE = current.sum(0)
    for name, d in decisions.items():
        assert d.placement.slots_per_rank <= S, name
        if d.slot_capacity is None:               # dropless: every token lands somewhere
            heur = _realised_max_load(d, counts_LRE, cluster.gpus_per_node)
            assert (np.asarray(do.info["max_load_L"]) <= heur + 1e-6).all(), name
    gaps = gap_to_oracle(decisions, do, counts_LRE.sum(1))
    assert all((g >= -1e-9).all() for g in gaps.values()), gaps


def _other_heuristics(slots: int) -> dict:
    """Every other registered non-oracle policy that takes ``slots_per_rank``."""
    from moesim.policies import available_policies, policy_class

    out = {}
    for name in available_policies():
        if name in ("laer_fsep", "hecate") or policy_class(name).oracle:
            continue
        try:
            out[name] = make_policy(name, {"slots_per_rank": slots})
        except MoesimError:
            continue
    return out


def _brute_force_max_load(load_E: np.ndarray, G: int, S: int) -> float:
    """Min over every binary placement of the best fractional split's max load (G = 2)."""
    assert G == 2
    E, best = len(load_E), np.inf
    for bits in itertools.product([0, 1], repeat=E * G):
        x = np.array(bits).reshape(E, G)
        if (x.sum(0) > S).any() or (x.sum(1) < 1).any():
            continue
        only0 = load_E[(x[:, 0] == 1) & (x[:, 1] == 0)].sum()
        only1 = load_E[(x[:, 0] == 0) & (x[:, 1] == 1)].sum()
        both = load_E[(x[:, 0] == 1) & (x[:, 1] == 1)].sum()
        best = min(best, max(only0, only1, (only0 + only1 + both) / 2))
    return best


@pytest.mark.parametrize("load", [[700, 200, 60, 40], [100, 100, 100, 100], [990, 5, 3, 2],
                                  [400, 390, 10, 200]])
def test_oracle_equals_brute_force(load: list[int]) -> None:
    model, cluster = tiny_model(E=4, L=1), tiny_cluster(1, 2)
    counts = np.zeros((1, 1, 2, 4), dtype=np.int64)
    counts[0, 0, 0] = np.array(load) // 2
    counts[0, 0, 1] = np.array(load) - np.array(load) // 2
    d = make_policy("oracle_ilp", {"slots_per_rank": 3, "mip_gap": 0.0}).decide(
        history_of(np.zeros((0, 1, 2, 4), np.int64), current=counts), model, cluster,
        np.random.default_rng(0))
    best = _brute_force_max_load(np.array(load, float), 2, 3)
    assert d.info["max_load_L"][0] == pytest.approx(best, rel=1e-6)
    assert d.info["load_bound_L"][0] == pytest.approx(best, rel=1e-6)
    assert max_load_lower_bound(np.array(load, float), 2, 3) <= best + 1e-9


def test_oracle_layer_time_objective_runs() -> None:
    model, cluster = tiny_model(E=4, L=1), tiny_cluster(2, 2)
    counts = skewed_counts_TLRE(model, 4, 1, seed=30)
    d = make_policy("oracle_ilp", {"objective": "layer_time", "slots_per_rank": 2}).decide(
        history_of(np.zeros((0, 1, 4, 4), np.int64), current=counts), model, cluster,
        np.random.default_rng(0))
    check_placement(d, 4, 4, 1)
    assert d.info["status_L"][0] in ("optimal", "time_limit")
    assert 0 <= d.info["gap_L"][0] < 1


def test_oracle_needs_current_counts() -> None:
    model, cluster = tiny_model(E=4, L=1), tiny_cluster(1, 2)
    with pytest.raises(MoesimError, match="current"):
        make_policy("oracle_ilp").decide(history_of(np.zeros((1, 1, 2, 4), np.int64)), model,
                                         cluster, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# bad knobs


@pytest.mark.parametrize("name, knobs, field", [
    ("laer_fsep", {"slots_per_rank": 0}, "slots_per_rank"),
    ("laer_fsep", {"window": -1}, "window"),
    ("laer_fsep", {"capacity_factor": -2.0}, "capacity_factor"),
    ("laer_fsep", {"lag_iterations": 1.5}, "lag_iterations"),
    ("hecate", {"reshard_interval": 0}, "reshard_interval"),
    ("hecate", {"extra_slots_per_rank": -1}, "extra_slots_per_rank"),
    ("hecate", {"overlap_degree": -3}, "overlap_degree"),
    ("oracle_ilp", {"objective": "fastest"}, "objective"),
    ("oracle_ilp", {"solver": "gurobi"}, "solver"),
    ("oracle_ilp", {"time_limit_s": 0}, "time_limit_s"),
    ("oracle_ilp", {"mip_gap": 2.0}, "mip_gap"),
])
def test_bad_knobs_name_the_field(name: str, knobs: dict, field: str) -> None:
    with pytest.raises(MoesimError, match=field):
        make_policy(name, knobs)


def test_too_few_slots_is_a_clear_error() -> None:
    model, cluster = tiny_model(E=16, L=1), tiny_cluster(1, 2)
    with pytest.raises(MoesimError, match="slots_per_rank"):
        make_policy("laer_fsep", {"slots_per_rank": 2}).decide(
            history_of(np.zeros((0, 1, 2, 16), np.int64)), model, cluster,
            np.random.default_rng(0))


def test_highs_without_highspy_is_a_clear_error() -> None:
    try:
        import highspy  # noqa: F401
    except ImportError:
        with pytest.raises(MoesimError, match="highspy"):
            make_policy("oracle_ilp", {"solver": "highs"})
    else:
        assert make_policy("oracle_ilp", {"solver": "highs"}).config.solver == "highs"


# --------------------------------------------------------------------------------------------
# lowering




def test_laer_lowering_volumes() -> None:
    from moesim.ops import AllToAll

    model, cluster, ds, ctx, sched = lower_run("laer_fsep", {})
    G, C, P = cluster.world_size, 2, model.params_per_expert
    assert np.isfinite(sched.makespan_s) and sched.makespan_s > 0
    gathers = [op for op in ctx.program.ops if op.phase == "param_gather"]
    assert len(gathers) == 2 * model.micro_batches * model.num_layers      # fwd + bwd
    for op in gathers:
        assert isinstance(op, AllToAll) and op.stream == "prefetch"
        np.testing.assert_allclose(op.bytes_RR.sum(0), C * P * model.bytes_weight * (G - 1) / G)
    reduces = [op for op in ctx.program.ops if op.label == "fsep_grad_reduce"]
    assert len(reduces) == model.num_layers and all(op.reduce for op in reduces)
    for op in reduces:
        np.testing.assert_allclose(op.bytes_RR.sum(1), C * P * model.bytes_grad * (G - 1) / G)
    assert not [op for op in ctx.program.ops if op.phase == "relayout"]
    opt = ctx.program.memory_bytes["optimizer"]
    shard = model.num_layers * model.num_experts * P / G
    np.testing.assert_allclose(opt, (shard + model.num_layers * model.dense_params / G)
                               * model.bytes_optim)
