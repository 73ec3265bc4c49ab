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
depended on (``done = max(done[deps])``). Program order is a valid order, so one pass suffices. The
pass does not branch on times, so :func:`schedule_batch` runs it once for a batch of
iterations that share a program structure, every array with a leading batch axis.

:class:`EventQueue` is a generic heap of ``(time, priority, seq, event)`` for future dynamic
behaviour (e.g. policies that react during an iteration); the hot path never uses it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moesim.ops import STREAMS, AllToAll, GroupCollective, Op, SendRecv

STREAM_INDEX = {s: i for i, s in enumerate(STREAMS)}


class Schedule:
    """Per op, per rank: ``start_OR`` / ``end_OR`` seconds from the iteration start (NaN where
    the rank skipped the op).

    The engine builds it compactly (:meth:`compact`): per op only its member ranks' times
    (``ranks_O[i]`` None: every rank), so a pipeline stage's op costs its stage's ranks, not
    the world's; the dense ``[O, R]`` arrays are materialised on first use. A measured
    schedule (the executor's) is given dense: ``Schedule(start_OR=…, end_OR=…)``."""

    def __init__(self, start_OR: np.ndarray | None = None, end_OR: np.ndarray | None = None
                 ) -> None:
        self._dense = None if start_OR is None else (np.asarray(start_OR),
                                                     np.asarray(end_OR))
        self.num_ranks = 0 if start_OR is None else int(np.shape(start_OR)[1])
        self.ranks_O: list[np.ndarray | None] = []
        self.start_O: list[np.ndarray] = []
        self.end_O: list[np.ndarray] = []

    @classmethod
    def compact(cls, num_ranks: int, ranks_O: list, start_O: list, end_O: list) -> Schedule:
        """From per-op member ranks (None: all) and their start / end arrays."""
        out = cls()
        out.num_ranks, out.ranks_O, out.start_O, out.end_O = num_ranks, ranks_O, start_O, end_O
        return out

    def __len__(self) -> int:
        return len(self.start_O) if self._dense is None else len(self._dense[0])

    def spans(self):
        """``(i, ranks, start, end)`` of every op that some rank ran: member ranks (an int
        array) and their times."""
        if self._dense is not None:
            start_OR, end_OR = self._dense
            for i in range(len(start_OR)):
                ranks = np.flatnonzero(np.isfinite(start_OR[i]))
                if len(ranks):
                    yield i, ranks, start_OR[i, ranks], end_OR[i, ranks]
            return
        all_R = np.arange(self.num_ranks)
        for i, (ranks, st, en) in enumerate(zip(self.ranks_O, self.start_O, self.end_O,
                                               strict=True)):
            if ranks is None:
                yield i, all_R, st, en
            elif len(ranks):
                yield i, ranks, st, en

    def _materialise(self) -> tuple[np.ndarray, np.ndarray]:
        if self._dense is None:
            O, R = len(self.start_O), self.num_ranks
            start_OR, end_OR = np.full((O, R), np.nan), np.full((O, R), np.nan)
            for i, (ranks, st, en) in enumerate(zip(self.ranks_O, self.start_O, self.end_O,
                                                   strict=True)):
                idx = slice(None) if ranks is None else ranks
                start_OR[i, idx], end_OR[i, idx] = st, en
            self._dense = (start_OR, end_OR)
        return self._dense

    @property
    def start_OR(self) -> np.ndarray:
        return self._materialise()[0]

    @property
    def end_OR(self) -> np.ndarray:
        return self._materialise()[1]

    @property
    def makespan_s(self) -> float:
        """The latest end over all ops and ranks (0 for an empty program)."""
        if self._dense is not None:
            end = self._dense[1]
            return float(np.nanmax(end)) if np.isfinite(end).any() else 0.0
        end = np.concatenate(self.end_O) if self.end_O else np.zeros(0)
        end = end[np.isfinite(end)]
        return float(end.max()) if end.size else 0.0


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


def _last_uses(ops: Sequence[Op]) -> list[int]:
    """Per op, the index of the last op that depends on it (-1: none)."""
    last = [-1] * len(ops)
    for i, op in enumerate(ops):
        for d in op.deps:
            last[d] = i
    return last


def schedule(ops: Sequence[Op], durations: Sequence[np.ndarray], num_ranks: int,
             t0_R: np.ndarray | None = None) -> Schedule:
    """Schedule ``ops`` with their ``durations`` (as :meth:`CostModel.duration` returns them:
    ``[R]`` per rank, ``[G]`` per group, ``[1]`` all-to-all). ``t0_R``: per-rank start times.

    One iteration of :func:`schedule_batch` (a batch of one)."""
    t0 = None if t0_R is None else np.asarray(t0_R, dtype=np.float64)
    return schedule_batch(ops, durations, num_ranks, 1, t0).iteration(0)


