"""Single-process tests of calibration fitting, the written profile, trace fitting and the
predicted-vs-measured comparison (no processes are started)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.analysis.validation import compare_runs, format_table
from moesim.executor.calibrate import fit_alpha_beta, fit_profile, write_profile
from moesim.executor.validate import prepare_trace
from moesim.ops import PHASES
from moesim.results import IterationRecord, RunWriter, load_run
from moesim.specs import load_cluster, load_model

AG_ALPHA, AG_BUSBW = 1.4e-3, 0.5e9


def _raw(model, alpha=2e-4, busbw=1.5e9, peak=5e10):
    rng = np.random.default_rng(0)
    compute = []
    for m in (1, 4, 16, 64, 256, 1024):
        for passes in (1, 2):
            f = passes * m * model.expert_flops_per_token
            eff = m / (m + 20.0) / (1.0 if passes == 1 else 1.5)  # backward: 3x a forward
            compute.append({"kind": "expert", "m": m, "passes": passes, "flops": f,
                            "bytes": 1.0, "t": 3e-6 + f / (peak * eff)})
    T = model.tokens_per_rank  # the stand-in runs at 60% of peak
    compute += [{"kind": "standin", "name": "dense_fwd", "rows": T, "flops": 1e7,
                 "t": 3e-6 + 1e7 / (0.6 * peak)},
                {"kind": "standin", "name": "router", "rows": T, "flops": 1e4, "t": 1e-5}]
    for numel in (2**14, 2**18):
        compute += [{"kind": "adam", "numel": numel, "t": numel * 24 / 8e9},
                    {"kind": "host_adam", "numel": numel, "t": numel * 8 / 3e9},
                    {"kind": "copy", "bytes": numel * 4, "t": 1e-6 + numel * 4 / 2e10}]
    coll = []
    for kind, factor in (("all_to_all", 0.5), ("all_reduce", 1.0), ("broadcast", 1.0)):
        for nbytes in (4096, 65536, 1 << 20, 4 << 20):
            t = (alpha + factor * nbytes / busbw) * (1 + 0.01 * rng.standard_normal())
            coll.append({"kind": kind, "n": 2, "bytes": nbytes, "t": t})
    for n in (2, 4):  # gloo-like all-gather: a larger fixed cost, its own bandwidth
        for nbytes in (4096, 65536, 1 << 20, 4 << 20):
            coll.append({"kind": "all_gather", "n": n, "bytes": nbytes,
                         "t": AG_ALPHA + (n - 1) / n * nbytes / AG_BUSBW})
    meta = {"world_size": 2, "cpu_count": 1, "backend": "gloo", "torch": "x", "model": "tiny"}
    return {"compute": compute, "collectives": coll, "meta": meta}


def test_alpha_beta_fit_recovers_parameters():
    x = np.array([1e3, 1e5, 1e6, 1e7])
    alpha, beta, mape = fit_alpha_beta(x, 5e-5 + x / 2e9)
    assert alpha == pytest.approx(5e-5, rel=1e-6) and beta == pytest.approx(2e9, rel=1e-6)
    assert mape < 1e-6


def test_profile_fit_and_toml_round_trip(tmp_path):
    model = load_model("tiny-cpu")
    raw = _raw(model)
    fit = fit_profile(raw, model)
    coll = fit["collectives"]
    a2a = coll["per_kind"]["all_to_all"]
    assert a2a["alpha_s"] == pytest.approx(2e-4, rel=0.1)
    assert a2a["busbw_GBps"] == pytest.approx(1.5, rel=0.1)
    ag = coll["per_kind"]["all_gather"]  # fitted on its own, over both group sizes
    assert ag["alpha_s"] + ag["alpha_peer_s"] == pytest.approx(AG_ALPHA, rel=1e-6)
    assert ag["busbw_GBps"] == pytest.approx(AG_BUSBW / 1e9, rel=1e-6)
    assert fit["mem_bw_GBps"] == pytest.approx(8.0, rel=0.05)
    assert fit["compute"]["mape_pct"] < 1e-6  # forward and backward curves tabulated
    cluster = load_cluster(write_profile(fit, raw["meta"], tmp_path / "cal.toml"))
    assert cluster.world_size == 2 and cluster.intra.bw_GBps == pytest.approx(
        coll["busbw_GBps"])
    assert cluster.intra.for_kind("all_gather")[0] == pytest.approx(AG_BUSBW / 1e9, rel=1e-6)
    assert cluster.hardware.cores_shared_by == 2.0  # 2 ranks on 1 CPU, single-rank raw file
    assert cluster.hardware.backward_gemm_eff_curve
    raw["meta"]["compute_concurrent"] = True  # measured with all ranks at once: already in
    fit = fit_profile(raw, model)
    cluster = load_cluster(write_profile(fit, raw["meta"], tmp_path / "cal2.toml"))
    assert cluster.hardware.cores_shared_by == 1.0


def test_calibrated_profile_reproduces_the_measurements(tmp_path):
    """The cost model with the written profile gives back the benchmark times it was fitted
    on: per-slot expert forward and backward, and each collective kind at its own α."""
    from moesim.costmodel import CostModel
    from moesim.ops import AllGather, AllReduce, Compute

    model = load_model("tiny-cpu")
    raw = _raw(model)
    raw["meta"]["compute_concurrent"] = True
    cluster = load_cluster(write_profile(fit_profile(raw, model), raw["meta"],
                                         tmp_path / "cal.toml")).with_shape(1, 4)
    cm = CostModel(cluster)
    for row in raw["compute"]:
        if row["kind"] != "expert":
            continue
        op = Compute(phase="expert", kind="expert_ffn", gemm_passes=row["passes"],
                     gemm_tokens_RS=np.array([[row["m"]]] * 4), flops_R=np.zeros(4),
                     bytes_R=np.zeros(4), weight_bytes=model.expert_weight_bytes,
                     flops_per_token=model.expert_flops_per_token)
        assert cm.duration(op)[0] == pytest.approx(row["t"], rel=1e-6)
    dense = Compute(phase="dense", kind="attention", gemm_rows=model.tokens_per_rank,
                    flops_R=np.full(4, 1e7), bytes_R=np.zeros(4))
    assert cm.duration(dense)[0] == pytest.approx(3e-6 + 1e7 / (0.6 * 5e10), rel=1e-3)
    groups = (np.arange(4),)
    ag = cm.duration(AllGather(phase="optimizer", groups=groups, bytes_G=np.array([1e6])))
    assert ag[0] == pytest.approx(AG_ALPHA + 0.75 * 1e6 / AG_BUSBW, rel=1e-6)
    ar = cm.duration(AllReduce(phase="grad_sync", groups=groups, bytes_G=np.array([1e6])))
    assert ar[0] < ag[0]  # the all-reduce keeps its own (smaller) fixed cost


def test_compare_runs_takes_the_median_of_repeats(tmp_path):
    pred = _run(tmp_path / "p", "simulator", [0.010, 0.010], 1.0)
    reps = [_run(tmp_path / f"m{i}", "executor", steps, 1.0) for i, steps in
            enumerate([[0.010, 0.011], [0.030, 0.010], [0.010, 0.012]])]
    comp = compare_runs(pred, reps)
    np.testing.assert_allclose(comp.step.measured_I, [0.010, 0.011])
    assert comp.step.mape_pct == pytest.approx(100 * (0 + 1 / 11) / 2)


def test_executor_plan_uses_the_simulator_seam():
    """plan.iteration_programs decides with simulate's public helpers: same decisions."""
    from moesim import simulate as sim
    from moesim.executor.plan import fit_run_inputs, iteration_programs
    from moesim.executor.validate import load_named_trace
    from moesim.policies import make_policy
    from moesim.specs import load_cluster

    model = load_model("tiny-cpu")
    cluster = load_cluster("cpu-gloo-4").with_shape(1, 2)
    trace, model = fit_run_inputs(load_named_trace("synth", 2, model, 3), model, cluster, 0)
    policy = make_policy("swiftmoe", {"slots_per_rank": "5"})
    planned = list(iteration_programs(trace.counts_TLRE, trace.meta.micro_batches_per_iteration,
                                      policy, model, cluster, 0, 3, seed=0))
    previous = None
    for item in planned:
        decision, counts = sim.decide_iteration(policy, trace.counts_TLRE,
                                                trace.meta.micro_batches_per_iteration,
                                                item.iteration, previous, model, cluster, 0)
        np.testing.assert_array_equal(decision.placement.phy2log_LP,
                                      item.decision.placement.phy2log_LP)
        np.testing.assert_array_equal(counts, item.counts_MLRE)
        previous = decision


