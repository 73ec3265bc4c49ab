"""Figure plumbing shared by every plot: headless backend, atomic saves, incomplete-run notes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moesim.errors import MoesimError  # noqa: E402
from moesim.results import RunResult  # noqa: E402
from moesim.safeio import atomic_file, writing  # noqa: E402

from .runs import incomplete_note  # noqa: E402

FORMATS = (".png", ".pdf")
DPI = 130


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 8.0, height: float = 4.5,
               **kwargs) -> tuple[Figure, object]:
    """A fresh figure with constrained layout (titles, suptitles and legends never overlap)."""
    kwargs.setdefault("layout", "constrained")
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)
    return fig, axes


def iteration_axis(ax) -> None:
    """Label an x axis ``iteration`` with whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def mark_incomplete(fig: Figure, runs: Sequence[RunResult]) -> None:
    """Print a red note on the figure naming runs that did not complete (never silently)."""
    note = incomplete_note(runs)
    if note:
        fig.text(0.5, 1.0, note, color="crimson", fontsize=9, ha="center", va="bottom",
                 weight="bold")


def check_output(out: str | os.PathLike) -> Path:
    """Validate an output path's suffix (``.png`` or ``.pdf``); returns it as a Path."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise MoesimError(f"output {path} must end in .png or .pdf (the suffix picks the "
                          "format)")
    return path


def save_figure(fig: Figure, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` atomically (temp file in the same directory, then replace)."""
    path = check_output(out)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, suffix=path.suffix) as fh:
                fig.savefig(fh, format=path.suffix.lower()[1:], dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
