"""``moesim run --json`` and ``moesim validate --json`` on 2 gloo ranks (a few seconds). Output is
captured at the file descriptors, so what the ranks print counts too: stdout holds the JSON only."""

from __future__ import annotations

import csv
import json

import pytest

from moesim.cli import main

pytest.importorskip("torch", reason="the executor needs torch")


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "tiny2.npz"
    assert main(["trace", "synth", "--layers", "2", "--ranks", "2", "--experts", "8",
                 "--tokens-per-rank", "256", "--micro-batches", "2", "--iterations", "2",
                 "-o", str(path)]) == 0
    return path


@pytest.mark.slow
def test_run_json(tiny2, tmp_path, capfd):
    capfd.readouterr()
    out = tmp_path / "r"
    assert main(["run", "--trace", str(tiny2), "--model", "tiny-cpu", "--world-size", "2",
                 "--iterations", "0:1", "--out", str(out), "--json"]) == 0
    printed = capfd.readouterr()
    doc = json.loads(printed.out)
    s = doc["summary"]
    assert s["backend"] == "executor" and s["status"] == "complete" and s["iterations"] == 1
    assert s["policy"] == "static_ep" and s["mean_step_time_s"] > 0
    rows = list(csv.DictReader(open(out / "iterations.csv")))
    assert [r["iteration"] for r in doc["iterations"]] == [int(r["iteration"]) for r in rows]
    # the summary line (stderr under --json) names the overload as simulate's does
    line = printed.err.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}: 1 iterations")
    mean = sum(r["overload_mean"] for r in doc["iterations"]) / len(doc["iterations"])
    assert f"overload {mean:.2f} (max " in line and ", imbalance " in line
    assert s["mean_overload"] == pytest.approx(mean)
    assert s["max_overload"] == max(r["overload_max"] for r in doc["iterations"])


@pytest.mark.slow
def test_validate_json(tiny2, tmp_path, capfd):
    """``validate --json`` prints the schema of docs/cli.md on stdout, the tables on stderr,
    and its rows are validation.csv's."""
    capfd.readouterr()
    out = tmp_path / "v"
    assert main(["validate", "--traces", str(tiny2), "--policies", "static_ep",
                 "--world-sizes", "2", "--iterations", "0:1", "--model", "tiny-cpu",
                 "--warmup", "0", "--out", str(out), "--json"]) == 0
    printed = capfd.readouterr()
    doc = json.loads(printed.out)
    assert "step MAPE" in printed.err and "step MAPE" not in printed.out
    assert doc["out_dir"] == str(out) and len(doc["configs"]) == 1
    cfg = doc["configs"][0]
    assert {k: cfg[k] for k in ("name", "trace", "policy", "world_size")} == {
        "name": "tiny2-static_ep-w2", "trace": "tiny2", "policy": "static_ep", "world_size": 2}
    assert cfg["rows"][0]["quantity"] == "step"
    assert cfg["step_mape_pct"] == pytest.approx(cfg["rows"][0]["mape_pct"])
    assert cfg["step_max_pct"] >= cfg["step_mape_pct"] >= 0
    assert {"expert", "dispatch", "combine"} <= {r["quantity"] for r in cfg["rows"]}
    csv_rows = list(csv.DictReader(open(out / "validation.csv")))
    assert [r["quantity"] for r in csv_rows] == [r["quantity"] for r in cfg["rows"]]
    for row, rec in zip(cfg["rows"], csv_rows, strict=True):
        assert float(rec["mape_pct"]) == pytest.approx(row["mape_pct"])
        assert set(row) == {"quantity", "predicted_s", "measured_s", "mape_pct", "max_pct"}
