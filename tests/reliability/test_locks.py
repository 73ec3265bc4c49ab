"""One owner per run or search directory: a second process fails at once, naming the holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from moesim import dirlock
from moesim.errors import MoesimError
from moesim.results import RunWriter

from .helpers import spawn, wait_for

HOLD = ("import sys, time; from moesim import dirlock; dirlock.acquire(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)")
SPEC = """
[search]
traces = ["bundled"]
clusters = ["a100-4x8-ib800@2"]
models = ["smartmoe-gpt"]
iterations = 3
[policies.static_ep]
capacity_factor = [1.0, 1.25, 1.5, "none"]
"""


def _holder(path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_in_another_process_fails_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(MoesimError, match=rf"in use by pid {proc.pid} on "):
            RunWriter(tmp_path / "run", {"a": 1}, "simulator")
    finally:
        proc.kill()
        proc.wait()
    RunWriter(tmp_path / "run", {"a": 1}, "simulator").finish()  # the kernel dropped the lock
    assert not (tmp_path / "run" / dirlock.LOCK_NAME).exists()


def test_lock_is_reentrant_within_a_process_and_released_by_the_last_hold(tmp_path):
    dirlock.acquire(tmp_path)
    dirlock.acquire(tmp_path)
    dirlock.release(tmp_path)
    assert json.loads((tmp_path / dirlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    dirlock.release(tmp_path)
    assert not (tmp_path / dirlock.LOCK_NAME).exists()


def test_two_simulate_resume_on_one_out_second_fails_and_no_iteration_is_duplicated(tmp_path):
    out = tmp_path / "run"
    argv = ("simulate", "--out", out, "--iterations", "0:12", "--quiet", "--resume")
    first = spawn(*argv)
    wait_for(lambda: (out / dirlock.LOCK_NAME).exists(), what="the first run to lock --out")
    os.kill(first.pid, signal.SIGSTOP)  # hold it inside its run: the race, made certain
    try:
        second = spawn(*argv)
        _, err = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert err.strip().count("\n") == 0 and f"in use by pid {first.pid}" in err
    stdout, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["iterations"] == list(range(12))
    rows = (out / "iterations.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 12


def test_two_searches_on_one_directory_run_each_configuration_once(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "search"
    argv = ("search", spec, "-o", out, "--workers", "1", "--no-progress", "--resume")
    first = spawn(*argv)
    wait_for(lambda: (out / dirlock.LOCK_NAME).exists(), what="the first search to lock -o")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = spawn(*argv)
        _, err = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and f"in use by pid {first.pid}" in err
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    keys = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(keys) == 4 and len(set(keys)) == 4
