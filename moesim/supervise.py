"""Children die with their parent: ``moesim run``'s ranks and ``moesim search``'s pool workers.

Two mechanisms, both installed in the child:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the child the moment its
  parent exits, however the parent died (SIGKILL included);
- everywhere, a daemon thread that polls the parent's pid (``os.getppid()`` changing means the
  child was re-parented; ``os.kill(pid, 0)`` failing means the named parent is gone) and kills
  the child within ``POLL_S``.

The launcher also starts each rank in a process group of its own and kills those groups on
every exit path it sees (:mod:`moesim.executor.launch`). ``PARENT_ENV`` carries the supervising
pid across ``exec`` so a rank can re-arm both mechanisms once Python is up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PARENT_ENV = "MOESIM_PARENT_PID"
POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(parent_pid: int, ppid_at_start: int) -> bool:
    return os.getppid() != ppid_at_start or not _alive(parent_pid)


def _watch(parent_pid: int, ppid_at_start: int) -> None:
    while True:
        if _orphaned(parent_pid, ppid_at_start):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(POLL_S)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this process die when ``parent_pid`` (default: its parent) does: the parent-death
    signal on Linux, plus a watchdog thread on the parent's pid. Exits at once if the parent
    is already gone."""
    parent_pid = parent_pid or os.getppid()
    set_parent_death_signal()
    ppid = os.getppid()
    if not _alive(parent_pid):
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid, ppid), daemon=True,
                     name="moesim-parent-watchdog").start()


def preexec_die_with_parent() -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that arms the parent-death signal between fork
    and exec (no threads there; the child starts the watchdog with :func:`from_environment`),
    and exits at once if the parent already died in between."""
    parent = os.getpid()

    def arm() -> None:
        set_parent_death_signal()
        if os.getppid() != parent:
            os._exit(1)

    return arm


def from_environment() -> None:
    """In a child started with ``PARENT_ENV`` set: :func:`die_with_parent` on that pid."""
    pid = os.environ.get(PARENT_ENV)
    if pid and pid.isdigit():
        die_with_parent(int(pid))


def child_env() -> dict[str, str]:
    """Environment entries that name this process as the supervising parent."""
    return {PARENT_ENV: str(os.getpid())}


def parent_gone() -> bool:
    """True when this process was started under ``PARENT_ENV`` and that parent is gone: a
    rank must then not mark its run ``complete``."""
    pid = os.environ.get(PARENT_ENV)
    return bool(pid and pid.isdigit()) and (not _alive(int(pid)) or os.getppid() != int(pid))
