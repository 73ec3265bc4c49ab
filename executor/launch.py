"""Start N local ranks of :mod:`moesim.executor.worker` and watch them.

It does what ``torchrun --standalone --nproc-per-node N -m moesim.executor.worker ...`` does for
one machine — the children see the same ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT`` — plus what a benchmark loop needs:

- a fresh rendezvous per run: a free TCP port picked at launch, so a crashed earlier run can
  never make the next one hang on a stale store;
- a watchdog: a rank that exits non-zero, or no rank making progress (heartbeat files) for
  ``hang_timeout_s``, ends the whole run — every child is killed with its process group — and
  raises a one-line :class:`MoesimError` naming the cause, within that bound;
- partial results are finished as ``incomplete`` (never left looking complete or running).

Rank 0's stdout is passed through; every rank's stderr (and other ranks' stdout) goes to
``<out>/.logs/`` while the run is live, which becomes ``<out>/logs/`` when the run fails and is
removed when it succeeds. The launcher owns ``<out>`` (:mod:`moesim.dirlock`) and its ranks die
with it (:mod:`moesim.supervise`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from moesim import dirlock, supervise
from moesim.errors import MoesimError

POLL_S = 0.2
LIVE_LOGS = ".logs"  # the ranks' stderr and heartbeats while the run is live
GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# glibc malloc settings for the ranks (a user's own values win): serve tensors below 256 MiB
# from the heap and keep freed memory, instead of mmap-ing each large tensor afresh and
# page-faulting it in on first touch. Measured on the CPU executor (small-cpu model, SwiftMoE,
# 2 ranks): with glibc's defaults the expert and dense GEMMs ran 11–13 % slower than the same
# GEMMs in `moesim calibrate`, because re-layouts and activations kept allocating new buffers;
# with these, within 2–4 %. Harmless on CUDA ranks (host-side allocations only).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
              "MALLOC_TOP_PAD_": str(64 << 20)}


def _rank_env(rank: int, world: int, port: int, backend: str | None = None) -> dict[str, str]:
    env = {**MALLOC_ENV, **os.environ}
    if backend:
        env["MOESIM_BACKEND"] = backend
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every still-running child's process group (each child leads its own)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable child
            pass


def _error_line(log: Path) -> str:
    """The last ``moesim: error:`` line of a rank's stderr, or its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("moesim: error:")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return line.removeprefix("moesim: error: ")


def finish_incomplete(out_dir: Path, error: str) -> None:
    """Mark a run directory that a dead run left ``running`` as ``incomplete``."""
    from moesim.results import RunWriter

    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return
    if json.loads(manifest.read_text()).get("status") != "running":
        return
    config = json.loads((out_dir / "config.json").read_text())
    RunWriter(out_dir, config, "executor", resume=True).finish("incomplete", error=error)


def launch(worker_args: list[str], world_size: int, out_dir: str | Path, *,
           hang_timeout_s: float = 120.0, module: str = "moesim.executor.worker",
           backend: str | None = None, stdout_to_stderr: bool = False) -> None:
    """Run ``python -m module worker_args`` as ``world_size`` ranks; raise on any failure.
    ``backend`` (``auto`` / ``nccl`` / ``gloo``) is passed to the ranks as ``MOESIM_BACKEND``
    (:func:`moesim.executor.worker.choose_backend`); None leaves the environment's.
    ``stdout_to_stderr``: rank 0's stdout goes to this process's stderr (``--json`` keeps
    stdout for its one document)."""
    out_dir = Path(out_dir)
    dirlock.acquire(out_dir, "run directory")
    try:
        with _terminate_as_interrupt():
            _launch_owned(worker_args, world_size, out_dir, hang_timeout_s, module, backend,
                          stdout_to_stderr)
    finally:
        dirlock.release(out_dir)


