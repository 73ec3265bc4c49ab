"""simulate → RunResult round trip, resume, Chrome trace, out-of-memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.errors import MoesimError, OutOfMemoryError
from moesim.ops import PHASES, STREAMS
from moesim.results import SUMMARY_COLUMNS, load_run
from moesim.simulate import simulate

from .simtoys import random_trace


@pytest.fixture
def model4(model):
    return model.replace(num_layers=2, top_k=2, tokens_per_rank=64, micro_batches=2)


def test_round_trip(tmp_path, model4, cluster):
    trace = random_trace(3)
    summary = simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "run",
                       progress=False)
    run = load_run(tmp_path / "run")
    assert run.complete and run.backend == "simulator"
    assert run.config["policy"]["name"] == "static_ep"
    assert run.config["model"]["num_layers"] == 2
    assert run.config["trace"]["meta"]["num_ranks"] == 4
    for col in SUMMARY_COLUMNS[1:]:
        np.testing.assert_allclose(run.summary[col], summary.column(col), rtol=1e-6)
    assert run["busy_s"].shape == (3, 3, len(PHASES), 4)
    np.testing.assert_array_equal(run["expert_load"],
                                  trace.counts_TLRE.reshape(3, 2, 2, 4, 4).sum(axis=(1, 3)))
    assert run.summary["tokens_total"][0] == trace.counts_TLRE[:2].sum()
    assert (run["memory_bytes"] > 0).all()
    assert set(run["components"]) >= {"weights", "grads", "optimizer", "activations"}
    # per-phase end times never exceed the step time
    ends = np.nan_to_num(run["end_s"], nan=0.0).max(axis=(1, 2, 3))
    np.testing.assert_allclose(ends, run.summary["step_time_s"], rtol=1e-6)


def test_resume_after_interruption_is_identical(tmp_path, model4, cluster):
    trace = random_trace(14, seed=5)
    kw = dict(progress=False)
    simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "full", **kw)

    def stop_at_12(row):
        if row["iteration"] == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "cut",
                 on_iteration=stop_at_12, **kw)
    assert load_run(tmp_path / "cut").manifest["status"] == "incomplete"
    rest = simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "cut",
                    resume=True, **kw)
    assert [r["iteration"] for r in rest.rows] == [13]
    a, b = load_run(tmp_path / "full"), load_run(tmp_path / "cut")
    assert b.complete
    for col in SUMMARY_COLUMNS:
        np.testing.assert_array_equal(a.summary[col], b.summary[col])
    for key in ("busy_s", "start_s", "end_s", "expert_load", "rank_tokens", "dropped",
                "memory_bytes"):
        np.testing.assert_array_equal(a[key], b[key])


def test_resume_refuses_other_config(tmp_path, model4, cluster):
    trace = random_trace(2)
    simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "r", progress=False)
    with pytest.raises(MoesimError, match="config differs"):
        simulate(trace, model4, cluster, "static_ep", out_dir=tmp_path / "r", resume=True,
                 rng_seed=9, progress=False)


def test_chrome_trace_is_valid(tmp_path, model4, cluster):
    simulate(random_trace(2), model4, cluster, "static_ep", out_dir=tmp_path / "t",
             timeline_iterations=[1], progress=False)
    doc = json.loads((tmp_path / "t" / "timeline_iter1.json").read_text())
    events = doc["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    assert {e["tid"] for e in spans} >= {STREAMS.index("compute"), STREAMS.index("comm")}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["name"] for e in spans} >= {"dense", "route", "dispatch", "expert", "combine",
                                          "expert_bwd", "grad_sync", "optimizer"}
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    assert (0, "compute") in names and (3, "comm") in names
    assert sum(e["name"] == "process_name" for e in events) == 4


def test_out_of_memory(model4, cluster):
    small = cluster.replace(gpu_memory_GiB=1e-6)
    with pytest.raises(OutOfMemoryError, match=r"rank \d+ needs .* GiB"):
        simulate(random_trace(1), model4, small, "static_ep", progress=False)
    s = simulate(random_trace(1), model4, small, "static_ep", progress=False, allow_oom=True)
    assert s.rows[0]["oom"] == 1


def test_shape_mismatch_errors(model4, cluster):
    with pytest.raises(MoesimError, match="--nodes 1"):
        simulate(random_trace(1, ranks=2), model4, cluster, "static_ep", progress=False)
    with pytest.raises(MoesimError, match="num_experts"):
        simulate(random_trace(1, experts=8), model4, cluster, "static_ep", progress=False)


def test_rank_aggregated_trace_is_spread(model4, cluster):
    from moesim.traces.format import RoutingTrace, TraceMeta

    counts = np.tile([160, 140, 120, 92], (2, 2, 1, 1))  # 256 tokens × top-2 per pass
    meta = TraceMeta(num_layers=2, num_ranks=1, num_experts=4, top_k=2, tokens_per_rank=256,
                     micro_batches_per_iteration=2, rank_resolved=False)
    s = simulate(RoutingTrace(counts, meta), model4, cluster, "static_ep", progress=False)
    assert s.rows[0]["tokens_total"] == counts.sum()
