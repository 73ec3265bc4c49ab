"""Children die with their parent: `moesim run`'s ranks and `moesim search`'s pool workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .helpers import HERE, alive, children, linux_only, spawn, wait_for

LAUNCH = ("import sys; from moesim.executor.launch import launch; "
          "launch(['--out', sys.argv[1]], 2, sys.argv[1], module='sleeper_worker')")
SLOW_SPEC = """
[search]
traces = ["bundled"]
clusters = ["a100-4x8-ib800@2"]
models = ["smartmoe-gpt"]
[policies.static_ep]
capacity_factor = [1.0, 1.25, 1.5, 2.0, "none"]
"""


def _launcher(out, sleep_s: float) -> subprocess.Popen:
    env = {**os.environ, "SLEEP_S": str(sleep_s),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(out)], env=env)


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_launcher_takes_its_ranks_and_the_run_never_reads_complete(tmp_path, sig):
    out = tmp_path / "run"
    launcher = _launcher(out, sleep_s=4.0)
    wait_for(lambda: len(children(launcher.pid)) == 2 and (out / "manifest.json").exists(),
             what="two ranks and rank 0's manifest")
    ranks = children(launcher.pid)
    launcher.send_signal(sig)
    launcher.wait(timeout=30)
    wait_for(lambda: not any(alive(r) for r in ranks), timeout_s=30,
             what="the ranks to die with their launcher")
    time.sleep(4.5)  # past the moment a surviving rank 0 would have written `complete`
    assert json.loads((out / "manifest.json").read_text())["status"] != "complete"
    if sig == signal.SIGKILL:  # the live logs stay inside the (incomplete) run, not in /tmp
        assert (out / ".logs" / "rank0.err").is_file()
    else:  # SIGTERM is handled like Ctrl-C: ranks killed, run marked, logs removed
        assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
        assert not (out / ".logs").exists()


@linux_only
def test_launcher_runs_ranks_to_completion_when_nobody_kills_it(tmp_path):
    out = tmp_path / "run"
    assert _launcher(out, sleep_s=0.2).wait(timeout=60) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@linux_only
def test_sigkilled_search_leaves_no_pool_worker_behind(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SLOW_SPEC)
    search = spawn("search", spec, "-o", tmp_path / "s", "--workers", "2", "--no-progress")
    wait_for(lambda: len(children(search.pid)) >= 2, what="the search's pool workers")
    workers = children(search.pid)
    search.kill()
    search.wait(timeout=30)
    wait_for(lambda: not any(alive(w) for w in workers), timeout_s=30,
             what="the pool workers to die with the search")