def test_prepare_trace_regroups_and_caps():
    from moesim.traces.synth import SynthConfig, synthesize
    from moesim.traces.validate import validate

    model = load_model("tiny-cpu")
    big = synthesize(SynthConfig(num_layers=3, num_ranks=8, num_experts=32, top_k=2,
                                 tokens_per_rank=512, micro_batches_per_iteration=4,
                                 num_iterations=2), rng=1)
    t = prepare_trace(big, 2, model)
    assert t.counts_TLRE.shape == (2 * model.micro_batches, 2, 2, 8)
    assert (t.counts_TLRE.sum(-1) == model.tokens_per_rank * model.top_k).all()
    assert t.counts_TLRE.max() <= model.tokens_per_rank
    validate(t)


def _run(path, backend, steps, phase_scale):
    L, F, R = 2, len(PHASES), 2
    w = RunWriter(path, {"b": backend}, backend)
    for i, step in enumerate(steps):
        busy = np.zeros((L + 1, F, R))
        busy[:, PHASES.index("expert")] = 1e-3 * phase_scale
        busy[:, PHASES.index("dispatch")] = 2e-3
        nan = np.full((L + 1, F, R), np.nan)
        w.add(IterationRecord(i, {"step_time_s": step}, busy, nan, nan, np.zeros((L, 8)),
                              np.zeros((L, R)), np.zeros((L, R)), {}))
    w.finish()
    return load_run(path)