class BatchSchedule:
    """The schedules of ``batch`` iterations that share one program structure: per op its
    member ranks (``ranks_O[i]`` None: every rank) and flat ``[B·members]`` start / end
    arrays (iteration-major; :meth:`rows` gives them as ``[B, members]``)."""

    def __init__(self, num_ranks: int, batch: int, ranks_O: list, start_O: list, end_O: list
                 ) -> None:
        self.num_ranks, self.batch = num_ranks, batch
        self.ranks_O, self.start_O, self.end_O = ranks_O, start_O, end_O

    def iteration(self, b: int) -> Schedule:
        """Iteration ``b``'s :class:`Schedule` (views into the batch's arrays)."""
        if self.batch == 1:
            return Schedule.compact(self.num_ranks, self.ranks_O, self.start_O, self.end_O)
        starts, ends = [], []
        for ranks, st, en in zip(self.ranks_O, self.start_O, self.end_O, strict=True):
            n = self.num_ranks if ranks is None else len(ranks)
            starts.append(st[b * n:(b + 1) * n])
            ends.append(en[b * n:(b + 1) * n])
        return Schedule.compact(self.num_ranks, self.ranks_O, starts, ends)

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Op ``i``'s ``[B, members]`` starts and ends."""
        return self.start_O[i].reshape(self.batch, -1), self.end_O[i].reshape(self.batch, -1)


def schedule_batch(ops: Sequence[Op], durations_O: Sequence[np.ndarray], num_ranks: int,
                   batch: int, t0_BR: np.ndarray | None = None, memo: dict | None = None
                   ) -> BatchSchedule:
    """Schedule ``batch`` iterations of one program structure at once: ``durations_O[i]`` is
    op ``i``'s ``[B, R]`` / ``[B, G]`` / ``[B, 1]`` seconds in each iteration (what
    :meth:`CostModel.duration` gives, one row per iteration; a batch of one may give them
    1-D). Program order does not depend
    on the durations, so every iteration's times are exactly what it gets scheduled alone:
    the same elementwise steps on each iteration's values.

    The hot loop of the simulator, kept in one function (with a fast path for ops on every
    rank) so that per-op Python overhead stays a few microseconds, shared by the batch.
    Per-rank state is kept flat, ``[B·R]`` (iteration-major), so that an op's members are one
    1-D index (``b·R + rank``; the ranks themselves when ``B = 1``). Each op's ``done`` row
    (its end on its members, what it depended on elsewhere) is kept only while a later op
    depends on it, and times are stored for members only, so memory grows with the ops'
    members, not with ``ops × ranks``."""
    R, B = num_ranks, batch
    Q = len(STREAMS)
    free_QX = np.zeros((Q, B * R)) if t0_BR is None else np.tile(np.reshape(t0_BR, -1), (Q, 1))
    zeros_X = np.zeros(B * R)
    last = _last_uses(ops)
    done: dict[int, np.ndarray] = {}
    memo = {} if memo is None else memo
    groups_seen = memo.setdefault("groups", {})
    flat_seen = memo.setdefault(("flat", B), {})
    op_seen = memo.setdefault("ops", {})
    ranks_O: list[np.ndarray | None] = []
    start_O: list[np.ndarray] = []
    end_O: list[np.ndarray] = []
    for i, op in enumerate(ops):
        dep_X = _dep_ready(done, op.deps, zeros_X)
        q = STREAM_INDEX[op.stream]
        dur = durations_O[i]
        n_d = dur.shape[-1]  # per iteration: R, members, groups or 1
        dur = dur.reshape(-1) if dur.ndim > 1 else np.asarray(dur, dtype=np.float64)
        if spans_world(op):  # fast path: every rank, one start per rank or one group
            ready_X = np.maximum(free_QX[q], dep_X)
            if n_d == R:
                start, end = ready_X, ready_X + dur
            elif B == 1:
                start = np.full(R, ready_X.max())
                end = start + dur[0]
            else:
                start = np.repeat(ready_X.reshape(B, R).max(axis=1), R)
                end = start + np.repeat(dur[::n_d], R)
            free_QX[q] = end
            ranks_O.append(None)
            row = end
        else:
            hit = op_seen.get(id(op))
            if hit is None or hit[0] is not op:  # the entry keeps ``op`` alive
                hit = op_seen[id(op)] = (op, *_members(op, R, groups_seen))
            _, ranks, group, layout = hit
            flat = _flat(ranks, group, layout, R, B, flat_seen)
            ready_m = np.maximum(free_QX[q][flat[0]], dep_X[flat[0]])  # members only
            start, end = _op_times(op, dur, n_d, ready_m, ranks, group, layout, flat, B, R)
            free_QX[q][flat[0]] = end
            ranks_O.append(ranks)
            row = None
            if last[i] >= 0:
                row = dep_X.copy()
                row[flat[0]] = end
        start_O.append(start)
        end_O.append(end)
        if last[i] >= 0:
            done[i] = row
        for d in op.deps:
            if last[d] == i:
                done.pop(d, None)
    return BatchSchedule(R, B, ranks_O, start_O, end_O)


