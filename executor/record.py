"""Turn every rank's measured op times into one RunResult iteration record (rank 0).

Shape legend: ``O`` ops, ``L`` MoE layers (+1: index ``L`` holds per-iteration ops), ``F``
phases, ``R`` ranks, ``E`` experts, ``M`` passes of the iteration, ``S`` slots per rank.

The measured times become a :class:`moesim.engine.Schedule` (``start_OR`` / ``end_OR``, NaN where
a rank skipped an op) with the simulator's convention for collectives: a collective *starts* for
its group when the last member arrives — the time a rank spends waiting for stragglers before
that is idle, not busy — and ends when each member returns. From there the arrays, summary
columns and timeline are computed by the simulator's own functions
(:func:`moesim.simulate.phase_times`, :func:`moesim.timeline.chrome_events`), so the two backends'
numbers mean the same thing:

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

import numpy as np

from moesim.engine import Schedule, members_of
from moesim.executor.timing import OpTimes
from moesim.ops import PHASES, AllToAll, GroupCollective, Program, SendRecv
from moesim.placement import Decision
from moesim.results import IterationRecord

_IDX = {p: i for i, p in enumerate(PHASES)}


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


def summarize(busy_LFR: np.ndarray, sched: Schedule, program: Program, decision: Decision | None,
              counts_MLRE: np.ndarray, dropped_LR: np.ndarray) -> dict[str, float]:
    """The summary columns (see the module docstring)."""
    from moesim import memory as memory_model
    from moesim.simulate import op_bytes

    busy_FR = busy_LFR.sum(axis=0)
    expert_R = busy_FR[_IDX["expert"]]
    mean = float(expert_R.mean())
    moe_R = sum(busy_FR[_IDX[p]] for p in ("route", "dispatch", "expert", "combine"))
    R = program.num_ranks
    return {
        "step_time_s": sched.makespan_s,
        "moe_time_s": float(moe_R.max()),
        "a2a_time_s": float((busy_FR[_IDX["dispatch"]] + busy_FR[_IDX["combine"]]).max()),
        "straggler_ratio": float(expert_R.max() / mean) if mean > 0 else 1.0,
        "tokens_total": int(np.asarray(counts_MLRE).sum()),
        "tokens_dropped": int(dropped_LR.sum()),
        "peak_memory_bytes": float(memory_model.peak_R(program.memory_bytes, R).max()),
        "peak_host_bytes": float(memory_model.peak_R(program.host_memory_bytes, R).max()),
        "relayout_bytes": float(sum(op_bytes(op) for op in program.ops
                                    if op.phase == "relayout")),
        "planner_time_s": float(decision.planner_time_s) if decision is not None else 0.0,
    }


def build_record(iteration: int, program: Program, decision: Decision | None,
                 counts_MLRE: np.ndarray, times: list[OpTimes], with_timeline: bool = False,
                 measured_peak_bytes: float | None = None,
                 gpus_per_node: int | None = None) -> IterationRecord:
    """The :class:`IterationRecord` of one executed iteration (``gpus_per_node``: the node
    size for the node-imbalance and link metrics; default all ranks on one node)."""
    from moesim import metrics
    from moesim.simulate import phase_times
    from moesim.timeline import chrome_events

    routes = program.routes
    L = 1 + max(l for _, l in routes)
    M = 1 + max(mb for mb, _ in routes)
    R, S = program.num_ranks, next(iter(routes.values())).slots_per_rank
    sched = measured_schedule(program, times)
    busy, start, end = phase_times(program.ops, sched, L)
    kept_MLRP = np.stack([np.stack([routes[(mb, l)].kept_RP for l in range(L)])
                          for mb in range(M)])
    dropped_LR = np.stack([sum(np.asarray(routes[(mb, l)].dropped_R) for mb in range(M))
                           for l in range(L)])
    summary = summarize(busy, sched, program, decision, counts_MLRE, dropped_LR)
    load_LE = np.asarray(counts_MLRE).sum(axis=(0, 2))
    extra, traffic = metrics.iteration_metrics(kept_MLRP.sum(axis=2).reshape(M, L, R, S)
                                               .sum(axis=3), load_LE, program.ops, R,
                                               gpus_per_node or R)
    summary.update(extra)
    if measured_peak_bytes is not None:
        summary["measured_peak_memory_bytes"] = float(measured_peak_bytes)
    memory = {k: np.asarray(v, dtype=float) for k, v in program.memory_bytes.items()}
    return IterationRecord(
        iteration=iteration, summary=summary, busy_s_LFR=busy, start_s_LFR=start,
        end_s_LFR=end, expert_load_LE=load_LE, traffic_FRR=traffic,
        rank_tokens_LR=kept_MLRP.sum(axis=(0, 2)).reshape(L, R, S).sum(axis=2),
        dropped_LR=dropped_LR, memory_CR=memory,
        timeline=chrome_events(program.ops, sched, iteration=iteration)
        if with_timeline else None)
