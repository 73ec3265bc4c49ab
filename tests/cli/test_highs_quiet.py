"""With highspy installed, oracle_ilp solves with HiGHS by default, and HiGHS's banner (written
from C when a solver starts) stays off stdout: ``--quiet`` prints the summary line only."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_highs_is_default_and_quiet(tmp_path):
    pytest.importorskip("highspy", reason="highspy (the highs extra) is not installed")
    from moesim.policies import make_policy
    from moesim.policies.oracle_ilp import resolve_solver

    assert resolve_solver(make_policy("oracle_ilp").config.solver) == "highs"
    trace = tmp_path / "t.npz"
    run = [sys.executable, "-m", "moesim"]
    subprocess.run([*run, "trace", "synth", "--layers", "2", "--ranks", "4", "--experts", "8",
                    "--tokens-per-rank", "256", "--micro-batches", "2", "--iterations", "2",
                    "-o", str(trace)], check=True, capture_output=True)
    proc = subprocess.run([*run, "simulate", "--trace", str(trace), "--model", "tiny-cpu",
                           "--cluster", "cpu-gloo-4@1x4", "--policy", "oracle_ilp",
                           "--knob", "slots_per_rank=3", "--knob", "time_limit_s=2",
                           "--iterations", "0:1", "--quiet", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "HiGHS" not in proc.stdout and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert proc.stdout.startswith("oracle_ilp(slots_per_rank=3")
