"""The scheduling engine: small, and it knows nothing about MoE.

Shape legend: ``O`` ops, ``R`` ranks, ``G`` groups of a collective, ``Q`` streams.

A static program (:mod:`moesim.ops` semantics) is scheduled *exactly* by one pass in program
order, vectorised over ranks: each rank keeps a per-stream free time (``free_QR``); an op's
ready time on rank ``r`` is ``max(free[stream, r], done[deps, r])``; per-rank ops (compute, host
work) start there; a collective group starts at the max ready time of its members
(``np.maximum.reduceat`` over members sorted by group) and ends for all at once
(``start + duration``); an all-to-all is one group of its members; a ``SendRecv`` batch starts
when all its participants are ready and each ends after its own transfers. A rank an op does not
name skips it: it takes no stream time, and later ops that depend on it wait only for what it
depended on (``done = max(done[deps])``). Program order is a valid order, so one pass suffices.

:class:`EventQueue` is a generic heap of ``(time, priority, seq, event)`` for future dynamic
behaviour (e.g. policies that react during an iteration); the hot path never uses it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.ops import STREAMS, AllToAll, GroupCollective, Op, SendRecv

STREAM_INDEX = {s: i for i, s in enumerate(STREAMS)}


@dataclass
class Schedule:
    """Per op, per rank: ``start_OR`` / ``end_OR`` seconds from the iteration start (NaN where
    the rank skipped the op)."""

    start_OR: np.ndarray
    end_OR: np.ndarray

    @property
    def makespan_s(self) -> float:
        """The latest end over all ops and ranks (0 for an empty program)."""
        return float(np.nanmax(self.end_OR)) if np.isfinite(self.end_OR).any() else 0.0


def members_of(op: Op, num_ranks: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Ranks that take part in ``op`` and, for collectives, each member's group index
    (``None`` for per-rank ops)."""
    if isinstance(op, GroupCollective):
        ranks = np.concatenate(op.groups).astype(np.int64) if op.groups else np.zeros(0, int)
        return ranks, np.repeat(np.arange(len(op.groups)), op.group_sizes)
    if isinstance(op, AllToAll):
        ranks = np.arange(num_ranks) if op.ranks is None else np.asarray(op.ranks, np.int64)
        return ranks, np.zeros(len(ranks), dtype=np.int64)
    if isinstance(op, SendRecv):
        ranks = np.unique(np.concatenate([op.src_N, op.dst_N]).astype(np.int64))
        return ranks, np.zeros(len(ranks), dtype=np.int64)
    ranks = getattr(op, "ranks", None)
    return (np.arange(num_ranks) if ranks is None else np.asarray(ranks, np.int64)), None


def _buffer(scratch: dict | None, name: str, shape: tuple[int, int], fill: float
            ) -> np.ndarray:
    """A ``shape`` array filled with ``fill``: the one kept in ``scratch`` when it fits (large
    programs reuse their buffers from iteration to iteration instead of faulting in new pages
    every time), else a new one."""
    if scratch is None:
        return np.full(shape, fill)
    arr = scratch.get(name)
    if arr is None or arr.shape != shape:
        arr = scratch[name] = np.empty(shape)
    arr.fill(fill)
    return arr


