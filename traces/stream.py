"""Reading a trace larger than memory a chunk of passes at a time.

A directory trace's counts are memory-mapped (:mod:`moesim.traces.io`); reading them maps file
pages into this process, and those pages count towards its resident memory until it lets them
go. :func:`pass_chunks` hands out bounded chunks of passes and drops each chunk's pages after
use; :func:`release_pages` drops every page of a mapped array (the simulator calls it after
each iteration). Dropped pages stay in the OS page cache, so reading them again is cheap; for
in-memory arrays both are plain slicing / no-ops.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

CHUNK_CELLS = 2**24  # counts per chunk (128 MiB of int64)


def release_pages(array: np.ndarray) -> None:
    """Let the OS take back the resident pages of the memory-mapped file behind ``array`` (a
    ``np.memmap`` or a view of one); no-op for anything else."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def passes_per_chunk(counts_TLRE: np.ndarray, max_cells: int | None = None) -> int:
    """How many passes of ``counts_TLRE`` fit in ``max_cells`` (default :data:`CHUNK_CELLS`;
    at least one)."""
    max_cells = CHUNK_CELLS if max_cells is None else max_cells
    per_pass = int(np.prod(counts_TLRE.shape[1:], dtype=np.int64)) or 1
    return max(1, max_cells // per_pass)


def pass_chunks(counts_TLRE: np.ndarray, max_cells: int | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """``(t0, chunk_TLRE)`` over the passes, ``chunk`` a read-only view of passes ``t0 …``
    (:func:`passes_per_chunk` of them; no copy); the mapped pages are released once the
    caller asks for the next chunk (a view read after that faults its pages back in from the
    page cache: still correct, just not bounded)."""
    T = counts_TLRE.shape[0]
    step = passes_per_chunk(counts_TLRE, max_cells)
    for t0 in range(0, T, step):
        chunk = counts_TLRE[t0:t0 + step].view()
        chunk.flags.writeable = False
        yield t0, chunk
        release_pages(counts_TLRE)
