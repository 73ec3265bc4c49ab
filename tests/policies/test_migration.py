"""Migration-aware re-planning (``migration_weight``, ``min_gain``), incremental EPLB, explicit
balancing, and the re-plan schedule (first re-plan as soon as there is history)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.placement import Decision, Placement
from moesim.policies import History, make_policy
from moesim.policies.eplb_balancer import rebalance_experts
from moesim.policies.incremental import imbalance_ratio, incremental_path
from moesim.policies.migration import (
    MigrationModel,
    align_slots,
    incoming_slots_G,
    replan_due,
)
from moesim.policies.primitives import gpu_load

from .policytoys import skewed_counts_TLRE, tiny_cluster, tiny_model


def _mm(**kw) -> MigrationModel:
    base = dict(token_time_s=1e-3, load_scale=1.0, slot_bytes=1e9, intra_Bps=100e9,
                inter_Bps=10e9, slots_per_rank=2, gpus_per_node=2, interval=10)
    base.update(kw)
    return MigrationModel(**base)


def test_objective_by_hand() -> None:
    """2 nodes × 2 GPUs × 2 slots. Moving expert 3 next to expert 0 on GPU 0."""
    mm = _mm(weight=2.0)
    old = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    new = np.array([0, 3, 2, 3, 0, 1, 2, 1])
    load = np.array([40.0, 20.0, 20.0, 40.0])
    # old loads: per copy [20, 10, 10, 20] -> GPUs [30, 30, 30, 30]
    assert mm.layer_time_s(old, load) == pytest.approx(30e-3)
    # new: expert 3 copies on GPU 0 and 1 (per copy 20), expert 1 on GPU 2 and 3 (10):
    # GPU0 = 20 + 20 = 40, GPU1 = 10 + 20 = 30, GPU2 = 20 + 10 = 30, GPU3 = 10 + 10 = 20
    assert mm.layer_time_s(new, load) == pytest.approx(40e-3)
    # slot 1 (GPU 0) gets expert 3 from GPU 1 (same node): intra; slot 7 (GPU 3) gets expert
    # 1, which GPU 2 (same node) held: intra. One slot each: 1e9 / 100e9 = 10 ms.
    intra, inter = incoming_slots_G(old, new, 2, 2)
    assert intra.tolist() == [1, 0, 0, 1] and inter.tolist() == [0, 0, 0, 0]
    assert mm.migration_time_s(new, old) == pytest.approx(0.01)
    assert mm.objective_s(new, old, load) == pytest.approx(40e-3 + 2.0 * 0.01 / 10)
    assert mm.best([old, new], old, load) == 0
    # a slot whose expert only lives on the other node crosses it: 1e9 / 10e9 = 100 ms
    split = np.array([0, 1, 0, 1, 2, 3, 2, 3])            # node 0 holds 0, 1; node 1 holds 2, 3
    assert mm.migration_time_s(np.array([2, 1, 0, 1, 2, 3, 2, 3]), split) == pytest.approx(0.1)
    # a rank that already holds the expert fills the slot itself
    assert mm.migration_time_s(np.array([0, 0, 2, 3, 0, 1, 2, 3]), old) == 0.0


def test_min_gain_pays_for_migration() -> None:
    old = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    hot = np.array([80.0, 10.0, 10.0, 0.0])      # per copy [40, 5, 5, 0]: GPUs [45, 5, 45, 5]
    better = np.array([0, 1, 0, 3, 0, 1, 0, 2])  # four copies of 0: GPUs [25, 20, 25, 30]
    saved = _mm().layer_time_s(old, hot) - _mm().layer_time_s(better, hot)
    mig = _mm().migration_time_s(better, old)
    # two slots take expert 0 from a same-node holder (10 ms); slot 7's expert 2 was on GPU 3
    assert saved == pytest.approx(15e-3) and mig == pytest.approx(0.01)
    ratio = saved * 10 / mig                        # what the interval's savings repay
    assert _mm(min_gain=ratio * 0.99).pays_off(better, old, hot)
    assert not _mm(min_gain=ratio * 1.01).pays_off(better, old, hot)
    assert _mm(min_gain=None).pays_off(old[::-1], old, hot)   # off: always
    assert not _mm(min_gain=0.0).pays_off(np.array([0, 0, 2, 3, 1, 1, 2, 3]), old,
                                          np.array([1.0, 100.0, 1.0, 1.0]))  # a loss


def test_replan_due_counts_from_the_first_replan() -> None:
    def h(it: int, passes: int = 1) -> History:
        return History(iteration=it, past_TLRE=np.zeros((passes, 1, 1, 2)),
                       passes_per_iteration=1)
    assert not replan_due(h(0, 0), None, 10)                  # no history yet
    assert replan_due(h(1), None, 10) and replan_due(h(1), {"last_replan": None}, 10)
    assert not replan_due(h(10), {"last_replan": 1}, 10)
    assert replan_due(h(11), {"last_replan": 1}, 10)


def _loop(name: str, knobs: dict, iterations: int = 12, seed: int = 7):
    model, cluster = tiny_model(E=8, L=2), tiny_cluster(2, 2)
    counts = skewed_counts_TLRE(model, cluster.world_size, iterations, seed=seed)
    policy = make_policy(name, knobs)
    prev, out = None, []
    for it in range(iterations):
        h = History(iteration=it, past_TLRE=counts[:it], passes_per_iteration=1, previous=prev)
        prev = policy.decide(h, model, cluster, np.random.default_rng(it))
        out.append(prev)
    return model, cluster, counts, out


@pytest.mark.parametrize(("name", "knobs", "key"), [
    ("eplb", {"interval": 10, "window": 2}, "last_replan"),
    ("flexmoe", {"check_interval": 10, "threshold": 1.0}, "last_check"),
    ("smartmoe", {"freq": 10}, "last_replan"),
    ("hecate", {"reshard_interval": 10, "overlap_degree": 1}, "reshard_iteration"),
])
def test_every_replanning_policy_replans_once_it_has_history(name, knobs, key) -> None:
    """Issue 15: interval 10 on a 12-iteration run re-plans at 1 and 11, not at 10."""
    *_, decisions = _loop(name, knobs)
    marks = [d.info.get(key) for d in decisions]
    assert marks[0] in (None, 0)                    # iteration 0: no history
    assert marks[1:11] == [1] * 10 and marks[11] == 11


def test_eplb_weight_zero_is_the_plain_balancer() -> None:
    """Weight 0 (and min_gain off) returns the balancer's plan on the window load, whatever
    the previous placement."""
    model, cluster, counts, decisions = _loop("eplb", {"interval": 1, "window": 1,
                                                       "migration_weight": 0.0})
    S = decisions[0].placement.slots_per_rank
    for it in range(1, 12):
        want = rebalance_experts(counts[it - 1].sum(axis=1), S * cluster.world_size, 1,
                                 cluster.num_nodes, cluster.world_size)[0]
        assert (decisions[it].placement.phy2log_LP == want).all()


def test_eplb_weight_trades_balance_for_bytes() -> None:
    """More weight: never more bytes moved, never a better modelled balance; huge weight
    keeps the placement."""
    runs = {w: _loop("eplb", {"interval": 2, "window": 2, "migration_weight": w})[3]
            for w in (0.0, 1e-3, 1.0, 1e6)}
    moved = {w: sum(sum(d.info["moved_slots_L"]) for d in ds) for w, ds in runs.items()}
    assert moved[0.0] >= moved[1e-3] >= moved[1.0] >= moved[1e6]
    assert moved[0.0] > moved[1e6]
    t = {w: sum(sum(d.info.get("layer_time_s_L", [0])) for d in ds)
         for w, ds in runs.items() if w > 0}
    assert t[1e-3] <= t[1.0] + 1e-12 <= t[1e6] + 2e-12
    assert all(not d.info["replanned"] or sum(d.info["moved_slots_L"]) == 0
               for d in runs[1e6][2:])


def test_eplb_min_gain_skips_replans_that_do_not_pay() -> None:
    free = _loop("eplb", {"interval": 1, "window": 1})[3]
    picky = _loop("eplb", {"interval": 1, "window": 1, "min_gain": 1e9})[3]
    assert sum(sum(d.info["moved_slots_L"]) for d in free[2:]) > 0
    assert all(sum(d.info["moved_slots_L"]) == 0 for d in picky[2:])
    assert all(all(d.info["skipped_L"]) for d in picky[2:])


def test_incremental_moves_one_replica_by_hand() -> None:
    """Loads [60, 10, 10, 10] on [0 1 2 | 3 1 2]: GPUs 70 / 20. One move (expert 1's second
    copy on GPU 1 becomes expert 0) gives 45 / 45."""
    prev = np.array([0, 1, 2, 3, 1, 2])
    load = np.array([60.0, 10, 10, 10])
    path = incremental_path(prev, load, 3, 1.05, 6)
    assert len(path) == 2 and path[-1].tolist() == [0, 1, 2, 3, 0, 2]
    assert imbalance_ratio(gpu_load(path[-1], load, 3)) == 1.0
    assert incremental_path(prev, load, 3, 1.6, 6)[-1].tolist() == prev.tolist()  # at target


def test_incremental_eplb_moves_fewer_slots_than_full() -> None:
    full = _loop("eplb", {"interval": 2, "window": 2})[3]
    inc = _loop("eplb", {"interval": 2, "window": 2, "mode": "incremental",
                         "target_imbalance": 1.2})[3]
    moved = [sum(sum(d.info["moved_slots_L"]) for d in ds[2:]) for ds in (full, inc)]
    assert moved[1] < moved[0]
    assert inc[-1].info["mode"] == "incremental"


def test_align_slots_keeps_loads_and_cuts_moves() -> None:
    rng = np.random.default_rng(0)
    prev = rng.permutation(np.arange(16) % 8)
    new = np.roll(prev, 4)                          # the same plan, GPUs shifted by two
    aligned = align_slots(new, prev, 2, 4, keep_nodes=False)
    load = rng.random(8)
    assert sorted(gpu_load(aligned, load, 2)) == pytest.approx(sorted(gpu_load(new, load, 2)))
    assert (aligned != prev).sum() == 0


def test_balancing_is_explicit_and_recorded() -> None:
    model, cluster = tiny_model(E=8, L=1), tiny_cluster(2, 2)
    h = History(iteration=1, past_TLRE=skewed_counts_TLRE(model, 4, 1, seed=1),
                passes_per_iteration=1)
    for knob, want in (("auto", "global"), ("global", "global")):
        d = make_policy("eplb", {"balancing": knob}).decide(h, model, cluster,
                                                            np.random.default_rng(0))
        assert d.info["balancing"] == want
    d = make_policy("eplb", {"balancing": "auto", "num_groups": 2}).decide(
        h, model, cluster, np.random.default_rng(0))
    assert d.info["balancing"] == "hierarchical"
    with pytest.raises(MoesimError, match="hierarchical"):
        make_policy("eplb", {"balancing": "hierarchical", "num_groups": 1}).decide(
            h, model, cluster, np.random.default_rng(0))
    with pytest.raises(MoesimError, match="balancing"):
        make_policy("eplb", {"balancing": "sideways"})


@pytest.mark.parametrize(("name", "knobs"), [
    ("eplb", {"migration_weight": -1}), ("flexmoe", {"min_gain": -0.5}),
    ("smartmoe", {"migration_weight": "lots"}), ("eplb", {"target_imbalance": 0.9}),
])
def test_bad_migration_knobs_are_one_line_errors(name, knobs) -> None:
    with pytest.raises(MoesimError):
        make_policy(name, knobs)


@pytest.mark.parametrize("name", ["flexmoe", "smartmoe"])
def test_weight_reduces_moves_for_flexmoe_and_smartmoe(name) -> None:
    key = {"flexmoe": {"check_interval": 2, "threshold": 1.0},
           "smartmoe": {"freq": 2}}[name]
    moved = [sum(sum(d.info["moved_slots_L"]) for d in
                 _loop(name, dict(key, migration_weight=w), seed=3)[3]) for w in (0.0, 1e6)]
    assert moved[1] < moved[0] or moved[0] == 0
    assert moved[1] == 0


def test_decision_info_survives_json() -> None:
    """``last_replan`` and the objective figures are JSON numbers (resume restores them)."""
    import json

    d = _loop("eplb", {"interval": 2, "migration_weight": 1.0})[3][-1]
    json.dumps(d.info)
    assert isinstance(Decision(Placement(d.placement.phy2log_LP, 4, d.placement.slots_per_rank,
                                         8), info=d.info), Decision)


def test_hecate_reshard_weighs_owner_moves() -> None:
    """Re-shards every 3 iterations: weight 0 re-shards from scratch (owners move); a huge
    weight keeps the owners once they are set; min_gain can refuse the re-shard."""
    def owner_changes(ds):
        return sum(int((np.asarray(a.info["owners_LE"]) != np.asarray(b.info["owners_LE"]))
                       .sum()) for a, b in zip(ds[1:-1], ds[2:], strict=True))
    base = {"reshard_interval": 3, "overlap_degree": 1}
    free = _loop("hecate", base)[3]
    heavy = _loop("hecate", dict(base, migration_weight=1e6))[3]
    picky = _loop("hecate", dict(base, min_gain=1e9))[3]
    assert owner_changes(free) > 0
    assert owner_changes(heavy) == 0 and owner_changes(picky) == 0
    assert any(any(d.info.get("reshard_skipped_L", [])) for d in picky)
    light = _loop("hecate", dict(base, migration_weight=1e-9))[3]
    assert owner_changes(light) <= owner_changes(free)


def test_balancing_mode_is_in_the_run_config(tmp_path) -> None:
    import json

    from moesim.simulate import simulate
    from moesim.traces.synth import SynthConfig, synthesize

    model, cluster = tiny_model(E=8, L=2), tiny_cluster(2, 2)
    trace = synthesize(SynthConfig(num_layers=2, num_ranks=4, num_experts=8, top_k=2,
                                   tokens_per_rank=256, num_iterations=2), rng=0)
    out = simulate(trace, model, cluster, make_policy("eplb", {"num_groups": 2}),
                   out_dir=tmp_path / "run", progress=False)
    cfg = json.loads((out.out_dir / "config.json").read_text())
    assert cfg["policy"]["knobs"]["balancing"] == "auto"
    assert cfg["policy"]["resolved"] == {"balancing": "hierarchical"}
    plain = simulate(trace, model, cluster, "static_ep", out_dir=tmp_path / "st",
                     progress=False)
    assert "resolved" not in json.loads((plain.out_dir / "config.json").read_text())["policy"]


@pytest.mark.parametrize(("name", "knobs"), [
    ("eplb", {"interval": 2, "window": 2}),
    ("flexmoe", {"check_interval": 2, "threshold": 1.0}),
    ("smartmoe", {"freq": 2}),
    ("hecate", {"reshard_interval": 2, "overlap_degree": 1}),
])
def test_weight_zero_and_min_gain_off_change_nothing(name, knobs) -> None:
    """The knobs at their defaults, spelled out, decide exactly as the policy without them."""
    plain = _loop(name, knobs)[3]
    spelled = _loop(name, dict(knobs, migration_weight=0.0, min_gain=None))[3]
    for a, b in zip(plain, spelled, strict=True):
        assert (a.placement.phy2log_LP == b.placement.phy2log_LP).all()
