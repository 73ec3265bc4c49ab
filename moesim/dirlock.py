"""One owner per output directory: an advisory ``flock`` on a lock file inside it.

A run directory (``moesim simulate`` / ``run``) or a search directory (``moesim search``) is
written by one process at a time. :class:`DirLock` takes an exclusive, non-blocking
``fcntl.flock`` on ``DIR/.moesim.lock`` and writes the holder (pid, host, command) into it; a
second process fails at once with one line naming that holder. The kernel drops the lock when
its holder exits, however it dies (SIGKILL included), so a stale file never blocks anyone. On
release the file is removed; a process that opened it just before re-checks, after locking,
that the file it holds is still the one at the path, and retries otherwise.

A process may re-enter a lock it holds (the count is per process), and children started by
the holder (``moesim run``'s ranks) are told through ``MOESIM_OWNED_DIRS`` that their parent
owns a directory; they write into it without locking only while the lock file names their
parent as holder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from moesim.errors import MoesimError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

LOCK_NAME = ".moesim.lock"
OWNED_ENV = "MOESIM_OWNED_DIRS"
_HELD: dict[str, tuple[int, int]] = {}  # resolved dir -> (fd, depth); this process's locks


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def holder(directory: str | os.PathLike) -> dict:
    """What the lock file of ``directory`` says about its holder (``{}`` if nothing)."""
    try:
        data = json.loads((Path(directory) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    cmd = str(info.get("command", ""))
    cmd = cmd if len(cmd) <= 80 else cmd[:77] + "..."
    return f"pid {info.get('pid')} on {info.get('host')} ({cmd})"


def _owned_by_parent(directory: Path) -> bool:
    owned = os.environ.get(OWNED_ENV, "").split(os.pathsep)
    return _key(directory) in owned and holder(directory).get("pid") == os.getppid()


def acquire(directory: str | os.PathLike, what: str = "directory") -> None:
    """Own ``directory`` (created if missing) or raise a one-line MoesimError naming the
    process that does. Re-entrant within a process; pair each call with :func:`release`."""
    directory = Path(directory)
    key = _key(directory)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        return
    from moesim.safeio import writing

    with writing(directory, f"create {what}"):
        directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None or _owned_by_parent(directory):
        _HELD[key] = (-1, 1)
        return
    with writing(directory / LOCK_NAME, f"lock {what}"):
        _HELD[key] = (_lock_fd(directory, what), 1)


def _lock_fd(directory: Path, what: str) -> int:
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoesimError(f"{what} {directory} is in use by {_describe(holder(directory))};"
                              " wait for it to finish (or stop it), or choose another "
                              "output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def release(directory: str | os.PathLike) -> None:
    """Drop one hold of ``directory``; the last one removes the lock file and unlocks."""
    key = _key(Path(directory))
    if key not in _HELD:
        return
    fd, depth = _HELD.pop(key)
    if depth > 1:
        _HELD[key] = (fd, depth - 1)
        return
    if fd >= 0:
        try:
            os.unlink(Path(directory) / LOCK_NAME)
        except OSError:
            pass
        os.close(fd)


def child_env(directory: str | os.PathLike) -> dict[str, str]:
    """Environment entries telling children that this process owns ``directory``."""
    owned = [d for d in os.environ.get(OWNED_ENV, "").split(os.pathsep) if d]
    return {OWNED_ENV: os.pathsep.join([*owned, _key(Path(directory))])}


class DirLock:
    """``with DirLock(dir, "search directory"):`` — :func:`acquire` / :func:`release`."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory") -> None:
        self.directory, self.what = Path(directory), what

    def __enter__(self) -> DirLock:
        acquire(self.directory, self.what)
        return self

    def __exit__(self, *exc: object) -> None:
        release(self.directory)
