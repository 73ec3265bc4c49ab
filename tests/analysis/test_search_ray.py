"""``moesim search --ray``: the configurations as Ray tasks on a local head this module starts
(2 CPUs, loopback, no dashboard) and stops. Same records, ranking and Pareto front as the local
pool; atomic appends by the driver and resume; worker deaths retried, then reported per
configuration."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from moesim.analysis import search, search_ray
from moesim.analysis.search_spec import load_spec
from moesim.cli import main

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install "
                          "'moesim[ray]'); make test installs it")
pytestmark = pytest.mark.slow

REAL_SPEC = """
[search]
traces = ["bundled"]
models = ["smartmoe-gpt"]
clusters = ["a100-4x8-ib800@2"]
iterations = 2

[policies.static_ep]
capacity_factor = [1.0, "none"]

[policies.swiftmoe]
slots_per_rank = [4]
capacity_factor = ["none"]
"""


@pytest.fixture(scope="module", autouse=True)
def ray_head():
    """A local Ray head for this module: 2 CPUs on loopback, no dashboard; torn down after."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _table(rows: list[dict]) -> list[tuple]:
    return [(r["key"], r["rank"], r["mean_step_s"], r["peak_memory_GiB"], r["status"])
            for r in rows]


def test_ray_gives_the_local_pools_ranking_and_front(tmp_path):
    spec = _spec(tmp_path, REAL_SPEC)
    local = search.run_search(spec, tmp_path / "local", workers=2, progress=False)
    on_ray = search.run_search(spec, tmp_path / "ray", progress=False, ray="auto")
    assert len(on_ray.records) == len(load_spec(spec)) == 3
    assert all(r["status"] == "ok" for r in on_ray.records)
    assert _table(on_ray.rows) == _table(local.rows)
    assert _table(on_ray.front) == _table(local.front)
    assert ((tmp_path / "ray" / "ranking.csv").read_text()
            == (tmp_path / "local" / "ranking.csv").read_text())


def fake_eval(config: dict, run_dir: Path | None) -> dict:
    """Numbers from the knobs; ``slots_per_rank = 99`` kills its worker every time, ``= 7``
    kills it on the first try only (a marker file remembers the try)."""
    slots = config["knobs"]["slots_per_rank"]
    marker = Path(config["trace"]) / f"tried-{slots}"
    if slots == 99 or (slots == 7 and not marker.exists()):
        marker.touch()
        os._exit(1)                                  # the worker process dies
    return {"mean_step_s": 1.0 / slots, "p50_step_s": 1.0 / slots, "p95_step_s": 1.0 / slots,
            "peak_memory_bytes": slots * 2**30, "a2a_s": 0.0, "dropped_frac": 0.0,
            "iterations": 1, "status": "complete"}


def _fake_spec(tmp_path: Path, slots: list[int]) -> Path:
    return _spec(tmp_path, f'[search]\ntraces = ["{tmp_path}"]\n\n'
                           f"[policies.swiftmoe]\nslots_per_rank = {slots}\n")


def test_resume_after_a_killed_driver_loses_nothing(tmp_path):
    spec, out = _fake_spec(tmp_path, [1, 2, 3, 4, 5]), tmp_path / "s"
    search.run_search(spec, out, limit=3, evaluate=fake_eval, progress=False, ray="auto")
    results = out / "results.jsonl"
    first = _lines(results)
    assert len(first) == 3
    data = results.read_bytes()
    results.write_bytes(data[:len(data) - 30])       # the driver died mid-append
    outcome = search.run_search(spec, out, resume=True, evaluate=fake_eval, progress=False,
                                ray="auto")
    keys = [rec["key"] for rec in _lines(results)]
    assert len(keys) == len(set(keys)) == 5 == len(outcome.records)
    assert _lines(results)[:2] == first[:2]


def test_dead_workers_are_retried_then_reported_per_config(tmp_path, capsys):
    spec = _fake_spec(tmp_path, [2, 7, 99])
    outcome = search.run_search(spec, tmp_path / "s", evaluate=fake_eval, progress=True,
                                ray="auto")
    by_slots = {r["config"]["knobs"]["slots_per_rank"]: r for r in outcome.records}
    assert by_slots[2]["status"] == by_slots[7]["status"] == "ok"   # 7: its retry succeeded
    assert by_slots[99]["status"] == "error"
    assert f"worker failed after {search_ray.DEFAULT_RETRIES} retries" in by_slots[99]["error"]
    assert [r["rank"] for r in outcome.rows] == [1, 2, ""]
    assert "3/3 configs" in capsys.readouterr().err            # progress as results came


def test_cli_runs_on_ray(tmp_path, capsys, monkeypatch):
    spec = _fake_spec(tmp_path, [1, 2])
    monkeypatch.setattr(search, "simulate_config", fake_eval)
    assert main(["search", str(spec), "-o", str(tmp_path / "s"), "--ray", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Ranking by mean step time" in out and "2 of 2 configs meet" in out
