"""Safe file I/O shared by every command: atomic writes, honest permissions, guarded paths.

- :func:`atomic_write_bytes` writes a temp file beside the target, fsyncs it, gives it the
  user's ``0666 & ~umask`` mode (``mkstemp`` makes 0600, which teammates on a shared filesystem
  cannot read) and ``os.replace``-s it into place: readers see the old file or the new one.
- :func:`writing` turns an ``OSError`` raised while producing an output (no space left, name
  too long, permission denied, is a directory) into a one-line :class:`MoesimError` naming the
  output the user asked for, never the temp file.
- :func:`check_input_kind` refuses FIFOs, sockets and devices given as inputs: reading one
  blocks forever or never ends.
- :func:`check_outputs_not_inputs` refuses an output that is, or lies inside, one of the
  command's inputs (symlinks resolved), before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from moesim.errors import MoesimError

PathLike = str | os.PathLike


def current_umask() -> int:
    """This process's umask (read from /proc where possible: ``os.umask`` has to set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory: ``0777 & ~umask``."""
    return 0o777 & ~current_umask()


def os_error_line(exc: OSError, path: PathLike, action: str = "write") -> str:
    """One line for an ``OSError`` met while producing ``path``, with the usual fix."""
    fixes = {errno.ENOSPC: "free space on that filesystem or write elsewhere",
             errno.EDQUOT: "free space on that filesystem or write elsewhere",
             errno.ENAMETOOLONG: "choose a shorter file name",
             errno.EACCES: "choose a directory you can write to",
             errno.EPERM: "choose a directory you can write to",
             errno.EROFS: "that filesystem is read-only; write elsewhere",
             errno.EISDIR: "it is a directory; name a file",
             errno.ENOTDIR: "a parent of it is a file, not a directory; fix the path",
             errno.ENOENT: "check that its directory exists"}
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot {action} {path}: {reason}; {fixes.get(exc.errno, 'check the path')}"


@contextlib.contextmanager
def writing(path: PathLike, action: str = "write") -> Iterator[None]:
    """Context in which an ``OSError`` becomes a one-line MoesimError naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise MoesimError(os_error_line(exc, path, action)) from None


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half;
    the file gets the user's umask. OS errors name ``path``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            fh.write(data)
    return path


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str = ".tmp") -> Iterator:
    """An open binary temp file beside ``path``; on success it is fsynced, given the user's
    umask and moved onto ``path``; on any error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish(path: PathLike) -> Path:
    """Give an existing file the user's ``0666 & ~umask`` mode; returns its path."""
    path = Path(path)
    os.chmod(path, file_mode())
    return path


def check_input_kind(path: PathLike, what: str = "input") -> Path:
    """``path`` if it is a regular file or a directory (symlinks followed); a FIFO, socket or
    device would block or never end, so it is refused. A missing path is left to the caller."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise MoesimError(os_error_line(exc, path, f"read {what}")) from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise MoesimError(f"{what} {path} is {kind}; give a regular file or a directory")
    return path


def _resolved(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def output_clash(output: PathLike, inputs: Sequence[PathLike]) -> PathLike | None:
    """The first of ``inputs`` that ``output`` is, or lies inside (symlinks resolved)."""
    out = _resolved(output)
    for inp in inputs:
        if not os.path.exists(inp):
            continue
        res = _resolved(inp)
        if out == res or (res.is_dir() and res in out.parents):
            return inp
    return None


def check_outputs_not_inputs(outputs: Mapping[str, PathLike],
                             inputs: Mapping[str, Sequence[PathLike]]) -> None:
    """Refuse any output that is, or lies inside, an input: writing it would destroy that
    input. ``outputs`` maps a flag to a path, ``inputs`` a flag to its paths."""
    for oflag, out in outputs.items():
        for iflag, paths in inputs.items():
            clash = output_clash(out, paths)
            if clash is None:
                continue
            where = "is" if _resolved(out) == _resolved(clash) else "lies inside"
            raise MoesimError(f"{oflag} {out} {where} the input {clash} ({iflag}); writing "
                              f"it would destroy that input; choose another {oflag}")


# Namespace attributes that name what a command writes; every other string or path attribute
# naming an existing file or directory is one of its inputs.
OUTPUT_DESTS = ("out", "output", "raw", "report")
NOT_PATHS = ("func", "command", "trace_command", "heartbeat_dir")


def guard_arguments(args: object) -> None:
    """Check a parsed command line before it runs: inputs must be regular files or
    directories, and no output may be, or lie inside, an input."""
    values = {k: v for k, v in vars(args).items() if k not in NOT_PATHS}
    outputs = {f"--{k.replace('_', '-')}": v for k, v in values.items()
               if k in OUTPUT_DESTS and isinstance(v, (str, os.PathLike)) and os.fspath(v)}
    inputs: dict[str, list] = {}
    for key, value in values.items():
        if key in OUTPUT_DESTS:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        paths = [v for v in items if isinstance(v, (str, os.PathLike)) and os.fspath(v)
                 and _exists(v)]
        for p in paths:
            check_input_kind(p, f"input {key}")
        if paths:
            inputs[key] = paths
    check_outputs_not_inputs(outputs, inputs)


def _exists(value: PathLike) -> bool:
    try:
        return os.path.lexists(value)
    except (ValueError, OSError):  # NUL bytes, names too long
        return False