def schedule(ops: Sequence[Op], durations: Sequence[np.ndarray], num_ranks: int,
             t0_R: np.ndarray | None = None, scratch: dict | None = None) -> Schedule:
    """Schedule ``ops`` with their ``durations`` (as :meth:`CostModel.duration` returns them:
    ``[R]`` per rank, ``[G]`` per group, ``[1]`` all-to-all). ``t0_R``: per-rank start times.
    ``scratch``: a dict the caller keeps to reuse the ``[O, R]`` buffers (the returned
    schedule's arrays are then valid until the next call with the same ``scratch``).

    The hot loop of the simulator, kept in one function (with a fast path for ops on every
    rank) so that per-op Python overhead stays a few microseconds."""
    O, R = len(ops), num_ranks
    free_QR = np.zeros((len(STREAMS), R)) if t0_R is None else np.tile(t0_R, (len(STREAMS), 1))
    done_OR = _buffer(scratch, "done", (O, R), 0.0)
    start_OR = _buffer(scratch, "start", (O, R), np.nan)
    end_OR = _buffer(scratch, "end", (O, R), np.nan)
    zeros_R = np.zeros(R)
    for i, op in enumerate(ops):
        dep_R = _dep_ready(done_OR, op.deps, zeros_R)
        q = STREAM_INDEX[op.stream]
        ready_R = np.maximum(free_QR[q], dep_R)
        dur = np.asarray(durations[i], dtype=np.float64)
        if _spans_world(op):  # fast path: every rank, one start per rank or one group
            if dur.shape[0] == R:
                start, end = ready_R, ready_R + dur
            else:
                start = ready_R.max()
                end = start + dur[0]
            start_OR[i], end_OR[i], done_OR[i], free_QR[q] = start, end, end, end
            continue
        ranks, group = members_of(op, R)
        start, end = _op_times(op, dur, ready_R, ranks, group, R)
        done_OR[i] = dep_R
        done_OR[i, ranks] = end
        start_OR[i, ranks] = start
        end_OR[i, ranks] = end
        free_QR[q, ranks] = end
    return Schedule(start_OR, end_OR)


def _dep_ready(done_OR: np.ndarray, deps: tuple[int, ...], zeros_R: np.ndarray) -> np.ndarray:
    """Per-rank time all ``deps`` are done (``zeros_R`` when there are none)."""
    if not deps:
        return zeros_R
    if len(deps) == 1:
        return done_OR[deps[0]]
    return done_OR[list(deps)].max(axis=0)


def _spans_world(op: Op) -> bool:
    """Per-rank ops on all ranks, and all-to-alls among all ranks (no member bookkeeping)."""
    if isinstance(op, (GroupCollective, SendRecv)):
        return False
    return getattr(op, "ranks", None) is None


def _op_times(op: Op, dur: np.ndarray, ready_R: np.ndarray, ranks: np.ndarray,
              group: np.ndarray | None, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of ``op`` on its member ``ranks`` (arrays aligned with ``ranks``)."""
    if group is None:  # per-rank op
        start = ready_R[ranks]
        d = dur[ranks] if dur.shape[0] == R else dur
        return start, start + d
    if len(ranks) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    gstart = np.maximum.reduceat(ready_R[ranks[order]], bounds)
    gid = np.cumsum(np.r_[False, np.diff(group[order]) != 0])
    start = np.empty(len(ranks))
    start[order] = gstart[gid]
    if isinstance(op, SendRecv):  # per-rank transfer times from a common start
        return start, start + dur[ranks]
    return start, start + dur[group]


# --------------------------------------------------------------------------------------------
# a generic event core for dynamic behaviour (not on the hot path)


class EventQueue:
    """A discrete-event core: a heap of ``(time, priority, seq, callback)``; ``seq`` keeps
    events of equal time and priority in scheduling order (FIFO)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Callable[[], Any]]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, delay: float, callback: Callable[[], Any], priority: int = 0) -> None:
        """Run ``callback`` ``delay`` seconds from now (lower ``priority`` first on ties)."""
        if delay < 0:
            raise ValueError("cannot schedule an event in the past")
        heapq.heappush(self._heap, (self.now + delay, priority, self._seq, callback))
        self._seq += 1

    def step(self) -> None:
        """Pop the next event, advance the clock to it, run it."""
        time, _, _, callback = heapq.heappop(self._heap)
        self.now = time
        callback()

    def run(self, until: float | None = None) -> float:
        """Run events in order until none remain (or the next is after ``until``)."""
        while self._heap and (until is None or self._heap[0][0] <= until):
            self.step()
        if until is not None:
            self.now = max(self.now, until)
        return self.now
