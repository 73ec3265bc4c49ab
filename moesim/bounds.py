"""Bounded work: check the size an input implies before allocating it.

A few bytes of input can name a huge array: a SmartMoE file called ``..._rank10000000000.log``,
a CSV row with expert id 1999999999, ``--knob slots_per_rank=100000000``, ``trace synth
--layers 100000 --experts 100000``, an ``.npy`` header claiming shape (10⁶, 10⁶). Each reader
computes the bytes first and calls :func:`check_bytes`, which refuses, in one line naming the
size and the flag that bounds it, anything larger than the memory this machine has available
(``MemAvailable``; ``MOESIM_MAX_BYTES`` lowers the bound, e.g. for tests or shared hosts).
:func:`check_npy_header` checks a ``.npy`` header against the bytes actually present.
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from typing import IO

from moesim.errors import MoesimError

MAX_ENV = "MOESIM_MAX_BYTES"


def available_bytes() -> int:
    """Memory this process may reasonably allocate: ``MemAvailable`` (Linux), else physical
    memory, capped by ``MOESIM_MAX_BYTES`` when set."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 40
    cap = os.environ.get(MAX_ENV, "")
    return min(avail, int(cap)) if cap.isdigit() else avail


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def cells_bytes(shape: tuple[int, ...] | list[int], itemsize: int = 8) -> int:
    """Exact bytes of an array of ``shape`` (Python ints: no overflow)."""
    return math.prod(int(n) for n in shape) * int(itemsize)


def check_bytes(nbytes: int, what: str, bound_by: str) -> None:
    """Refuse ``nbytes`` (the size ``what`` implies) when it exceeds half the available memory;
    ``bound_by`` says which flag or input bounds it."""
    usable = available_bytes() // 2
    if nbytes > usable:
        raise MoesimError(f"{what} would need {human_bytes(nbytes)} of memory, more than half "
                          f"of the {human_bytes(2 * usable)} available; {bound_by}")


def check_shape(shape: tuple[int, ...] | list[int], what: str, bound_by: str,
                itemsize: int = 8) -> None:
    """:func:`check_bytes` for an array of ``shape``."""
    check_bytes(cells_bytes(shape, itemsize), f"{what} {tuple(int(n) for n in shape)}",
                bound_by)


def check_npy_header(fh: IO[bytes], data_bytes: int, where: str) -> tuple[tuple, object]:
    """Read a ``.npy`` header from ``fh``; refuse a malformed header or one whose shape needs
    more bytes than the ``data_bytes`` the file holds. Returns ``(shape, dtype)``; ``fh`` is
    left just past the header."""
    import numpy as np  # here, not at import: the CLI's start-up stays numpy-free

    try:
        start = fh.tell()
        version = np.lib.format.read_magic(fh)
        reader = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = reader(fh, max_header_size=10000)
        header_len = fh.tell() - start
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError,
            MemoryError, RecursionError, OverflowError, zipfile.BadZipFile,
            zlib.error) as exc:
        raise MoesimError(f"{where} is not a readable .npy array (malformed header, "
                          f"{type(exc).__name__}); the file is corrupt, re-export it") from None
    claimed = cells_bytes(shape, dtype.itemsize)
    if claimed > max(0, data_bytes - header_len):
        raise MoesimError(f"{where} is not a readable .npy array (its header claims shape "
                          f"{tuple(shape)} of {dtype}, {human_bytes(claimed)}, but the file "
                          f"holds {human_bytes(max(0, data_bytes - header_len))}); the file "
                          "is truncated or corrupt, re-export it")
    return tuple(shape), dtype


def check_npy_file(path: str | os.PathLike) -> tuple[tuple, object]:
    """:func:`check_npy_header` for a ``.npy`` file on disk."""
    with open(path, "rb") as fh:
        return check_npy_header(fh, os.fstat(fh.fileno()).st_size, str(path))


def check_npz_members(path: str | os.PathLike) -> None:
    """:func:`check_npy_header` for every ``.npy`` member of an ``.npz`` archive (against the
    member's uncompressed size); a damaged archive is left to the loader's own error."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                member = archive.open(info)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
                return
            with member:
                check_npy_header(member, info.file_size, f"{path}:{info.filename}")

