"""Helpers for the reliability tests: run the CLI in-process or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moesim.cli import main

HERE = Path(__file__).parent


def cli(*argv: str, capsys=None) -> tuple[int, str]:
    """Run ``moesim ARGV`` in this process; returns ``(exit code, stderr)`` when capturing."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def spawn(*argv: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``python -m moesim ARGV`` as a real process (stdout/stderr piped)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "moesim", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                            text=True, **kwargs)


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


linux_only = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="needs Linux /proc to find child processes")
