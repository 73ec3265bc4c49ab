"""A small stderr progress bar for long runs (no dependency)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """A small stderr progress bar (no dependency): ``[#####.....] 50/100  12.3 it/s``;
    redraws at most 10 times a second; silent when disabled or for runs of < 2 items."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30) -> None:
        self.total, self.width, self.done = total, width, 0
        self.enabled = enabled and total > 1
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            filled = int(self.width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.t0, 1e-9)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
                             f"{self.done}/{self.total}  {rate:.1f} it/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
