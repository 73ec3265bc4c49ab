"""Multi-process tests on gloo (CPU): the distributed layer equals the reference layer for every
registered policy and for a hand-built program using every op type, at world size 2 and 4; the
launcher ends failed or hung runs quickly and marks their results incomplete.

Each world size is one launch of :mod:`moesim.executor.selfcheck` covering all policies, so the
whole file costs a handful of process starts. Every launch has a hang bound; no test asserts on
timings.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.executor.launch import launch
from moesim.ops import PHASES
from moesim.policies import available_policies, policy_class
from moesim.results import load_run
from moesim.specs import load_model
from tests.policies.policytoys import solver_missing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from exec_handmade import handmade_program  # noqa: E402

WORLDS = (2, 4)
HANG_S = 90.0


def _tiny_trace(path: Path, world: int) -> Path:
    from moesim.traces.io import save_trace
    from moesim.traces.synth import SynthConfig, synthesize

    cfg = SynthConfig(num_layers=2, num_ranks=world, num_experts=8, top_k=2, tokens_per_rank=64,
                      micro_batches_per_iteration=2, num_iterations=2, doc_tokens=32)
    return save_trace(synthesize(cfg, rng=world), path)


def _policy_specs(world: int, num_experts: int = 8) -> str:
    """``name:knob=value`` specs: one spare slot per rank where a policy has slots (so experts
    get replicas), and capacity factor 1 (drops) at world size 4, dropless at 2."""
    specs = []
    for name in available_policies():
        if solver_missing(name):
            continue
        fields = {f.name: f.default for f in dataclasses.fields(policy_class(name).Config)}
        knobs = []
        if fields.get("slots_per_rank") is not None:
            knobs.append(f"slots_per_rank={num_experts // world + 1}")
        if "capacity_factor" in fields and world == 4:
            knobs.append("capacity_factor=1.0")
        specs.append(":".join([name, *knobs]))
    return ",".join(specs)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    """One selfcheck launch per world size: every policy plus the hand-built program."""
    model = load_model("tiny-cpu")
    out = {}
    for world in WORLDS:
        d = tmp_path_factory.mktemp(f"w{world}")
        trace = _tiny_trace(d / "trace.npz", world)
        progs = d / "programs.pkl"
        progs.write_bytes(pickle.dumps({"model": model,
                                        "items": [(0, handmade_program(model, world)),
                                                  (1, handmade_program(model, world, 1))]}))
        report = d / "report.json"
        launch(["--trace", str(trace), "--model", "tiny-cpu", "--policies",
                _policy_specs(world), "--iterations", "0:2", "--programs", str(progs),
                "--report", str(report)], world, d / "run", hang_timeout_s=HANG_S,
               module="moesim.executor.selfcheck")
        out[world] = json.loads(report.read_text())
    return out


def _assert_ok(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["iterations"], "no iterations ran"
    for it in result["iterations"]:
        assert it["backward"]
        assert it["ok"], it


@pytest.mark.parametrize("world", WORLDS)
def test_handmade_program_matches_reference(reports, world):
    _assert_ok(reports[world]["programs"])
    # the replicated experts' all-reduced grads were checked on every holder
    assert all(it["synced_unchecked"] == 0 for it in reports[world]["programs"]["iterations"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("policy", available_policies())
def test_policy_matches_reference(reports, world, policy):
    reason = solver_missing(policy)
    if reason:
        pytest.skip(f"{policy}: {reason}")
    _assert_ok(reports[world][policy])


def test_validate_runs_both_backends_and_compares(tmp_path, capsys):
    """`moesim validate` (which runs the executor through `moesim run`'s launcher) writes a
    complete executor RunResult, a simulator one with the same config, the table and figure."""
    from moesim.analysis.runs import pair_runs
    from moesim.cli import main

    out = tmp_path / "val"
    code = main(["validate", "--traces", "synth", "--policies", "static_ep", "--world-sizes",
                 "2", "--iterations", "0:2", "--model", "tiny-cpu", "--out", str(out),
                 "--hang-timeout-s", str(HANG_S)])
    assert code == 0
    measured = load_run(out / "synth-static_ep-w2" / "measured")
    predicted = load_run(out / "synth-static_ep-w2" / "predicted")
    assert measured.complete and measured.backend == "executor"
    assert measured["busy_s"].shape == predicted["busy_s"].shape == (2, 3, len(PHASES), 2)
    assert np.isfinite(measured.summary["step_time_s"]).all()
    assert pair_runs([predicted, measured]) == [(predicted, measured)]
    # the load and traffic metrics come from the same routing and program: identical
    from moesim.metrics import COLUMNS

    for col in COLUMNS:
        np.testing.assert_allclose(measured.summary[col], predicted.summary[col], err_msg=col)
    np.testing.assert_array_equal(measured["traffic_bytes"], predicted["traffic_bytes"])
    assert (out / "synth-static_ep-w2" / "measured" / "timeline_iter0.json").is_file()
    assert (out / "validation.csv").is_file() and (out / "predicted_vs_measured.png").is_file()
    printed = capsys.readouterr().out
    assert "step MAPE" in printed
    assert "load/traffic metrics: identical in both backends" in printed


def _fault_launch(tmp_path: Path, monkeypatch, fault: str, hang_s: float) -> tuple[str, float]:
    monkeypatch.setenv("FAULT", fault)
    monkeypatch.setenv("PYTHONPATH", f"{HERE}:{__import__('os').environ.get('PYTHONPATH', '')}")
    t0 = time.monotonic()
    with pytest.raises(MoesimError) as err:
        launch(["--out", str(tmp_path / "run")], 2, tmp_path / "run", hang_timeout_s=hang_s,
               module="exec_fault_worker")
    return str(err.value), time.monotonic() - t0


def test_dead_rank_ends_the_run_with_one_line(tmp_path, monkeypatch):
    msg, elapsed = _fault_launch(tmp_path, monkeypatch, "die", hang_s=60)
    assert "rank 1 exited with code 3" in msg and "injected failure" in msg
    assert "\n" not in msg
    assert elapsed < 120  # bounded (the workers would sleep 600 s)
    assert load_run(tmp_path / "run").manifest["status"] == "incomplete"


def test_hung_ranks_are_killed_within_the_bound(tmp_path, monkeypatch):
    msg, elapsed = _fault_launch(tmp_path, monkeypatch, "hang", hang_s=8)
    assert "no rank made progress" in msg
    assert elapsed < 120  # bounded (the workers would sleep 600 s)
    assert load_run(tmp_path / "run").manifest["status"] == "incomplete"


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    """`moesim calibrate` on 2 gloo ranks (1 repeat per collective and 2 iterations of the
    context workload: a smoke test, not a measurement) writes a Cluster + HardwareProfile that
    load_cluster reads, with a context factor for every op class the workload runs."""
    from moesim.cli import main
    from moesim.specs import load_cluster

    out = tmp_path / "cal.toml"
    assert main(["calibrate", "--world-size", "2", "--reps", "1", "--model", "tiny-cpu",
                 "--context-iterations", "2", "--out", str(out)]) == 0
    cluster = load_cluster(out)
    assert cluster.world_size == 2 and cluster.hardware.peak_flops > 0
    assert cluster.intra.bw_GBps > 0 and cluster.hardware.cores_shared_by >= 1
    factors = cluster.hardware.context_factors
    for key in ("compute.expert.fwd", "compute.expert.bwd", "all_to_all.dispatch.fwd",
                "all_reduce", "host_compute", "host_copy", "compute"):
        assert key in factors, key
    text = capsys.readouterr().out
    assert "collectives" in text and "context factors" in text


def test_one_rank_calibration_copies_the_named_links(tmp_path, capsys):
    """`moesim calibrate --world-size 1` (a one-GPU machine's case, here on gloo) measures
    compute only and takes the link levels from --links-from, saying so."""
    from moesim.cli import main
    from moesim.specs import load_cluster

    out = tmp_path / "one.toml"
    assert main(["calibrate", "--world-size", "1", "--model", "tiny-cpu", "--backend", "gloo",
                 "--links-from", "a100-4x8-ib800", "--context-iterations", "0",
                 "--out", str(out)]) == 0
    cluster, source = load_cluster(out), load_cluster("a100-4x8-ib800")
    assert cluster.world_size == 1 and cluster.hardware.peak_flops > 0
    assert cluster.intra == source.intra and cluster.inter == source.inter
    assert "links copied from a100-4x8-ib800" in capsys.readouterr().out
