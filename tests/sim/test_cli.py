"""``moesim simulate`` on the command line: defaults, output, and one-line errors."""

from __future__ import annotations

import pytest

from moesim import traces
from moesim.cli import main
from moesim.results import load_run
from moesim.traces.io import save_trace
from moesim.traces.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def smartmoe_shaped(tmp_path_factory):
    """A trace with the bundled trace's shape (24 layers, 16 ranks, 32 experts, top-2, 4 mb)."""
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    save_trace(synthesize(SynthConfig(num_iterations=2), rng=1), path)
    return path


def test_defaults_with_a_trace(tmp_path, monkeypatch, capsys, smartmoe_shaped):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--trace", str(smartmoe_shaped), "--nodes", "2",
                 "--out", "run", "--timeline", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["iter", "step", "ms"]
    assert len(out) == 1 + 2 + 1 and out[-1].startswith("static_ep on a100-4x8-ib800@2x8: 2 it")
    run = load_run(tmp_path / "run")
    assert run.complete and len(run.summary["step_time_s"]) == 2
    assert (tmp_path / "run" / "timeline_iter0.json").is_file()


@pytest.mark.skipif(not hasattr(traces, "bundled_trace_path"), reason="no bundled trace yet")
def test_no_arguments_runs_bundled_trace(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--iterations", "0:2", "--quiet"]) == 0
    assert "static_ep on a100-4x8-ib800@2x8" in capsys.readouterr().out
    assert list((tmp_path / "moesim-runs").iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["--policy", "no_such_policy"], "unknown policy"),
    (["--knob", "bogus=1"], "has no knob 'bogus'"),
    (["--knob", "capacity_factor"], "is not K=V"),
    (["--knob", "capacity_factor=-2"], "capacity_factor must be > 0"),
    (["--iterations", "5:2"], "selects nothing"),
    (["--iterations", "x:y"], "not A:B"),
    (["--iterations", "100:200"], "outside the trace"),
    (["--model", "no-such-model"], "no models preset"),
    (["--cluster", "no-such-cluster"], "no clusters preset"),
    (["--nodes", "3"], "pass --nodes 2"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, smartmoe_shaped, argv, needle):
    base = ["simulate", "--trace", str(smartmoe_shaped), "--out", str(tmp_path / "o")]
    if "--nodes" not in argv:
        base += ["--nodes", "2"]
    assert main(base + argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moesim: error:") and needle in err[0]
    assert captured.out == ""


def test_missing_trace_file(tmp_path, capsys):
    assert main(["simulate", "--trace", str(tmp_path / "nope.npz")]) == 2
    assert "no trace file" in capsys.readouterr().err
