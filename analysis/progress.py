"""A small progress bar on stderr (no tqdm): redrawn in place on a terminal, one line per ~10%
otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``[#####.....] 12/48 configs  1 failed  3.1 s elapsed  ETA 9.4 s``."""

    def __init__(self, total: int, unit: str = "items", *, enabled: bool = True,
                 stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.unit, self.width = total, unit, width
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, n: int = 1, *, failed: bool = False) -> None:
        """Count ``n`` finished items (``failed`` ones are counted separately too)."""
        self.done += n
        self.failed += int(failed)
        if not self.enabled:
            return
        decile = 10 * self.done // self.total
        if self._tty:
            self.stream.write("\r" + self.line())
        elif decile != self._last_decile or self.done == self.total:
            self.stream.write(self.line() + "\n")
        self._last_decile = decile
        self.stream.flush()

    def line(self) -> str:
        """The bar's current text."""
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        failed = f"  {self.failed} failed" if self.failed else ""
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{self.unit}{failed}  {elapsed:.1f} s elapsed  ETA {eta:.1f} s")

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
