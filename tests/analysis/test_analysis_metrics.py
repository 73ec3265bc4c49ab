"""The load and traffic metrics in the report, the figures, the search ranking and trace info."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.errors import MoesimError


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """Two small simulated runs (static EP and EPLB) on 2 nodes x 2 GPUs."""
    from moesim.simulate import simulate
    from moesim.specs import load_cluster, load_model
    from moesim.traces import SynthConfig, synthesize

    base = tmp_path_factory.mktemp("metric-runs")
    trace = synthesize(SynthConfig(num_layers=2, num_ranks=4, num_experts=8, top_k=2,
                                   tokens_per_rank=64, micro_batches_per_iteration=2,
                                   num_iterations=3, skew_start=1.0), rng=1)
    model = load_model("tiny-cpu").replace(num_layers=2, num_experts=8, top_k=2)
    cluster = load_cluster("cpu-gloo-4").with_shape(2, 2)
    out = []
    for name in ("static_ep", "eplb"):
        simulate(trace, model, cluster, name, out_dir=base / name, progress=False)
        out.append(base / name)
    return out


def test_traffic_heatmap_and_link_rows(sim_runs, tmp_path):
    from moesim.analysis.runs import as_run
    from moesim.analysis.traffic import gpus_per_node, link_rows, plot_traffic_heatmap

    run = as_run(sim_runs[0])
    assert gpus_per_node(run) == 2
    path = plot_traffic_heatmap(run, tmp_path / "t.png")
    assert path.stat().st_size > 1000
    rows = link_rows(run)
    assert len(rows) == 3 and rows[0][0] == "0"
    # the first cell names the hottest pair of iteration 0 and its GB
    T = run["traffic_bytes"][0].sum(axis=0)
    s, d = divmod(int(np.argmax(T)), 4)
    assert rows[0][1] == f"{s}→{d} {T.max() / 1e9:.3f}"


def test_heatmap_refuses_runs_without_traffic(sim_runs, tmp_path):
    import shutil

    from moesim.analysis.traffic import plot_traffic_heatmap

    old = shutil.copytree(sim_runs[0], tmp_path / "old")
    (old / "traffic.npz").unlink()  # as a run written before traffic was recorded
    with pytest.raises(MoesimError, match="no traffic.npz"):
        plot_traffic_heatmap(old, tmp_path / "x.png")


def test_report_shows_the_metrics(sim_runs, tmp_path):
    from moesim.analysis.report import build_report

    page = build_report(sim_runs, tmp_path / "r.html").read_text()
    assert "Load and traffic" in page and "overload mean" in page
    assert "Hottest GPU links per iteration" in page
    assert 'alt="traffic_heatmap' in page


def test_search_records_sort_and_limit_by_metrics(sim_runs):
    from moesim.analysis import ranking
    from moesim.analysis.runs import as_run, summarize

    records = []
    for i, path in enumerate(sim_runs):
        summ = summarize(as_run(path))
        assert summ["overload_mean"] >= 1 and np.isfinite(summ["imbalance"])
        records.append({"key": f"k{i}", "config": {"policy": path.name}, "status": "ok",
                        "summary": json.loads(json.dumps(summ))})
    by_overload = ranking.rank(records, sort_by="overload_mean")
    vals = [r["overload_mean"] for r in by_overload]
    assert vals == sorted(vals)
    low = min(vals)
    rows = ranking.rank(records, limits={"overload_mean": low})
    assert [r["feasible"] for r in rows].count(True) == 1
    assert "overload_mean >" in [r for r in rows if not r["feasible"]][0]["violates"]
    with pytest.raises(MoesimError, match="not a ranking column"):
        ranking.rank(records, sort_by="nope")
    assert "overload" in ranking.text_table(rows, "t")


def test_search_cli_flags(tmp_path):
    from moesim.analysis.cli import _limits

    assert _limits(["overload_max=2", "imbalance = 0.5"]) == {"overload_max": 2.0,
                                                               "imbalance": 0.5}
    with pytest.raises(MoesimError, match="COLUMN=MAX"):
        _limits(["overload_max"])


def test_trace_info_expert_load(capsys):
    from moesim.cli import main
    from moesim.traces.format import RoutingTrace, TraceMeta
    from moesim.traces.load_stats import expert_load_summary

    # one pass, two layers, one rank, four experts, top-1 of 8 tokens
    counts = np.array([[[[8, 0, 0, 0]], [[2, 2, 2, 2]]]])
    meta = TraceMeta(num_layers=2, num_ranks=1, num_experts=4, top_k=1, tokens_per_rank=8)
    s = expert_load_summary(RoutingTrace(counts, meta))
    assert s["per_layer"]["balance"] == [4.0, 1.0]
    assert s["per_layer"]["tokens_min"] == [0.0, 2.0]
    assert s["per_layer"]["tokens_std"] == [round(float(np.std([8, 0, 0, 0])), 4), 0.0]
    assert s["across_layers"]["balance_p50"] == 2.5
    assert s["across_layers"]["tokens_max"] == 8.0
    assert main(["trace", "info"]) == 0
    out = capsys.readouterr().out
    assert "expert load per layer" in out and "balance (max/mean per layer) across layers" in out


def test_validation_reports_routing_metric_gaps(tmp_path):
    from moesim.analysis.validation import Comparison, routing_gap_line, routing_gaps
    from moesim.results import RunResult

    def run(overload):
        summary = {"iteration": np.array([0.0, 1.0]), "overload_mean": np.array(overload),
                   "imbalance": np.array([0.5, 0.5])}
        return RunResult(tmp_path, {}, {}, summary)

    gaps = routing_gaps(run([2.0, 3.0]), run([2.0, 2.0]), np.array([0, 1]))
    assert gaps == {"overload_mean": 0.5, "imbalance": 0.0}
    comp = Comparison(np.array([0, 1]), None, routing_gaps=gaps)
    assert routing_gap_line(comp) == "load/traffic metrics DIFFER: overload_mean 5.00e-01"
    comp.routing_gaps = {"imbalance": 0.0}
    assert "identical in both backends (1)" in routing_gap_line(comp)
