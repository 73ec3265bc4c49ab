"""End to end: a tiny search on the real simulator, then plots and a report of its runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.analysis import search
from moesim.analysis.plots import plot_step_time
from moesim.analysis.report import build_report

SPEC = """
[search]
traces = ["tiny.npz"]
models = ["tiny-cpu"]
clusters = ["cpu-gloo-4"]
iterations = 3

[policies.static_ep]
capacity_factor = [1.0, "none"]

[policies.swiftmoe]
slots_per_rank = [1, 2]
capacity_factor = [1.25]
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    from moesim.traces.io import save_trace
    from moesim.traces.synth import SynthConfig, synthesize

    tmp = tmp_path_factory.mktemp("e2e")
    trace = synthesize(SynthConfig(num_layers=2, num_ranks=4, num_experts=8, top_k=2,
                                   tokens_per_rank=128, micro_batches_per_iteration=2,
                                   num_iterations=3), rng=0)
    save_trace(trace, tmp / "tiny.npz")
    (tmp / "spec.toml").write_text(SPEC)
    return tmp / "spec.toml"


def test_tiny_search_end_to_end(spec, tmp_path, check_image):
    out = tmp_path / "search"
    outcome = search.run_search(spec, out, workers=2, save_runs=True, progress=False)
    status = {r["config"]["knobs"].get("slots_per_rank"): r["status"] for r in outcome.records}
    assert len(outcome.records) == 4
    assert status[1] == "error"  # 4 GPUs x 1 slot < 8 experts: recorded, not fatal
    ok = [r for r in outcome.records if r["status"] == "ok"]
    assert len(ok) == 3
    for rec in ok:
        s = rec["summary"]
        assert s["mean_step_s"] > 0 and s["peak_memory_bytes"] > 0 and s["iterations"] == 3
        assert (out / "runs" / rec["key"] / "manifest.json").is_file()
    assert outcome.rows[0]["rank"] == 1 and outcome.front
    again = search.run_search(spec, out, workers=2, resume=True, progress=False)
    assert len(again.records) == 4
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    runs = sorted(out / "runs" / r["key"] for r in ok)  # the failed one finished nothing
    check_image(plot_step_time(runs, tmp_path / "step.png"))
    page = build_report([out], tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Failed configurations" in page


def test_summary_without_writing_runs(spec, tmp_path):
    from moesim.analysis.search_spec import load_spec
    from moesim.analysis.simulate_adapter import simulate_summary

    config = load_spec(spec)[0]
    summary = simulate_summary(config, None)
    written = simulate_summary(config, tmp_path / "run")
    for key in ("mean_step_s", "p95_step_s", "peak_memory_bytes", "dropped_frac", "a2a_s"):
        assert summary[key] == pytest.approx(written[key], rel=1e-5), key


def test_cluster_reshape_syntax():
    from moesim.analysis.simulate_adapter import load_cluster_arg
    from moesim.errors import MoesimError

    cluster = load_cluster_arg("a100-4x8-ib800@2")
    assert cluster.world_size == 16
    with pytest.raises(MoesimError, match="NAME@NODES"):
        load_cluster_arg("a100-4x8-ib800@two")


def test_example_spec_runs_on_the_bundled_trace(tmp_path):
    from moesim.traces import bundled_trace_path

    assert bundled_trace_path().is_file()
    outcome = search.run_search(None, tmp_path / "s", workers=1, limit=1, progress=False)
    assert [r["status"] for r in outcome.records] == ["ok"], outcome.records


def test_out_of_memory_config_is_recorded(spec, tmp_path):
    from moesim.analysis.search import run_one, simulate_config
    from moesim.analysis.search_spec import load_spec
    from moesim.specs import PRESET_DIR

    text = (PRESET_DIR / "clusters" / "cpu-gloo-4.toml").read_text()
    small = tmp_path / "tiny_memory.toml"
    small.write_text(text.replace("gpu_memory_GiB = 4.0", "gpu_memory_GiB = 0.00001")
                     .replace('hardware = "cpu-gloo"', f'hardware = "{PRESET_DIR}/hardware/'
                              'cpu-gloo.toml"'))
    config = dict(load_spec(spec)[0], cluster=str(small))
    record = run_one(simulate_config, config, None)
    assert record["status"] == "oom" and record["oom"] and "GiB" in record["error"]
