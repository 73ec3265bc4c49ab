"""The scripting side of the CLI: names that round-trip from search rows into simulate,
``--json`` output, ``--config`` repeats, ``moesim policies``, aliases, a closed pipe."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.policies import available_policies, make_policy
from moesim.specs import load_cluster


def test_cluster_shape_names_load_everywhere():
    two = load_cluster("a100-4x8-ib800@2")
    assert (two.num_nodes, two.gpus_per_node, two.name) == (2, 8, "a100-4x8-ib800@2x8")
    same = load_cluster(two.name)  # what summaries print reads back
    assert (same.num_nodes, same.gpus_per_node) == (2, 8)
    small = load_cluster("a100-4x8-ib800@1x4")
    assert (small.num_nodes, small.gpus_per_node, small.name) == (1, 4, "a100-4x8-ib800@1x4")
    assert small.with_shape(3).name == "a100-4x8-ib800@3x4"  # no stacked @ suffixes
    for bad in ("a100-4x8-ib800@", "a100-4x8-ib800@two", "a100-4x8-ib800@0"):
        with pytest.raises(MoesimError, match="NAME@NODES|>= 1"):
            load_cluster(bad)


def test_a_search_row_pastes_into_simulate(tmp_path, monkeypatch, capsys):
    """Search rows name the trace ``bundled`` and clusters ``NAME@NODES``."""
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--trace", "bundled", "--cluster", "a100-4x8-ib800@2",
                 "--policy", "static_ep", "--iterations", "0:1", "--quiet", "--out", "a"]) == 0
    assert main(["simulate", "--iterations", "0:1", "--quiet", "--out", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("->")[0] == lines[1].split("->")[0]  # the same run as the default
    assert main(["simulate", "--trace", "bundled", "--cluster", "a100-4x8-ib800@2x8",
                 "--iterations", "0:1", "--quiet", "--out", "c"]) == 0


def test_explicit_full_cluster_is_not_silently_resized(tmp_path, monkeypatch, capsys):
    """The 2-node default applies only when --cluster is not given: a pasted full-size name
    means the full size, and the bundled trace's 16 ranks on its 32 GPUs are refused."""
    monkeypatch.chdir(tmp_path)
    rc = main(["simulate", "--cluster", "a100-4x8-ib800", "--iterations", "0:1", "--quiet"])
    assert rc == 2 and "has 32 GPUs" in capsys.readouterr().err


def test_simulate_json_is_the_summary_and_the_csv_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--iterations", "0:2", "--json", "--out", "r",
                 "--policy", "swiftmoe", "--knob", "capacity_factor=1.0"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert "swiftmoe(capacity_factor=1.0) on" in cap.err  # the human line goes to stderr
    s = doc["summary"]
    assert s["policy"] == "swiftmoe" and s["knobs"]["capacity_factor"] == 1.0
    assert s["iterations"] == 2 and 0 < s["dropped_fraction"] < 1
    with open(tmp_path / "r" / "iterations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in doc["iterations"]] == [int(r["iteration"]) for r in rows]
    for mine, theirs in zip(doc["iterations"], rows, strict=True):
        assert set(mine) == set(theirs)
        assert all(float(theirs[k]) == pytest.approx(mine[k]) for k in theirs)
    step = sum(float(r["step_time_s"]) for r in rows) / len(rows)
    assert s["mean_step_time_s"] == pytest.approx(step)


def test_config_repeats_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--iterations", "1:3", "--policy", "eplb", "--knob", "interval=1",
                 "--seed", "3", "--cluster", "a100-4x8-ib800@2", "--out", "one",
                 "--quiet"]) == 0
    assert main(["simulate", "--config", "one/config.json", "--out", "two", "--quiet"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.split("->")[0] == second.split("->")[0]
    a = list(csv.DictReader(open(tmp_path / "one" / "iterations.csv")))
    b = list(csv.DictReader(open(tmp_path / "two" / "iterations.csv")))
    for ra, rb in zip(a, b, strict=True):
        ra.pop("planner_time_s"), rb.pop("planner_time_s")  # the planner's wall time, measured
        assert ra == rb
    assert (json.loads((tmp_path / "one" / "config.json").read_text())
            == json.loads((tmp_path / "two" / "config.json").read_text()))
    assert main(["simulate", "--config", "one/config.json", "--policy", "static_ep"]) == 2
    assert "drop --policy" in capsys.readouterr().err
    assert main(["simulate", "--config", "nowhere/config.json"]) == 2


def test_policies_lists_every_registered_policy(capsys):
    assert main(["policies", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == available_policies()
    for entry in entries:
        assert entry["description"]
        for knob in entry["knobs"]:
            assert knob["valid"] and "valid" in knob and "default" in knob
            # the default is accepted, by construction of the probe
            make_policy(entry["name"], {knob["name"]: knob["default"]})
    by = {e["name"]: {k["name"]: k for k in e["knobs"]} for e in entries}
    assert by["oracle_ilp"]["mip_gap"]["valid"] == "[0, 1)"
    assert by["eplb"]["interval"]["valid"] == "integer >= 1"
    assert by["static_ep"]["capacity_factor"]["valid"] == "> 0, or none"
    assert by["static_ep"]["capacity_rule"]["valid"].startswith("one of megatron")
    assert by["flexmoe"]["threshold"]["valid"] == ">= 1"
    assert main(["policies"]) == 0
    assert "swiftmoe:" in capsys.readouterr().out


def test_every_policy_is_dropless_by_default():
    for name in available_policies():
        config = make_policy(name).config
        assert getattr(config, "capacity_factor", None) is None, name


def test_unknown_knob_points_to_the_listing():
    with pytest.raises(MoesimError, match="moesim policies swiftmoe"):
        make_policy("swiftmoe", {"bogus": "1"})


def test_old_flag_spellings_still_work(tmp_path):
    from moesim.cli import build_parser

    p = build_parser()
    a = p.parse_args(["trace", "synth", "--out", str(tmp_path / "x.npz")])
    b = p.parse_args(["trace", "synth", "-o", str(tmp_path / "x.npz")])
    assert a.output == b.output
    assert p.parse_args(["report", "r", "--output", "x.html"]).out == "x.html"
    assert p.parse_args(["calibrate", "--reps", "3"]).reps == 3
    assert p.parse_args(["calibrate", "--repeats", "3"]).reps == 3
    run = ["run", "--trace", "t", "--model", "m", "--out", "o"]
    assert p.parse_args([*run, "--timeout", "9"]).timeout_s == 9.0


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "(default: 120.0)" in capsys.readouterr().out  # --hang-timeout-s, no help text


def test_closed_pipe_ends_quietly():
    """``moesim policies --json | head -1``: no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "moesim", "policies", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "Broken" not in err
