"""Reading and writing routing traces (format: :mod:`moesim.traces.format`).

Two forms, chosen by the path:

- ``*.npz`` — one zip archive with arrays ``counts``, optional ``topk`` and ``meta_json`` (uint8
  UTF-8 JSON). Read with ``allow_pickle=False``: a trace file can never run code.
- any other path — a directory with ``meta.json``, ``counts.npy`` and optional ``topk.npy``;
  ``counts.npy`` holds the narrowest of uint16 / int32 / int64 that fits ``tokens_per_rank ·
  top_k`` (no count exceeds its row's sum: :func:`count_dtype`; older directories hold int64,
  and any integer type loads). The arrays are memory-mapped read-only on load
  (``np.load(mmap_mode="r")``), for traces larger than RAM. Loading validates them a chunk of
  passes at a time, and the readers (``simulate``, ``trace info``) take an iteration or a chunk
  at a time and release the pages after it (:mod:`moesim.traces.stream`), so memory stays
  bounded; what they read is widened (uint16 to int64: ``moesim.simulate.iteration_counts``).
  :class:`TraceDirWriter` writes this form a chunk of passes at a time (``trace synth`` to a
  directory uses it).

Writes are atomic (:class:`TraceDirWriter` too): a ``.npz`` goes to a temporary file in the
target's directory and is moved into place with ``os.replace``; a directory is built under a
temporary name beside the target and renamed. A crash leaves either the old trace or the new
one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from moesim import bounds
from moesim.errors import MoesimError, TraceError
from moesim.safeio import atomic_file, check_input_kind, dir_mode, file_mode, writing
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.validate import (
    check_chunk,
    meta_from_dict,
    validate,
    validate_in_chunks,
    validate_meta,
)

META_FILE = "meta.json"
COUNTS_FILE = "counts.npy"
TOPK_FILE = "topk.npy"
COUNT_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.int64))

# What a corrupt or truncated file can raise inside numpy / zipfile / json.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
                UnicodeDecodeError, OverflowError, MemoryError, TypeError, RuntimeError,
                SyntaxError, tokenize.TokenError, RecursionError)


def _check_headers(check, path: Path) -> None:
    """Run a :mod:`moesim.bounds` header check; its refusal becomes a TraceError."""
    try:
        check(path)
    except TraceError:
        raise
    except MoesimError as exc:
        raise TraceError(str(exc)) from None
    except OSError:
        pass  # unreadable: the loader reports it


def count_dtype(meta: TraceMeta) -> np.dtype:
    """The on-disk type of a directory trace's counts: the narrowest of uint16, int32, int64
    that holds ``tokens_per_rank · top_k``, the most a row (so any count) can hold."""
    budget = meta.tokens_per_rank * meta.top_k
    return next(d for d in COUNT_DTYPES if budget <= np.iinfo(d).max)


def save_trace(trace: RoutingTrace, path: str | os.PathLike) -> Path:
    """Validate ``trace`` and write it to ``path`` atomically; return the path.

    ``*.npz`` writes one compressed archive, any other path a directory (see the module
    docstring). An existing trace (or empty directory) at ``path`` is replaced; a directory
    holding anything else is refused.
    """
    validate(trace)
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            _save_npz(trace, path)
        else:
            _save_dir(trace, path)
    return path


def load_trace(path: str | os.PathLike, stop_iteration: int | None = None) -> RoutingTrace:
    """Read and validate a trace written by :func:`save_trace` (``.npz`` file or directory);
    the name ``bundled`` is the bundled trace (:func:`moesim.traces.bundled.named_trace_path`).

    ``stop_iteration``: the caller reads iterations before it only (``simulate --iterations
    A:B`` reads ``0 … B−1``: the run and the policies' history), so a directory trace's counts
    are validated up to there and the rest is never read; the whole trace is still returned.
    """
    path = Path(path)
    if not path.exists():
        from moesim.traces.bundled import named_trace_path

        path = named_trace_path(path)
    try:
        check_input_kind(path, "trace")  # a FIFO or device would block forever
    except TraceError:
        raise
    except MoesimError as exc:
        raise TraceError(str(exc)) from None
    if path.is_dir():
        trace = _load_dir(path)                           # bounded memory: see the docstring
        mb = trace.meta.micro_batches_per_iteration
        passes = None if stop_iteration is None else max(0, stop_iteration) * mb
        return validate_in_chunks(trace, passes=passes)
    if path.exists():
        return validate(_load_npz(path))
    raise TraceError(f"no trace at {path}; check the path (a .npz file or a trace directory)")


def _meta_bytes(trace: RoutingTrace) -> bytes:
    return json.dumps(trace.meta.to_dict(), indent=1, sort_keys=True,
                      default=_json_default).encode("utf-8")


def _json_default(value):
    """numpy scalars and arrays in ``meta.extra`` become plain JSON numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TraceError(f"metadata extra holds a {type(value).__name__}, which JSON cannot store; "
                     "keep extra to numbers, strings, lists and dicts")


def _save_npz(trace: RoutingTrace, path: Path) -> None:
    arrays = {"counts": np.asarray(trace.counts_TLRE, dtype=np.int64),
              "meta_json": np.frombuffer(_meta_bytes(trace), dtype=np.uint8)}
    if trace.topk_TLRNK is not None:
        arrays["topk"] = np.asarray(trace.topk_TLRNK, dtype=np.int32)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a trace is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_dir(trace: RoutingTrace, path: Path) -> None:
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        np.save(tmp / COUNTS_FILE, np.asarray(trace.counts_TLRE, dtype=count_dtype(trace.meta)))
        if trace.topk_TLRNK is not None:
            np.save(tmp / TOPK_FILE, np.asarray(trace.topk_TLRNK, dtype=np.int32))
        (tmp / META_FILE).write_bytes(_meta_bytes(trace))
        for member in tmp.iterdir():
            os.chmod(member, file_mode())
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TraceDirWriter:
    """Write a directory trace a chunk of passes at a time, in bounded memory::

        with TraceDirWriter("big_trace", meta, num_passes=T) as w:
            for t in range(T):
                w.write(counts_1LRE)          # [passes, L, R, E] integers, in order

    Each chunk is validated as it comes (values, row sums) and appended to ``counts.npy`` (one
    sequential write per chunk, C order, as :func:`count_dtype` — or ``dtype`` — says: uint16
    where ``N·k`` fits; nothing stays mapped; ``sync_each`` flushes each chunk to disk, for a
    writer thread that overlaps the disk with drawing the next chunk); ``meta.json`` and the
    rename into place happen on a clean exit, once all ``num_passes`` passes were written. On
    an error the half-written directory is removed and an existing trace at ``path`` is left as
    it was.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, num_passes: int,
                 dtype: np.dtype | None = None, sync_each: bool = False) -> None:
        validate_meta(meta)
        self.sync_each = sync_each and hasattr(os, "fdatasync")
        self.dtype = count_dtype(meta) if dtype is None else np.dtype(dtype)
        if self.dtype not in COUNT_DTYPES or self.dtype.itemsize < count_dtype(meta).itemsize:
            raise TraceError(f"counts dtype {self.dtype} cannot hold this trace's rows of "
                             f"{meta.tokens_per_rank * meta.top_k}; use {count_dtype(meta)} "
                             "or wider (int32, int64)")
        self.path, self.meta, self.num_passes = Path(path), meta, int(num_passes)
        if self.num_passes < 1 or self.num_passes % meta.micro_batches_per_iteration:
            raise TraceError(f"num_passes = {num_passes} must be a positive multiple of "
                             f"micro_batches_per_iteration = {meta.micro_batches_per_iteration}")
        _check_replaceable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written, self._tmp, self._fh = 0, None, None
        self.shape = (self.num_passes, meta.num_layers, meta.num_ranks, meta.num_experts)

    def __enter__(self) -> TraceDirWriter:
        name = self.path.name
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.path.parent))
        self._fh = open(self._tmp / COUNTS_FILE, "wb")  # noqa: SIM115 (closed in close/abort)
        np.lib.format.write_array_header_1_0(self._fh, {"descr": self.dtype.str,
                                                        "fortran_order": False,
                                                        "shape": self.shape})
        return self

    def write(self, counts_TLRE: np.ndarray, check: bool = True) -> None:
        """Append the next passes ``[p, L, R, E]``, validated first unless ``check`` is false
        (a producer whose rows are exact by construction and tested; the shape is always
        checked, and every load validates the trace again)."""
        counts = np.asarray(counts_TLRE)
        if counts.ndim != 4 or counts.shape[1:] != self.shape[1:]:
            raise TraceError(f"chunk of shape {counts.shape}; the trace takes [passes, "
                             f"{', '.join(map(str, self.shape[1:]))}] (L, R, E)")
        if self.written + counts.shape[0] > self.num_passes:
            raise TraceError(f"more than the announced {self.num_passes} passes written")
        if check:
            check_chunk(counts, self.meta, self.written)
        np.ascontiguousarray(counts, dtype=self.dtype).tofile(self._fh)
        self._fh.flush()
        if self.sync_each:
            os.fdatasync(self._fh.fileno())   # the disk works while the next chunk is drawn
        self.written += counts.shape[0]

    def close(self) -> Path:
        """Finish: every pass written, data on disk, ``meta.json``, rename into place."""
        if self.written != self.num_passes:
            raise TraceError(f"only {self.written} of {self.num_passes} passes were written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        (self._tmp / META_FILE).write_bytes(_meta_bytes(RoutingTrace(np.empty(0), self.meta)))
        os.chmod(self._tmp, 0o755)  # mkdtemp makes 0700
        _swap_in(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the half-written trace."""
        if self._fh is not None:
            self._fh.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
                return
            except BaseException:
                self.abort()
                raise
        self.abort()


def _check_replaceable(path: Path) -> None:
    replaceable = path.is_dir() and ((path / META_FILE).exists() or not any(path.iterdir()))
    if path.exists() and not replaceable:
        raise TraceError(f"{path} exists and is not a trace directory; choose another output "
                         "path (use a .npz suffix for a single file)")


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``, moving an existing trace directory aside first."""
    if not path.exists():
        os.rename(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _parse_meta(raw: bytes, where: str):
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{where} is not valid JSON ({str(exc)[:80] or type(exc).__name__});"
                         " the file is corrupt, re-export the trace") from None
    return meta_from_dict(data, where)


def _load_npz(path: Path) -> RoutingTrace:
    _check_headers(bounds.check_npz_members, path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise TraceError(f"{path} is a bare .npy array, not a trace archive; "
                             "write traces with moesim (save_trace)")
        with archive:
            names = set(archive.files)
            for name in ("counts", "meta_json"):
                if name not in names:
                    raise TraceError(f"{path} lacks the array {name!r}; it is not a moesim "
                                     "trace or is truncated, re-export it")
            meta = _parse_meta(_member(archive, "meta_json", path).tobytes(),
                               f"{path}:meta_json")
            counts = _member(archive, "counts", path)
            topk = _member(archive, "topk", path) if "topk" in names else None
    except TraceError:
        raise
    except _READ_ERRORS as exc:
        raise TraceError(f"{path} is not a readable .npz trace ({type(exc).__name__}: "
                         f"{_short(exc)}); the file is truncated or corrupt, "
                         "re-export it") from None
    return RoutingTrace(counts, meta, topk)


def _member(archive, name: str, path: Path) -> np.ndarray:
    """One array of an open ``.npz``; numpy hands back raw bytes for a non-.npy member."""
    value = archive[name]
    if not isinstance(value, np.ndarray):
        raise TraceError(f"{path}: member {name!r} is not a .npy array; the file is corrupt, "
                         "re-export it")
    return value


def _load_dir(path: Path) -> RoutingTrace:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise TraceError(f"{path} has no {META_FILE}; it is not a moesim trace directory")
    meta = _parse_meta(meta_path.read_bytes(), str(meta_path))
    counts = _mmap(path / COUNTS_FILE, required=True)
    topk = _mmap(path / TOPK_FILE, required=False)
    return RoutingTrace(counts, meta, topk)


def _mmap(path: Path, required: bool) -> np.ndarray | None:
    if not path.exists():
        if required:
            raise TraceError(f"{path} is missing; the trace directory is incomplete, "
                             "re-export it")
        return None
    _check_headers(bounds.check_npy_file, path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except _READ_ERRORS as exc:
        raise TraceError(f"{path} is not a readable .npy array ({type(exc).__name__}: "
                         f"{_short(exc)}); the file is truncated or corrupt, "
                         "re-export it") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:120] + ("..." if len(text) > 120 else "")


def atomic_write_text_lines(path: Path, header: str, table_NC: np.ndarray) -> Path:
    """Write ``header`` and integer rows ``table_NC`` as CSV via a temp file + ``os.replace``."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            np.savetxt(fh, table_NC, fmt="%d", delimiter=",", header=header, comments="")
    return path
