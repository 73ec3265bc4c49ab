"""Turn every rank's measured op times into one RunResult iteration record (rank 0).

Shape legend: ``O`` ops, ``R`` ranks.

The measured times become a :class:`moesim.engine.Schedule` (``start_OR`` / ``end_OR``, NaN where
a rank skipped an op) with the simulator's convention for collectives: a collective *starts* for
its group when the last member arrives — the time a rank spends waiting for stragglers before
that is idle, not busy — and ends when each member returns. From there the record is the
simulator's own (:func:`moesim.records.build_record` on the iteration's lowering context, with
the layout plan under a parallel layout: per-stage arrays at their world ranks, the overload
factor per EP group of a stage), so the two backends' numbers mean the same thing:

- ``step_time_s`` — the latest end of any op on any rank, from the first rank's exit of the
  iteration's start barrier (ranks of one host share the monotonic clock);
- ``moe_time_s`` — max over ranks of the busy time in route, dispatch, expert and combine;
  ``a2a_time_s`` — in dispatch and combine;
- ``straggler_ratio`` — max / mean over ranks of the expert-compute busy time;
- ``tokens_total`` / ``tokens_dropped``; ``peak_memory_bytes`` — the program's memory model
  (max over ranks; on CUDA the measured ``max_memory_allocated`` is added as
  ``measured_peak_memory_bytes``); ``peak_host_bytes``; ``relayout_bytes``; ``planner_time_s``
  (the simulator's ``oom`` column has no executor counterpart: a run that does not fit fails);
- the load and traffic metrics of :mod:`moesim.metrics` from the forced routing and the
  program, the simulator's own function (so both backends give identical values).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.engine import Schedule, members_of
from moesim.executor.timing import OpTimes
from moesim.lowering import LoweringContext
from moesim.ops import AllToAll, GroupCollective, Program, SendRecv
from moesim.results import IterationRecord


def rank_offsets(times: list[OpTimes]) -> np.ndarray:
    """Per-rank shift onto one time axis ``[R]``: on one host with the shared monotonic clock,
    each rank's barrier exit relative to the earliest one (barrier exits can differ by
    milliseconds when ranks share cores); otherwise 0 (each rank from its own barrier exit)."""
    same_clock = all(t.clock == "monotonic" for t in times) and len({t.host for t in times}) == 1
    origins = np.array([t.origin_s for t in times])
    return origins - origins.min() if same_clock else np.zeros(len(times))


def measured_schedule(program: Program, times: list[OpTimes]) -> Schedule:
    """``start_OR`` / ``end_OR`` from every rank's events on one time axis, collective starts
    aligned to the last member's arrival (per group)."""
    O, R = len(program.ops), len(times)
    start, end = np.full((O, R), np.nan), np.full((O, R), np.nan)
    for r, (t, shift) in enumerate(zip(times, rank_offsets(times), strict=True)):
        for i, s, e in t.events:
            start[i, r], end[i, r] = s + shift, e + shift
    for i, op in enumerate(program.ops):
        if not isinstance(op, (GroupCollective, AllToAll, SendRecv)):
            continue
        ranks, group = members_of(op, R)
        for g in np.unique(group):
            members = ranks[group == g]
            arrived = start[i, members]
            if np.isfinite(arrived).any():
                start[i, members] = np.minimum(np.nanmax(arrived), end[i, members])
    return Schedule(start_OR=start, end_OR=end)


def build_record(ctx: LoweringContext, times: list[OpTimes], iteration: int,
                 with_timeline: bool = False, measured_peak_bytes: float | None = None,
                 layout_plan: Any = None) -> IterationRecord:
    """The :class:`IterationRecord` of one executed iteration: the simulator's own record
    (:func:`moesim.records.build_record`, world-rank arrays, stages placed at their ranks
    under ``layout_plan``) of the iteration's lowering ``ctx``, on the measured schedule."""
    from moesim.records import build_record as simulator_record

    rec = simulator_record(ctx, measured_schedule(ctx.program, times), iteration, False,
                           with_timeline, layout_plan)
    rec.summary.pop("oom", None)  # a run that does not fit fails; nothing to mark
    if measured_peak_bytes is not None:
        rec.summary["measured_peak_memory_bytes"] = float(measured_peak_bytes)
    return rec
