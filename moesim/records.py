"""An iteration's record: what the simulator writes for one lowered and scheduled iteration.

:func:`build_record` turns a :class:`~moesim.lowering.LoweringContext` and its
:class:`~moesim.engine.Schedule` into an :class:`~moesim.results.IterationRecord` (world-rank
arrays; under a pipeline layout the stages' views are placed at their ranks): per-phase times
(:func:`phase_times`, which the executor's records use too), the summary columns
(:func:`summarize`; their definitions are in :mod:`moesim.simulate`'s docstring), expert load,
bytes moved (:func:`op_bytes`) and the load and traffic metrics of :mod:`moesim.metrics`.

Shape legend: ``M`` passes, ``L`` layers, ``F`` phases, ``R`` ranks, ``E`` experts, ``O`` ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim import memory as memory_model
from moesim import metrics
from moesim.blockmatrix import BlockDiag
from moesim.engine import Schedule
from moesim.lowering import LoweringContext
from moesim.ops import PHASES, AllToAll, GroupCollective, HostCopy, Op, SendRecv
from moesim.results import IterationRecord
from moesim.traffic import first_rank

PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
MOE_PHASES = ("route", "dispatch", "expert", "combine")


def build_record(ctx: LoweringContext, sched: Schedule, it: int, oom: bool,
                 with_timeline: bool, layout_plan: Any = None, *,
                 known: dict | None = None) -> IterationRecord:
    """The iteration's :class:`IterationRecord` from its lowering and schedule (world-rank
    arrays; under a pipeline layout the stages' views are placed at their ranks).

    ``known``: parts the caller already has (:mod:`moesim.repeat`, for iterations that share
    one program structure): ``phase_times`` (``(busy, start, end)``), ``traffic`` (a
    :class:`~moesim.traffic.Traffic`), ``pass_order``, ``relayout_bytes``, ``makespan_s``,
    ``world_tokens`` (:func:`~moesim.layout_run.world_tokens`' pair)."""
    from moesim.layout_run import world_tokens

    known = known or {}
    L = ctx.model.num_layers
    world = ctx.program.num_ranks
    tokens_MLR, dropped_MLR = known.get("world_tokens") or world_tokens(ctx, layout_plan)
    busy, start, end = known.get("phase_times") or phase_times(ctx.program.ops, sched, L)
    gpu = {k: np.asarray(v, dtype=np.float64) for k, v in ctx.program.memory_bytes.items()}
    load_LE = expert_load(ctx)
    summary = summarize(ctx, sched, busy, gpu, oom, load_LE, known.get("relayout_bytes"),
                        known.get("makespan_s"))
    view_tokens_MLR = ctx.rows_MLP.reshape(*ctx.rows_MLP.shape[:2], ctx.world, -1).sum(axis=3)
    extra, traffic = metrics.iteration_metrics(view_tokens_MLR, load_LE, ctx.program.ops, world,
                                               ctx.cluster.gpus_per_node,
                                               ep_groups(ctx) if layout_plan else None,
                                               traffic=known.get("traffic"),
                                               order=known.get("pass_order"))
    summary.update(extra)
    timeline = None
    if with_timeline:
        from moesim.timeline import chrome_events

        timeline = chrome_events(ctx.program.ops, sched, iteration=it)
    return IterationRecord(
        iteration=it, summary=summary, busy_s_LFR=busy, start_s_LFR=start, end_s_LFR=end,
        expert_load_LE=load_LE,
        rank_tokens_LR=tokens_MLR.sum(axis=0), dropped_LR=dropped_MLR.sum(axis=0), memory_CR=gpu,
        timeline=timeline, traffic_FRR=traffic)


def ep_groups(ctx: LoweringContext) -> list[np.ndarray]:
    """A stage's EP groups (consecutive ranks of the policy's EP size; every rank of the stage
    when the policy spans it), over which the overload factor is taken under a layout."""
    n = ctx.world
    ep = int(ctx.decision.info.get("ep_size") or n)
    return [np.arange(g * ep, (g + 1) * ep) for g in range(n // ep)] if n % ep == 0 \
        else [np.arange(n)]


def phase_times(ops: list[Op], sched: Schedule, num_layers: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(busy_s, start_s, end_s)`` each ``[L+1, F, R]``: summed durations, first start and
    last end of each (layer, phase) per rank (per-iteration ops go to index ``L``).

    From the schedule's member spans (:meth:`~moesim.engine.Schedule.spans`), all ops at
    once: busy times are summed in program order (``bincount``), as one row update per op
    would."""
    R, F = sched.num_ranks, len(PHASES)
    cells = (num_layers + 1) * F
    cell_O = op_cells(ops, num_layers)
    cell_N, ranks_N, firsts, lasts = [], [], [], []
    for i, ranks, st, en in sched.spans():
        cell_N.append(cell_O[i])
        ranks_N.append(ranks)
        firsts.append(st)
        lasts.append(en)
    if ranks_N:  # key = cell · R + rank, per member of each op (one repeat, one concatenate)
        sizes_N = np.fromiter((len(r) for r in ranks_N), np.int64, len(ranks_N))
        key = np.repeat(np.asarray(cell_N, np.int64) * R, sizes_N)
        key += np.concatenate(ranks_N)
        first, last = np.concatenate(firsts), np.concatenate(lasts)
    else:
        key, first, last = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    dur = last - first
    np.copyto(dur, 0.0, where=np.isnan(dur))
    busy = np.bincount(key, weights=dur, minlength=cells * R)
    start, end = np.full(cells * R, np.inf), np.full(cells * R, -np.inf)
    np.minimum.at(start, key, np.where(np.isnan(first), np.inf, first))  # fmin's NaN rule
    np.maximum.at(end, key, np.where(np.isnan(last), -np.inf, last))
    start[start == np.inf] = np.nan
    end[end == -np.inf] = np.nan
    return tuple(a.reshape(num_layers + 1, F, R) for a in (busy, start, end))


def op_cells(ops: list[Op], num_layers: int) -> list[int]:
    """Each op's (layer, phase) cell of :func:`phase_times`' arrays (flattened)."""
    F = len(PHASES)
    return [(op.layer if op.layer >= 0 else num_layers) * F + PHASE_INDEX[op.phase]
            for op in ops]


def phase_times_batch(cell_O: list[int], ranks_O: list, start_O: list, end_O: list,
                      num_layers: int, num_ranks: int, batch: int
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`phase_times` of each iteration of a batch that shares one program structure:
    per op its cell, its member ranks (None: all) and flat ``[B·members]`` starts and ends
    (a :class:`~moesim.engine.BatchSchedule`'s lists). One pass over the ops in program order
    (busy times summed in the order :func:`phase_times`' ``bincount`` sums them, so the
    values are the same), its Python work per op shared by the batch, where
    :func:`phase_times` vectorises one iteration over every member of every op instead; a
    rank's NaN start or end counts as no time, and it never sets a first start or last end
    (``fmin`` / ``fmax``)."""
    B = batch
    shape = (B, (num_layers + 1) * len(PHASES), num_ranks)
    busy, start, end = np.zeros(shape), np.full(shape, np.nan), np.full(shape, np.nan)
    spans: dict[int, tuple] = {}  # id(ranks) -> (ranks, slice or ranks): consecutive ranks slice
    for c, ranks, st, en in zip(cell_O, ranks_O, start_O, end_O, strict=True):
        if st.size == 0:
            continue
        st, en = st.reshape(B, -1), en.reshape(B, -1)
        dur = en - st
        np.copyto(dur, 0.0, where=np.isnan(dur))
        if ranks is None:
            idx = (slice(None), c)
        else:
            hit = spans.get(id(ranks))
            if hit is None or hit[0] is not ranks:
                first = first_rank(ranks)
                hit = spans[id(ranks)] = (ranks, ranks if first is None
                                          else slice(first, first + len(ranks)))
            idx = (slice(None), c, hit[1])
        busy[idx] += dur
        start[idx] = np.fmin(start[idx], st)  # NaN (no time yet, or none) never wins
        end[idx] = np.fmax(end[idx], en)
    out = (busy, start, end)
    return [tuple(a[b].reshape(num_layers + 1, len(PHASES), num_ranks) for a in out)
            for b in range(B)]


def expert_load(ctx: LoweringContext) -> np.ndarray:
    """Tokens routed to each expert before drops, ``[L, E]``; from the per-slot rows when
    nothing was dropped (avoids another pass over the counts)."""
    if ctx.decision.slot_capacity is not None:
        return ctx.counts_MLRE.sum(axis=(0, 2))
    phy = ctx.placement.phy2log_LP
    L, E = phy.shape[0], ctx.placement.num_experts
    rows_LP = ctx.rows_MLP.sum(axis=0)
    out = np.zeros((L, E), dtype=np.int64)
    l_idx, p_idx = np.nonzero(phy >= 0)
    np.add.at(out, (l_idx, phy[l_idx, p_idx]), rows_LP[l_idx, p_idx])
    return out


def summarize(ctx: LoweringContext, sched: Schedule, busy_LFR: np.ndarray,
              gpu: dict[str, np.ndarray], oom: bool, load_LE: np.ndarray,
              relayout_bytes: float | None = None, makespan_s: float | None = None
              ) -> dict[str, float]:
    """The summary columns (see the module docstring); ``relayout_bytes`` (the program's
    :func:`program_relayout_bytes`) and ``makespan_s`` where the caller has them."""
    busy_FR = busy_LFR.sum(axis=0)
    moe_R = sum(busy_FR[PHASE_INDEX[p]] for p in MOE_PHASES)
    a2a_R = busy_FR[PHASE_INDEX["dispatch"]] + busy_FR[PHASE_INDEX["combine"]]
    expert_R = busy_FR[PHASE_INDEX["expert"]]
    mean = float(expert_R.mean())
    R = ctx.program.num_ranks
    host = memory_model.peak_R(ctx.program.host_memory_bytes, R)
    return {
        "step_time_s": sched.makespan_s if makespan_s is None else makespan_s,
        "moe_time_s": float(moe_R.max()),
        "a2a_time_s": float(a2a_R.max()),
        "straggler_ratio": float(expert_R.max() / mean) if mean > 0 else 1.0,
        "tokens_total": int(load_LE.sum()),
        "tokens_dropped": int(ctx.dropped_MLR.sum()),
        "peak_memory_bytes": float(memory_model.peak_R(gpu, R).max()),
        "relayout_bytes": (program_relayout_bytes(ctx.program.ops) if relayout_bytes is None
                           else relayout_bytes),
        "planner_time_s": float(ctx.decision.planner_time_s),
        "peak_host_bytes": float(host.max()),
        "oom": int(oom),
    }


def program_relayout_bytes(ops: list[Op]) -> float:
    """Bytes the program's ``relayout`` ops move."""
    return float(sum(op_bytes(op) for op in ops if op.phase == "relayout"))


def op_bytes(op: Op) -> float:
    """Bytes an op moves between devices (self-traffic excluded); 0 for compute."""
    if isinstance(op, SendRecv):
        keep = np.asarray(op.src_N) != np.asarray(op.dst_N)
        return float(np.asarray(op.bytes_N, dtype=float)[keep].sum())
    if isinstance(op, AllToAll):
        if isinstance(op.bytes_RR, BlockDiag):
            return float(op.bytes_RR.sum() - op.bytes_RR.diagonal().sum())
        B = np.asarray(op.bytes_RR, dtype=float)
        return float(B.sum() - np.trace(B))
    if isinstance(op, GroupCollective):
        return float(np.asarray(op.bytes_G, dtype=float)[op.group_sizes > 1].sum())
    if isinstance(op, HostCopy):
        return float(np.asarray(op.bytes_R, dtype=float).sum())
    return 0.0


