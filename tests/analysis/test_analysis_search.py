"""Search: spec expansion, crash-safe results.jsonl with resume, ranking, Pareto, constraints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moesim.analysis import ranking, search
from moesim.analysis.search_spec import EXAMPLE_SPEC, config_key, load_spec
from moesim.cli import main
from moesim.errors import MoesimError, OutOfMemoryError
from moesim.policies import available_policies

SPEC = """
[search]
traces = ["t1", "t2"]
iterations = 5

[policies.static_ep]
capacity_factor = [1.0, 1.25, "none"]

[policies.swiftmoe]
slots_per_rank = [2, 4, 8]
capacity_factor = [1.0, "bad"]
"""


def fake_eval(config: dict, run_dir: Path) -> dict:
    """Stands in for simulate: numbers from the knobs; slots 8 is OOM, 'bad' a bad knob."""
    knobs = config["knobs"]
    if knobs.get("capacity_factor") == "bad":
        raise ValueError("knob capacity_factor='bad' is not a valid float")
    slots = knobs.get("slots_per_rank", 1)
    if slots == 8:
        raise OutOfMemoryError("plan needs 99 GiB per GPU, the cluster has 80")
    cf = knobs.get("capacity_factor")
    dropless = cf in (None, "none")
    step = 0.1 / slots + (0.02 if dropless else 0.0) + (0.001 if config["trace"] == "t2" else 0)
    return {"mean_step_s": step, "p50_step_s": step, "p95_step_s": step * 1.1,
            "peak_memory_bytes": (10 + 5 * slots) * 2**30, "a2a_s": step / 3,
            "dropped_frac": 0.0 if dropless else 0.05 / float(cf), "iterations": 5,
            "status": "complete"}


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def test_toml_grid_expands_to_cartesian_product(spec):
    configs = load_spec(spec)
    assert len(configs) == (3 + 3 * 2) * 2
    assert {c["trace"] for c in configs} == {"t1", "t2"}
    assert all(c["iterations"] == 5 for c in configs)
    assert len({config_key(c) for c in configs}) == len(configs)


def test_python_spec(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text("def configs():\n"
                    "    for s in (2, 4):\n"
                    "        yield {'policy': 'swiftmoe', 'knobs': {'slots_per_rank': s}}\n")
    configs = load_spec(path)
    assert [c["knobs"] for c in configs] == [{"slots_per_rank": 2}, {"slots_per_rank": 4}]


def test_example_spec_uses_registered_policies():
    configs = load_spec(EXAMPLE_SPEC)
    assert configs and {c["policy"] for c in configs} <= set(available_policies())


@pytest.mark.parametrize("text, message", [
    ("", "declares no policies"),
    ("[search]\niterations = 3\n", "declares no policies"),
    ("[policies.nope]\ncapacity_factor = 1.0\n", "unknown policy 'nope'"),
    ("[policies.static_ep]\ncapacity_factor = []\n", "empty value list"),
    ("[polices.static_ep]\n", "unknown table"),
    ("[policies.static_ep\n", "cannot parse"),
])
def test_bad_specs(tmp_path, text, message, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MoesimError, match=message):
        load_spec(path)
    assert main(["search", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim: error:") and "\n" not in err


def test_python_spec_without_configs(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text("x = 1\n")
    with pytest.raises(MoesimError, match="must define"):
        load_spec(path)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(spec, tmp_path):
    out = tmp_path / "search"
    search.run_search(spec, out, workers=1, limit=5, evaluate=fake_eval, progress=False)
    results = out / "results.jsonl"
    first = _lines(results)
    assert len(first) == 5
    data = results.read_bytes()
    results.write_bytes(data[: len(data) - 40])  # killed mid-write of the 5th line
    with pytest.raises(MoesimError, match="--resume"):
        search.run_search(spec, out, workers=2, evaluate=fake_eval, progress=False)
    outcome = search.run_search(spec, out, workers=2, resume=True, evaluate=fake_eval,
                                progress=False)
    lines = _lines(results)
    keys = [rec["key"] for rec in lines]
    assert len(keys) == len(set(keys)) == len(load_spec(spec)) == len(outcome.records)
    assert {r["key"] for r in first[:4]} <= set(keys)
    assert lines[:4] == first[:4]  # finished results were kept as they were


def test_failures_are_recorded_not_fatal(spec, tmp_path):
    outcome = search.run_search(spec, tmp_path / "s", workers=2, evaluate=fake_eval,
                                progress=False)
    by_status: dict[str, list] = {}
    for rec in outcome.records:
        by_status.setdefault(rec["status"], []).append(rec)
    assert len(by_status["oom"]) == 2 and all(r["oom"] for r in by_status["oom"])
    assert len(by_status["error"]) == 6 and "not a valid float" in by_status["error"][0]["error"]
    assert len(by_status["ok"]) == 10
    ranked = [r for r in outcome.rows if r["rank"] != ""]
    assert [r["rank"] for r in ranked] == list(range(1, 11))
    assert ranked[0]["config"] == "swiftmoe capacity_factor=1.0 slots_per_rank=4"
    assert (tmp_path / "s" / "ranking.csv").read_text().count("\n") == 1 + 18
    assert (tmp_path / "s" / "pareto.csv").is_file()


def test_constraints_filter_the_ranking(spec, tmp_path):
    search.run_search(spec, tmp_path / "s", workers=1, evaluate=fake_eval, progress=False)
    outcome = search.load_search(tmp_path / "s", max_memory_GiB=25.0, max_drop_frac=0.045)
    feasible = [r for r in outcome.rows if r["feasible"]]
    assert feasible and all(r["peak_memory_GiB"] <= 25 and r["dropped_frac"] <= 0.045
                            for r in feasible)
    assert {r["config"] for r in feasible} == {"static_ep capacity_factor=1.25",
                                               "static_ep capacity_factor=none"}
    assert any("memory > 25 GiB" in r["violates"] for r in outcome.rows)
    assert any("drops > 0.045" in r["violates"] for r in outcome.rows)


def _row(key: str, step: float, mem: float, drop: float, status: str = "ok") -> dict:
    return {"key": key, "mean_step_s": step, "peak_memory_GiB": mem, "dropped_frac": drop,
            "status": status, "feasible": status == "ok"}


def test_pareto_front_on_a_hand_made_set():
    rows = [_row("a", 1.0, 10, 0.0),   # front: fastest dropless at 10 GiB
            _row("b", 0.5, 20, 0.0),   # front: faster, more memory
            _row("c", 0.5, 20, 0.1),   # dominated by b
            _row("d", 0.4, 30, 0.2),   # front: fastest of all
            _row("e", 1.0, 10, 0.0),   # ties a exactly: both stay
            _row("f", 2.0, 5, 0.5),    # front: least memory
            _row("g", 2.0, 11, 0.5),   # dominated by a
            _row("h", 0.1, 1, 0.0, status="oom"),  # failed: never on the front
            _row("i", 0.5, 20, math.nan)]  # unknown drops count as 0: ties b
    front = {r["key"] for r in ranking.pareto_front(rows)}
    assert front == {"a", "b", "d", "e", "f", "i"}
    assert ranking.dominates((1, 1, 0), (1, 2, 0)) and not ranking.dominates((1, 1, 0),
                                                                             (1, 1, 0))


def test_search_cli_prints_tables(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(search, "simulate_config", fake_eval)
    out = tmp_path / "s"
    assert main(["search", str(spec), "-o", str(out), "--workers", "1",
                 "--max-memory-GiB", "40"]) == 1  # some configurations failed
    text = capsys.readouterr()
    assert "Ranking by mean step time" in text.out and "Pareto front" in text.out
    assert "config(s) failed" in text.out
    assert "configs" in text.err  # the progress bar
    assert "moesim: error: 6 of 18 configuration(s) failed" in text.err
    assert main(["search", str(spec), "-o", str(out), "--resume", "--no-progress"]) == 1
    assert len(_lines(out / "results.jsonl")) == 18
