"""Core types: Placement maps, routing rules, policy registry, RunResult writer, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.placement import Decision, Placement
from moesim.policies import available_policies, make_policy
from moesim.policies.base import History, Policy, register_policy
from moesim.results import IterationRecord, RunWriter, load_run
from moesim.routing import apply_capacity, rank_matrix, split_tokens


def _placement() -> Placement:
    # 2 ranks x 3 slots, 4 experts; expert 0 has 2 replicas, slot 5 empty
    return Placement(np.array([[0, 1, 0, 2, 3, -1]]), num_ranks=2, slots_per_rank=3,
                     num_experts=4)


def test_log2phy_inverts_phy2log():
    p = _placement()
    assert p.logcnt_LE.tolist() == [[2, 1, 1, 1]]
    l2p = p.log2phy_LEK
    for e in range(4):
        for slot in l2p[0, e]:
            if slot >= 0:
                assert p.phy2log_LP[0, slot] == e
    assert sorted(s for s in l2p[0].ravel() if s >= 0) == [0, 1, 2, 3, 4]


def test_placement_rejects_bad_shapes_and_ids():
    with pytest.raises(MoesimError, match="phy2log must be"):
        Placement(np.zeros((1, 5), dtype=int), num_ranks=2, slots_per_rank=3, num_experts=4)
    with pytest.raises(MoesimError, match="outside"):
        Placement(np.full((1, 6), 9), num_ranks=2, slots_per_rank=3, num_experts=4)


def test_even_split_rotates_remainders_and_conserves_tokens():
    p = _placement()
    counts = np.array([[5, 1, 2, 3], [7, 0, 0, 1]])
    out = split_tokens(counts, p.layer(0), 2, 3, "even", gpus_per_node=2)
    assert (out.sum(1) == counts.sum(1)).all()
    # expert 0 (slots 0 and 2): rank 0 sends 5 -> 3/2, rank 1 sends 7 -> 3/4 (rotation from 1)
    assert out[0, [0, 2]].tolist() == [3, 2]
    assert out[1, [0, 2]].tolist() == [3, 4]
    assert rank_matrix(out, 3).sum() == counts.sum()


def test_local_first_prefers_own_rank_then_node():
    # 4 ranks, 2 per node, 1 slot each; expert 0 on ranks 1 and 2, expert 1 on 0, expert 2 on 3
    phy2log = np.array([1, 0, 0, 2])
    counts = np.array([[4, 0, 0], [4, 0, 0], [4, 0, 0], [4, 0, 0]])
    out = split_tokens(counts, phy2log, 4, 1, "local_first", gpus_per_node=2)
    assert out[1].tolist() == [0, 4, 0, 0]   # own rank
    assert out[0].tolist() == [0, 4, 0, 0]   # same node (rank 1)
    assert out[3].tolist() == [0, 0, 4, 0]   # same node (rank 2)
    node_first = split_tokens(counts, phy2log, 4, 1, "node_first", gpus_per_node=2)
    assert node_first[0].tolist() == [0, 4, 0, 0]


def test_ep_group_routing_uses_own_group_replica():
    # EP=2 over 4 ranks: experts 0,1 on ranks 0 and 2; experts 2,3 on ranks 1 and 3
    phy2log = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    counts = np.ones((4, 4), dtype=int)
    out = split_tokens(counts, phy2log, 4, 2, "ep_group", gpus_per_node=4, ep_size=2)
    dest = rank_matrix(out, 2)
    assert dest[0].tolist() == [2, 2, 0, 0] and dest[3].tolist() == [0, 0, 2, 2]


def test_capacity_clips_per_source_slot():
    kept, dropped = apply_capacity(np.array([[5, 1], [0, 9]]), 3)
    assert kept.tolist() == [[3, 1], [0, 3]] and dropped.tolist() == [[2, 0], [0, 6]]
    same, none = apply_capacity(np.array([[5]]), None)
    assert same.tolist() == [[5]] and none.tolist() == [[0]]


def test_decision_rejects_unknown_rule():
    with pytest.raises(MoesimError, match="unknown routing rule"):
        Decision(_placement(), routing="random")


def test_registry_rejects_oracle_without_name():
    with pytest.raises(TypeError, match="oracle"):
        @register_policy("peeks")
        class Peeks(Policy):  # noqa: F841
            oracle = True


def test_make_policy_errors_name_the_fix():
    with pytest.raises(MoesimError, match="unknown policy"):
        make_policy("no_such_policy")
    name = available_policies()[0] if available_policies() else None
    if name:
        with pytest.raises(MoesimError, match="has no knob"):
            make_policy(name, {"no_such_knob": "1"})


def test_history_windows():
    past = np.ones((6, 2, 3, 4), dtype=np.int64)  # 3 iterations of 2 passes
    h = History(iteration=3, past_TLRE=past, passes_per_iteration=2)
    assert h.last_load_LE().tolist() == [[6] * 4] * 2
    assert h.recent_load_LE(5).sum() == past.sum()
    assert History(0, past[:0], 2).last_load_LE() is None


def _record(i: int, R: int = 2) -> IterationRecord:
    L, F, E = 1, 9, 4
    return IterationRecord(
        iteration=i, summary={"step_time_s": 1.0 + i}, busy_s_LFR=np.ones((L + 1, F, R)),
        start_s_LFR=np.zeros((L + 1, F, R)), end_s_LFR=np.ones((L + 1, F, R)),
        expert_load_LE=np.ones((L, E)), rank_tokens_LR=np.ones((L, R)),
        dropped_LR=np.zeros((L, R)), memory_CR={"weights": np.ones(R)})


def test_run_writer_resumes_and_marks_status(tmp_path):
    out = tmp_path / "run"
    w = RunWriter(out, {"policy": "x"}, "simulator", chunk=2)
    for i in range(3):
        w.add(_record(i))
    # killed here: iteration 2 was never flushed
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(MoesimError, match="--resume"):
        RunWriter(out, {"policy": "x"}, "simulator")
    with pytest.raises(MoesimError, match="config differs"):
        RunWriter(out, {"policy": "y"}, "simulator", resume=True)
    w = RunWriter(out, {"policy": "x"}, "simulator", resume=True)
    assert w.resume_after() == 1
    for i in (2, 3):
        w.add(_record(i))
    w.finish()
    run = load_run(out)
    assert run.complete and run.summary["iteration"].tolist() == [0, 1, 2, 3]
    assert run["busy_s"].shape == (4, 2, 9, 2)


def test_incomplete_run_is_marked(tmp_path):
    w = RunWriter(tmp_path / "r", {}, "executor")
    w.add(_record(0))
    w.finish(status="incomplete", error="rank 1 died")
    run = load_run(tmp_path / "r")
    assert not run.complete and run.manifest["error"] == "rank 1 died"


def test_load_run_rejects_non_run_dir(tmp_path):
    with pytest.raises(MoesimError, match="not a moesim run directory"):
        load_run(tmp_path)


def test_cli_bad_input_is_one_line_exit_2(capsys):
    assert main(["presets", "models", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moesim: error:")
