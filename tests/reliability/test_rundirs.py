"""Damaged run directories give one line naming the file; unfinished ones can be replaced;
after --resume the summary describes the whole run."""

from __future__ import annotations

import json

import pytest

from .helpers import cli

RUN = ("simulate", "--iterations", "0:12", "--quiet")


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    assert cli(*RUN, "--out", out)[0] == 0
    return out


def _damage(out, what: str) -> str:
    if what == "manifest-list":
        (out / "manifest.json").write_text("[1]")
        return "manifest.json"
    if what == "manifest-text":
        (out / "manifest.json").write_text("{not json")
        return "manifest.json"
    if what == "config":
        (out / "config.json").write_bytes(b"\x00\xff garbage")
        return "config.json"
    if what == "csv":
        (out / "iterations.csv").write_bytes(b"\x00\x01\x02\xff" * 50)
        return "iterations.csv"
    if what == "times":
        data = (out / "times.npz").read_bytes()
        (out / "times.npz").write_bytes(data[: len(data) // 2])
        return "times.npz"
    part = sorted((out / "parts").glob("part-*.npz"))[-1]
    part.write_bytes(part.read_bytes()[:100])
    return part.name


@pytest.mark.parametrize("what", ["manifest-list", "manifest-text", "config", "csv", "times",
                                  "part"])
def test_damaged_run_directory_gives_one_line_naming_the_file(run_dir, tmp_path, capsys, what):
    name = _damage(run_dir, what)
    commands = [("plot", "step_time", run_dir, "-o", tmp_path / "f.png"),
                ("report", run_dir, "-o", tmp_path / "r.html")]
    if what in ("manifest-list", "manifest-text", "config", "part"):
        commands.append((*RUN, "--out", run_dir, "--resume"))
    capsys.readouterr()
    for argv in commands:
        code, err = cli(*argv, capsys=capsys)
        if what == "part" and argv[0] != "simulate":
            assert code == 0  # plot and report read the consolidated files, not the parts
            continue
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and name in lines[0], (argv, err)
        assert "re-run" in lines[0] or "delete" in lines[0]


def test_a_run_directory_with_no_finished_iteration_is_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli("simulate", "--out", out, "--iterations", "0:3", "--quiet", "--nodes", "2",
                    "--policy", "swiftmoe", "--knob", "slots_per_rank=1", capsys=capsys)
    assert code == 2 and json.loads((out / "manifest.json").read_text())["iterations"] == []
    assert cli("simulate", "--out", out, "--iterations", "0:3", "--quiet")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_run_with_finished_iterations_is_never_replaced(run_dir, capsys):
    code, err = cli(*RUN, "--out", run_dir, "--seed", "3", capsys=capsys)
    assert code == 2 and "not empty" in err


def test_summary_after_resume_describes_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("simulate", "--out", out, "--iterations", "0:12", "--quiet")[0] == 0
    whole = capsys.readouterr().out.strip().splitlines()[-1]
    (out / "manifest.json").write_text(json.dumps({**json.loads(
        (out / "manifest.json").read_text()), "status": "running"}))
    parts = sorted((out / "parts").glob("part-*.npz"))
    parts[-1].unlink()  # as if killed after the first chunk of 10
    assert cli("simulate", "--out", out, "--iterations", "0:12", "--quiet", "--resume")[0] == 0
    resumed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "12 iterations" in resumed and resumed == whole