def _launch_owned(worker_args: list[str], world_size: int, out_dir: Path,
                  hang_timeout_s: float, module: str, backend: str | None,
                  stdout_to_stderr: bool = False) -> None:
    """:func:`launch` while this process owns ``out_dir``: ranks are started in process
    groups of their own, die with this process (:mod:`moesim.supervise`), and write into
    ``out_dir`` under this process's lock."""
    logs = out_dir / LIVE_LOGS  # inside the run: a SIGKILLed launcher litters nothing else
    shutil.rmtree(logs, ignore_errors=True)  # a killed earlier launcher's (we hold the lock)
    logs.mkdir()
    port = free_port()
    procs: list[subprocess.Popen] = []
    files = []
    env_extra = {**dirlock.child_env(out_dir), **supervise.child_env()}
    try:
        for r in range(world_size):
            err = open(logs / f"rank{r}.err", "wb")  # noqa: SIM115 - closed in finally
            out = None if r == 0 else open(logs / f"rank{r}.out", "wb")  # noqa: SIM115
            files += [f for f in (err, out) if f is not None]
            if r == 0 and stdout_to_stderr:
                out = 2  # this process's stderr descriptor
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, *worker_args, "--heartbeat-dir", str(logs)],
                env={**_rank_env(r, world_size, port, backend), **env_extra}, stdout=out,
                stderr=err, start_new_session=True,
                preexec_fn=supervise.preexec_die_with_parent()))
        failure = _watch(procs, logs, hang_timeout_s, time.time())
    except BaseException:
        _kill_all(procs)
        finish_incomplete(out_dir, "interrupted")
        shutil.rmtree(logs, ignore_errors=True)
        raise
    finally:
        for f in files:
            f.close()
    if failure is None:
        shutil.rmtree(logs, ignore_errors=True)
        return
    _kill_all(procs)
    finish_incomplete(out_dir, failure)
    if "exited with code" in failure or "no rank made progress" in failure:
        raise MoesimError(f"{failure} (logs: {_keep_logs(logs, out_dir)})")
    shutil.rmtree(logs, ignore_errors=True)  # a user error: its one line says it all
    raise MoesimError(failure)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While launching, SIGTERM (and SIGHUP) end the launcher like Ctrl-C does: its ranks are
    killed and the run is marked incomplete (the default action would skip both)."""
    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _keep_logs(logs: Path, out_dir: Path) -> Path:
    dest = out_dir / "logs"
    shutil.copytree(logs, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("rank?"))
    shutil.rmtree(logs, ignore_errors=True)
    return dest


def _watch(procs: list[subprocess.Popen], logs: Path, hang_timeout_s: float,
           started: float) -> str | None:
    """Wait for the ranks; ``None`` when all succeed, else a one-line reason (children may
    still be running: the caller kills them)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return None
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            _grace(procs)
            first = min(bad, key=lambda rc: _exit_order(procs[rc[0]]))
            r, code = first
            line = _error_line(logs / f"rank{r}.err")
            if code == 2 and not line:  # a user error is printed by rank 0 only
                line = _error_line(logs / "rank0.err")
            line = line or "no error message"
            return line if code == 2 else f"rank {r} exited with code {code}: {line}"
        if _idle_s(logs, len(procs), started) > hang_timeout_s:
            return (f"no rank made progress for {hang_timeout_s:.0f} s (hung collective or dead "
                    "peer); killed all ranks")
        time.sleep(POLL_S)


def _exit_order(p: subprocess.Popen) -> int:
    return 0 if p.returncode not in (None, 0, -signal.SIGKILL) else 1


def _grace(procs: list[subprocess.Popen]) -> None:
    """Give the other ranks a moment to notice the failure and exit on their own."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)


def _idle_s(logs: Path, world: int, started: float) -> float:
    """Seconds since the most recent heartbeat of any rank (or the launch)."""
    newest = started
    for r in range(world):
        try:
            newest = max(newest, (logs / f"rank{r}").stat().st_mtime)
        except FileNotFoundError:
            pass
    return time.time() - newest