def _dep_ready(done: dict[int, np.ndarray], deps: tuple[int, ...], zeros_X: np.ndarray
               ) -> np.ndarray:
    """Per-rank time all ``deps`` are done, ``[B·R]`` (``zeros_X`` when there are none)."""
    if not deps:
        return zeros_X
    if len(deps) == 1:
        return done[deps[0]]
    out = np.maximum(done[deps[0]], done[deps[1]])
    for d in deps[2:]:
        np.maximum(out, done[d], out=out)
    return out


def spans_world(op: Op) -> bool:
    """Per-rank ops on all ranks, and all-to-alls among all ranks (no member bookkeeping)."""
    if isinstance(op, (GroupCollective, SendRecv)):
        return False
    return getattr(op, "ranks", None) is None


def _members(op: Op, R: int, seen: dict[int, tuple]
             ) -> tuple[np.ndarray, np.ndarray | None, tuple | None]:
    """:func:`members_of` plus, for group collectives, the grouping's sort layout
    ``(order, bounds, gid)``; computed once per ``groups`` object (ops of one program share
    their TP / DP groups), the entry keeping the object alive so its ``id`` stays unique."""
    if not isinstance(op, GroupCollective):
        ranks, group = members_of(op, R)
        return ranks, group, None
    hit = seen.get(id(op.groups))
    if hit is None or hit[0] is not op.groups:
        ranks, group = members_of(op, R)
        order = np.argsort(group, kind="stable")
        change = np.diff(group[order]) != 0
        bounds = np.flatnonzero(np.r_[True, change])
        gid = np.cumsum(np.r_[False, change])
        hit = seen[id(op.groups)] = (op.groups, ranks, group, (order, bounds, gid))
    return hit[1], hit[2], hit[3]


def _flat(ranks: np.ndarray, group: np.ndarray | None, layout: tuple | None, R: int, B: int,
          seen: dict[int, tuple]) -> tuple:
    """An op's members as flat indices over the batch: ``(members, group order, group
    bounds, member → group start, member's group)``, each offset per iteration (``b·R``
    for ranks, ``b·n`` for members, ``b·G`` for groups); the arrays themselves for
    ``B = 1``. Memoised per ``ranks`` object (the entry keeps it alive)."""
    if B == 1:
        return (ranks, *(layout or (None, None, None)), group)
    hit = seen.get(id(ranks))
    if hit is None or hit[0] is not ranks:
        n = len(ranks)
        off = np.arange(B)[:, None]
        out = [(ranks[None] + off * R).reshape(-1)]
        if layout is not None:
            order, bounds, gid = layout
            G = len(bounds)
            out += [(order[None] + off * n).reshape(-1), (bounds[None] + off * n).reshape(-1),
                    (gid[None] + off * G).reshape(-1), (group[None] + off * G).reshape(-1)]
        else:
            out += [None, None, None, None if group is None else group]
        hit = seen[id(ranks)] = (ranks, tuple(out))
    return hit[1]


def _op_times(op: Op, dur: np.ndarray, n_d: int, ready_m: np.ndarray, ranks: np.ndarray,
              group: np.ndarray | None, layout: tuple | None, flat: tuple, B: int, R: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Start and end ``[B·members]`` (iteration-major, aligned with ``ranks``) of ``op`` on
    its member ``ranks`` in each iteration of the batch, from the members' ready times
    ``ready_m`` (same layout); ``dur`` is the flat ``[B·n_d]`` seconds, ``n_d`` per
    iteration: ``R``, members, groups or 1."""
    idx = flat[0]
    n = len(ranks)
    if group is None:  # per-rank op
        return ready_m, ready_m + (dur[idx] if n_d == R else dur)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    if layout is None:  # all-to-all or send/recv batch: one group
        if B == 1:
            start = np.full(n, ready_m.max())
        else:
            start = np.repeat(ready_m.reshape(B, n).max(axis=1), n)
        if isinstance(op, SendRecv):  # per-rank transfer times from a common start
            return start, start + dur[idx]
        return start, start + (dur[0] if B == 1 else np.repeat(dur[::n_d], n))
    _, order, bounds, gid, grp = flat
    gstart = np.maximum.reduceat(ready_m[order], bounds)
    start = np.empty(B * n)
    start[order] = gstart[gid]
    return start, start + dur[grp]


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
