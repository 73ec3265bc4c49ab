"""Context factors: the profile field, the cost model's lookup, and calibrate's fit from paired
executor/simulator timelines (single process; the end-to-end run is in test_executor_gloo)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moesim.costmodel import CostModel, context_factor, context_key
from moesim.errors import MoesimError
from moesim.executor import calibrate_context as ctx
from moesim.executor.calibrate import fit_profile, write_profile
from moesim.ops import AllReduce, AllToAll, Compute, HostCopy, Program
from moesim.specs import HardwareProfile, load_cluster, load_model, spec_to_dict


def test_lookup_takes_the_most_specific_key():
    f = {"all_to_all": 1.5, "all_to_all.combine": 1.2, "all_to_all.combine.bwd": 2.0}
    assert context_factor(f, "all_to_all.combine.bwd") == 2.0
    assert context_factor(f, "all_to_all.combine.fwd") == 1.2
    assert context_factor(f, "all_to_all.dispatch.fwd") == 1.5
    assert context_factor(f, "all_reduce.route.fwd") == 1.0


def test_op_keys_name_class_phase_and_direction():
    two = np.ones(2)
    assert context_key(Compute(phase="expert", direction="bwd", flops_R=two,
                               bytes_R=two)) == "compute.expert.bwd"
    assert context_key(HostCopy(phase="optimizer", direction="step",
                                bytes_R=two)) == "host_copy.optimizer.step"
    assert context_key(AllReduce(phase="route", groups=(np.arange(2),),
                                 bytes_G=np.ones(1))) == "all_reduce.route.fwd"


@pytest.mark.parametrize("table, needle", [
    ({"gemm": 1.2}, "bad key 'gemm'"),
    ({"compute.nosuch": 1.2}, "bad key"),
    ({"compute.expert.sideways": 1.2}, "bad key"),
    ({"compute.expert.fwd.x": 1.2}, "bad key"),
    ({"compute": 0.0}, "positive number"),
    ({"compute": float("nan")}, "positive number"),
    ({"compute": "2"}, "positive number"),
    ([1.2], "table of factors"),
])
def test_profile_rejects_bad_factors(table, needle):
    with pytest.raises(MoesimError, match=needle):
        HardwareProfile(name="x", peak_flops=1e12, mem_bw_GBps=100, context_factors=table)


def test_factors_scale_durations_and_round_trip():
    """Dispatch and combine share one costed buffer (transposed views) yet keep their own
    factors; a profile without factors serialises as before (the field is omitted)."""
    cluster = load_cluster("cpu-gloo-4")
    B = np.full((4, 4), 1e6)
    ops = [AllToAll(phase="dispatch", bytes_RR=B), AllToAll(phase="combine", bytes_RR=B.T),
           Compute(phase="dense", flops_R=np.full(4, 1e9), bytes_R=np.zeros(4))]
    prog = Program(ops=ops, num_ranks=4)
    base = [float(np.max(d)) for d in CostModel(cluster).durations(prog)]
    hw = dataclasses.replace(cluster.hardware, context_factors={"all_to_all.combine": 2.0,
                                                                 "compute": 0.5})
    scaled = [float(np.max(d)) for d in
              CostModel(dataclasses.replace(cluster, hardware=hw)).durations(prog)]
    assert scaled == pytest.approx([base[0], 2 * base[1], 0.5 * base[2]])
    assert "context_factors" not in spec_to_dict(cluster.hardware)
    assert spec_to_dict(hw)["context_factors"] == {"all_to_all.combine": 2.0, "compute": 0.5}


def _event(rank: int, index: int, op: str, phase: str, direction: str, dur_us: float) -> dict:
    return {"ph": "X", "pid": rank, "cat": phase, "dur": dur_us,
            "name": phase if direction != "bwd" else f"{phase}_bwd",
            "args": {"op": op, "index": index, "direction": direction}}


def test_fit_is_time_weighted_pooled_filtered_and_clipped():
    sums: dict[str, list[float]] = {}
    measured, predicted = [], []
    for i in range(6):  # an all-to-all 1.5x its prediction on average, one op much slower
        for r in range(2):
            measured.append(_event(r, i, "AllToAll", "dispatch", "fwd", 400 if i else 1400))
            predicted.append(_event(r, i, "AllToAll", "dispatch", "fwd", 400))
    measured.append(_event(0, 6, "AllReduce", "route", "fwd", 300))  # 1 sample: too few
    predicted.append(_event(0, 6, "AllReduce", "route", "fwd", 100))
    for i in range(7, 11):  # router stand-in 20x: clipped
        measured.append(_event(0, i, "Compute", "route", "fwd", 2000))
        predicted.append(_event(0, i, "Compute", "route", "fwd", 100))
    ctx.accumulate(sums, measured, predicted)
    f = ctx.fit_factors(sums)
    assert f["all_to_all.dispatch.fwd"] == pytest.approx(6800 / 4800, rel=1e-3)
    assert f["all_to_all"] == f["all_to_all.dispatch.fwd"]
    assert "all_reduce.route.fwd" not in f and "all_reduce" not in f
    assert f["compute.route.fwd"] == ctx.CLIP[1]
    lines = ctx.summary_lines(sums, f)
    assert lines[0].split(": ")[1] == "all_to_all x1.42, compute x5.00"  # pooled
    assert [line.split()[0] for line in lines[1:]] == ["compute.route.fwd",  # 8 ms measured
                                                       "all_to_all.dispatch.fwd"]  # 6.8 ms


def test_unpaired_timelines_are_an_error():
    with pytest.raises(MoesimError, match="other ops than the simulator"):
        ctx.accumulate({}, [_event(0, 1, "AllToAll", "dispatch", "fwd", 1.0)],
                       [_event(0, 2, "AllToAll", "dispatch", "fwd", 1.0)])


def test_workload_is_not_a_validation_trace():
    """Its own seed and skew: the synthetic validation trace (seed = world size) differs."""
    from moesim.executor.validate import load_named_trace

    model = load_model("small-cpu")
    work = ctx.workload_trace(model, 2, 3)
    valid = load_named_trace("synth", 2, model, 3)
    assert work.counts_TLRE.shape == valid.counts_TLRE.shape
    assert not np.array_equal(work.counts_TLRE, valid.counts_TLRE)
    assert np.array_equal(work.counts_TLRE, ctx.workload_trace(model, 2, 3).counts_TLRE)


def test_from_raw_refits_the_stored_context(tmp_path, capsys):
    """`calibrate --from-raw` with a raw file that holds context sums writes their factors."""
    from moesim.cli import main
    from tests.executor.test_calibrate_validate import _raw

    model = load_model("tiny-cpu")
    raw = _raw(model)
    raw["context"] = {"all_to_all.dispatch.fwd": [0.03, 0.02, 12],
                      "compute.expert.fwd": [0.5, 0.5, 12]}
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "cal.toml"
    assert main(["calibrate", "--from-raw", str(path), "--model", "tiny-cpu",
                 "--out", str(out)]) == 0
    hw = load_cluster(out).hardware
    assert hw.context_factors["all_to_all.dispatch.fwd"] == pytest.approx(1.5)
    assert hw.context_factors["compute"] == pytest.approx(1.0)
    assert "context factors" in capsys.readouterr().out
    fit = fit_profile(raw, model)  # without the context stage: no factors, as before
    assert not load_cluster(write_profile(fit, raw["meta"], tmp_path / "b.toml")
                            ).hardware.context_factors


def test_remeasure_pools_a_second_sample(tmp_path, monkeypatch):
    """`remeasure_context` (the accuracy benchmark's sample after a configuration's runs) adds
    a second run's sums to the raw file's and rewrites the profile from the pooled sums."""
    from tests.executor.test_calibrate_validate import _raw

    model = load_model("tiny-cpu")
    raw = _raw(model)
    raw["context"] = {"all_to_all.dispatch.fwd": [0.03, 0.02, 12]}
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    seen = []

    def fake_measure(profile, model_name, world, workdir, iterations, backend, timeout):
        seen.append((load_cluster(profile).hardware.context_factors, world, iterations))
        return {"all_to_all.dispatch.fwd": [0.01, 0.02, 12]}

    monkeypatch.setattr(ctx, "measure", fake_measure)
    out = ctx.remeasure_context(path, tmp_path / "cal.toml", "tiny-cpu", 3)
    assert seen == [({}, 2, 3)]  # measured against the microbenchmark fit, without factors
    assert load_cluster(out).hardware.context_factors["all_to_all.dispatch.fwd"] == 1.0
    assert json.loads(path.read_text())["context"]["all_to_all.dispatch.fwd"] == [0.04, 0.04,
                                                                                  24]
    del raw["context"]
    path.write_text(json.dumps(raw))
    with pytest.raises(MoesimError, match="no context measurements"):
        ctx.remeasure_context(path, tmp_path / "cal.toml", "tiny-cpu", 3)


def test_ablation_tool_re_predicts_a_grid(tmp_path, capsys):
    """`benchmarks/context_ablation.py` on a grid whose "measurement" is the simulator with
    the profile's factors: as written it matches exactly; without factors it does not."""
    import importlib.util
    from pathlib import Path

    import tomli_w

    from moesim.simulate import simulate
    from moesim.traces.io import save_trace

    spec = importlib.util.spec_from_file_location(
        "context_ablation", Path(__file__).parents[2] / "benchmarks" / "context_ablation.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(MoesimError, match="accuracy.csv is missing"):
        tool.configurations(tmp_path)

    model = load_model("tiny-cpu")
    trace = tmp_path / "t.npz"
    save_trace(ctx.workload_trace(model, 2, 2), trace)
    base = load_cluster("cpu-gloo-4").with_shape(1, 2)
    hw = dataclasses.replace(base.hardware, context_factors={"compute": 1.5,
                                                             "all_to_all.dispatch": 2.0})
    cluster = dataclasses.replace(base, hardware=hw)
    (tmp_path / "c-w2-profile.toml").write_text(tomli_w.dumps(spec_to_dict(cluster)))
    for run in ("predicted", "measured"):
        simulate(trace, model, cluster, "static_ep", iterations=(0, 2),
                 out_dir=tmp_path / "c-w2" / run, progress=False)
    (tmp_path / "accuracy.csv").write_text(
        "config,trace,policy,world_size,quantity,predicted_s,measured_s,mape_pct,max_pct\n"
        "c-w2,t,static_ep,2,step,0,0,0,0\n")
    assert tool.main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("c-w2"))
    as_written, none = (float(x.rstrip("%")) for x in row.split()[1:3])
    assert as_written == pytest.approx(0.0, abs=1e-9) and none > 5.0
