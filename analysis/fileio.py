"""Atomic writes of user-facing files (figures, CSVs, HTML) with normal permissions.

``moesim.results.atomic_write_bytes`` goes through ``mkstemp``, whose files are mode 0600;
files a user opens, shares or serves get ``0666 & ~umask`` like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from moesim.results import atomic_write_bytes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike) -> Path:
    """Give a file the usual ``0666 & ~umask`` mode; returns its path."""
    path = Path(path)
    os.chmod(path, 0o666 & ~_umask())
    return path


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + replace), with normal permissions."""
    path = Path(path)
    atomic_write_bytes(path, data)
    return publish(path)
