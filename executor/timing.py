"""Timing of one rank's ops: wall clock on CPU, CUDA events on GPU; async collectives.

- :class:`Timer` — op start/end from the iteration's start barrier: ``time.perf_counter`` on
  CPU (ops are synchronous), CUDA events on GPU (resolved after one synchronise at the end);
- :class:`Collective` / :class:`InFlight` — a compiled collective that can run to completion
  or be started asynchronously, and the thread that waits for a started one and stamps its
  completion (so an overlapped collective's end is when it finished, not when it was joined);
- :class:`OpTimes` — what a rank hands to rank 0 after an iteration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class OpTimes:
    """This rank's op timings of one iteration: ``events`` ``(op index, start_s, end_s)`` from
    the rank's exit of the iteration's start barrier, which happened at ``origin_s`` on
    ``clock`` (``"monotonic"``: ``time.perf_counter``, shared by all processes of one host, so
    rank 0 can put every rank on one time axis; ``"cuda"``: per-device event times)."""

    events: list[tuple[int, float, float]] = field(default_factory=list)
    origin_s: float = 0.0
    clock: str = "monotonic"
    host: str = ""


class Collective:
    """A compiled collective: call it to run it to completion, or ``start()`` it (async) and
    call what that returns to wait for it."""

    def __init__(self, start: Callable[[], Callable[[], None]]) -> None:
        self.start = start

    def __call__(self) -> None:
        self.start()()


class InFlight:
    """An async collective and the thread that waits for it and stamps its completion."""

    def __init__(self, index: int, start: Callable[[], Callable[[], None]],
                 stream: str = "prefetch") -> None:
        self.index, self.begin, self.stream = index, time.perf_counter(), stream
        finish = start()
        self.end = self.begin
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._wait, args=(finish,), daemon=True)
        self.thread.start()

    def _wait(self, finish: Callable[[], None]) -> None:
        try:
            finish()
        except BaseException as exc:  # re-raised in the main thread by join()
            self.error = exc
        self.end = time.perf_counter()

    def join(self) -> tuple[int, float, float]:
        """Wait; ``(op index, start, end)`` as perf_counter values."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.index, self.begin, self.end


class Timer:
    """Op start/end times from the iteration start (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[int, object, object]] = []
        self._open: tuple[int, object] | None = None

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin(self) -> None:
        self.origin_s = time.perf_counter()
        self._t0 = self._now()

    def mark_start(self, op: int) -> None:
        self._open = (op, self._now())

    def mark_end(self, op: int) -> None:
        assert self._open is not None and self._open[0] == op
        self._marks.append((op, self._open[1], self._now()))
        self._open = None

    def add(self, op: int, start: float, end: float) -> None:
        """An op timed elsewhere (an async collective; perf_counter values, CPU only)."""
        assert not self.cuda
        self._marks.append((op, start, end))

    def finish(self) -> list[tuple[int, float, float]]:
        """``[(op, start_s, end_s)]`` relative to :meth:`begin`, in start order."""
        if self.cuda:
            torch.cuda.synchronize()
            rel = lambda ev: self._t0.elapsed_time(ev) / 1e3  # noqa: E731
        else:
            rel = lambda t: t - self._t0  # noqa: E731
        return sorted((i, rel(s), rel(e)) for i, s, e in self._marks)
