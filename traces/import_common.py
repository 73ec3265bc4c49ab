"""Input checks shared by the engine importers (Megatron-Core, TensorRT-LLM, vLLM).

Every importer reads files other programs wrote, so each file is checked before it is opened:
it must be a regular file (not a directory, device or FIFO) of bounded size, and a bad one gives
a one-line :class:`~moesim.errors.TraceError` naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from moesim import bounds
from moesim.errors import MoesimError, TraceError

MAX_JSON_BYTES = 1 << 30          # one JSON document (vLLM load_history, meta_info.json)
MAX_META_BYTES = 1 << 20          # small side files (TensorRT-LLM meta_info.json)
MAX_TENSOR_FILE_BYTES = 16 << 30  # one safetensors / torch.save file
MAX_TRACE_CELLS = 1 << 31         # passes x layers x ranks x experts of an imported trace


def regular_file(path: Path, what: str, max_bytes: int) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``; TraceError otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TraceError(f"{path} does not exist; check the path of the {what}") from None
    except OSError as exc:
        raise TraceError(f"cannot read {path} ({exc.strerror}); check the path of the "
                         f"{what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TraceError(f"{path} is not a regular file; pass the {what} itself")
    if info.st_size > max_bytes:
        raise TraceError(f"{path} is {info.st_size / 2**30:.1f} GiB, more than the "
                         f"{max_bytes / 2**30:.3g} GiB a {what} may be; is it the right file?")
    return path


def trace_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory; TraceError naming the expected contents otherwise."""
    if not path.is_dir():
        raise TraceError(f"{path} is not a directory; pass the folder holding the {what}")
    return path


def rank_files(directory: Path, pattern: re.Pattern, what: str, max_bytes: int
               ) -> dict[int, Path]:
    """``{rank: path}`` of the files in ``directory`` whose name ``pattern`` matches (group 1 =
    rank); ranks must be ``0..R-1`` with none missing."""
    found = {}
    for path in sorted(directory.iterdir()):
        match = pattern.match(path.name)
        if match:
            found[int(match[1])] = regular_file(path, what, max_bytes)
    if not found:
        raise TraceError(f"{directory} holds no {what} files ({pattern.pattern}); point at the "
                         "folder the engine wrote")
    missing = gaps(found, 0)
    if missing:
        raise TraceError(f"{directory}: no {what} file for rank(s) {few(missing)}; every rank "
                         "0..R-1 needs one (copy all ranks' files)")
    return found


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES):
    """Parse one JSON file (regular, bounded); TraceError on bad syntax or encoding."""
    regular_file(path, what, max_bytes)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{path} is not valid JSON ({short(exc)}); the {what} is damaged, "
                         "re-export it") from None


def check_cells(shape: tuple[int, ...], where: str) -> None:
    """Refuse a trace whose counts array would exceed :data:`MAX_TRACE_CELLS` cells."""
    if math.prod(shape) > MAX_TRACE_CELLS:
        raise TraceError(f"{where}: the trace would be {list(shape)} (passes, layers, ranks, "
                         f"experts) = {math.prod(shape):,} cells, more than {MAX_TRACE_CELLS:,};"
                         " import fewer steps")
    try:  # and it must fit in this machine's memory (moesim.bounds)
        bounds.check_shape(shape, f"{where}: the trace", "import fewer steps or ranks")
    except MoesimError as exc:
        raise TraceError(str(exc)) from None


def whole_int(value, what: str, lo: int = 0, hi: int = 1 << 40) -> int:
    """``value`` as an int in ``[lo, hi)``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise TraceError(f"{what} is {short(value)} but must be a whole number in [{lo}, {hi})")
    return value


def stride_of(numbers: list[int], what: str) -> int:
    """The common spacing of sorted ``numbers`` (1 for one number); TraceError when uneven."""
    if len(numbers) < 2:
        return 1
    gaps = {b - a for a, b in zip(numbers, numbers[1:], strict=False)}
    if len(gaps) != 1:
        raise TraceError(f"{what} are not evenly spaced ({few(numbers)}); a step is missing "
                         "from some file, import a complete run")
    return gaps.pop()


def gaps(present, start: int, step: int = 1, limit: int = 5) -> list[int]:
    """Up to ``limit`` of ``start, start + step, ...`` below ``max(present)`` missing from
    ``present``, without building that range (a file name can claim rank 10**10)."""
    out: list[int] = []
    expect = start
    for value in sorted(set(present)):
        while expect < value and len(out) < limit:
            out.append(expect)
            expect += step
        if len(out) >= limit:
            break
        expect = value + step
    return out


def few(items, limit: int = 5) -> str:
    """At most ``limit`` items, comma-separated, with the total when there are more."""
    items = list(items)
    text = ", ".join(str(x) for x in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def short(value, limit: int = 80) -> str:
    """``value`` as one short line."""
    text = " ".join(str(value).split())
    return text[:limit] + ("..." if len(text) > limit else "")