def test_compare_runs_reports_mape_and_max(tmp_path):
    pred = _run(tmp_path / "p", "simulator", [0.011, 0.009, 0.010], 1.2)
    meas = _run(tmp_path / "m", "executor", [0.010, 0.010, 0.010], 1.0)
    comp = compare_runs(pred, meas)
    assert comp.step.mape_pct == pytest.approx(20 / 3, rel=1e-6)
    assert comp.step.max_pct == pytest.approx(10, rel=1e-6)
    assert comp.phases["expert"].mape_pct == pytest.approx(20, rel=1e-4)
    assert comp.phases["dispatch"].mape_pct == pytest.approx(0, abs=1e-6)
    assert "grad_sync" not in comp.phases  # zero in both
    assert "step" in format_table(comp.rows())


def test_one_rank_profile_copies_the_links_and_says_so(tmp_path):
    """A one-rank calibration (one GPU: no collective to time) measures compute only; the
    written cluster takes its link levels from the named preset, labelled as copied."""
    model = load_model("tiny-cpu")
    raw = _raw(model)
    raw["collectives"] = []
    raw["meta"].update(world_size=1, compute_concurrent=True, backend="nccl",
                       device="NVIDIA H100 80GB HBM3", device_memory_GiB=79.19)
    fit = fit_profile(raw, model)
    assert fit["collectives"] is None
    fit["links_from"] = "h100-4x8-ib400x8"
    path = write_profile(fit, raw["meta"], tmp_path / "h100.toml")
    cluster, preset = load_cluster(path), load_cluster("h100-4x8-ib400x8")
    assert cluster.world_size == 1 and cluster.gpu_memory_GiB == 79.19
    assert cluster.intra == preset.intra and cluster.inter == preset.inter
    assert "copied from h100-4x8-ib400x8" in path.read_text()
    assert "NVIDIA H100" in cluster.hardware.source
    assert cluster.hardware.peak_flops == pytest.approx(fit["compute"]["peak_flops"])


def test_single_rank_all_to_all_costs_its_local_copies():
    """One member sends only to itself: two passes over its rows through device memory
    (permute + self-copy), no link; nothing to send costs nothing."""
    from moesim.costmodel import CostModel

    cluster = load_cluster("h100-4x8-ib400x8").with_shape(1, 1)
    cm, hw = CostModel(cluster), cluster.hardware
    t = cm.all_to_all(np.array([[1e8]]))
    assert t == pytest.approx(4e8 / (hw.mem_bw_GBps * 1e9) + hw.launch_s)
    assert cm.all_to_all(np.zeros((1, 1))) == 0.0
    two = load_cluster("h100-4x8-ib400x8").with_shape(1, 2)
    assert CostModel(two).all_to_all(np.diag([1e8, 1e8])) == pytest.approx(
        CostModel(two).all_to_all(np.zeros((2, 2))))  # self-traffic is free with peers


def test_links_from_is_checked_before_measuring(tmp_path):
    """--links-from with several ranks, or naming no cluster, fails at once (exit 2, one
    line), before any rank starts and with nothing written."""
    from moesim.cli import main

    out = tmp_path / "x.toml"
    assert main(["calibrate", "--world-size", "2", "--links-from", "a100-4x8-ib800",
                 "--out", str(out)]) == 2
    assert main(["calibrate", "--world-size", "1", "--links-from", "nosuch",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_efficiency_curves_never_fall_with_more_rows():
    """A dip at large m (a slow moment of a shared machine) is raised to the best efficiency
    at smaller m; the fit's error still reports the raw measurement."""
    from moesim.executor.calibrate import fit_compute

    rows = []
    for m, eff in ((16, 0.3), (64, 0.6), (256, 0.9), (1024, 0.6)):
        for passes in (1, 2):
            f = passes * m * 1e6
            rows.append({"m": m, "passes": passes, "flops": f, "t": 1e-6 + f / (1e11 * eff)})
    fit = fit_compute(rows, launch=1e-6)
    for curve in (fit["curve"], fit["backward_curve"]):
        assert [e for _, e in curve] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0], rel=1e-6)
    assert fit["max_pct"] > 30  # the raised point is 1/3 faster than measured
