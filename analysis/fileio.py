"""Atomic writes of user-facing files (figures, CSVs, HTML) with normal permissions.

Both live in :mod:`moesim.safeio` (every atomic write there gets ``0666 & ~umask``, like any
other tool's files); this module keeps the names ``analysis`` uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from moesim.safeio import atomic_write_bytes, publish

__all__ = ["atomic_write", "publish"]


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + replace), with normal permissions."""
    return atomic_write_bytes(path, data)
