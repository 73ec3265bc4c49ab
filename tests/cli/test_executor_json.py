"""``moesim run --json`` and ``moesim validate --json`` on 2 gloo ranks (a few seconds)."""

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
def test_run_json(tiny2, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "r"
    assert main(["run", "--trace", str(tiny2), "--model", "tiny-cpu", "--world-size", "2",
                 "--iterations", "0:1", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = doc["summary"]
    assert s["backend"] == "executor" and s["status"] == "complete" and s["iterations"] == 1
    assert s["policy"] == "static_ep" and s["mean_step_time_s"] > 0
    rows = list(csv.DictReader(open(out / "iterations.csv")))
    assert [r["iteration"] for r in doc["iterations"]] == [int(r["iteration"]) for r in rows]
