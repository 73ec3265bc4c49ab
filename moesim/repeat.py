"""Iterations that repeat one program structure, simulated a batch at a time (issue 16).

Under an unchanged decision, static expert parallelism lowers every iteration to the same ops
in the same order, with the same streams, dependencies, ranks and groups; only the routed data
differs: each (micro-batch, layer)'s dispatch and combine matrices and its expert GEMM rows.
A policy that guarantees this declares ``repeats_structure = True``. The simulator then lowers
one such iteration in full and keeps it as a :class:`Template`, and simulates the later
iterations under the same decision ``B`` at a time without lowering them:

1. route the batch's counts in one call (the routing of a pass does not depend on the others);
2. price the dispatch and combine all-to-alls from the batch's :class:`~moesim.blockmatrix.
   BlockBatch` and the expert GEMMs from its slot rows with the cost model's batched formulas
   (:mod:`moesim.cost_batch`); every other op keeps the template's duration, since its cost
   does not depend on the counts;
3. schedule the batch in one engine pass (:func:`moesim.engine.schedule_batch`);
4. write each iteration's record from the template's phase cells, pass order and traffic
   groups with the iteration's own times, tokens and memory.

Every number equals what the full path (lower, cost, schedule, record) gives the iteration:
the same elementwise steps on the same values, with a leading batch axis
(``tests/sim/test_repeat.py`` compares whole runs bit for bit). An iteration under another
decision, one after a placement change, and one asked for in a timeline take the full path.

Shape legend: ``B`` iterations of a batch, ``M`` passes per iteration, ``X = B·M``, ``L``
layers, ``R`` ranks, ``S`` slots per rank, ``N`` stacked ops, ``K`` members of an all-to-all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim import metrics
from moesim.blockmatrix import BlockBatch, block_sums, block_sums_available, io_from_sums
from moesim.cost_batch import (
    a2a_latency_times,
    batch_times,
    gemm_stack_times,
)
from moesim.decide_step import iterations_counts
from moesim.engine import members_of, schedule_batch, spans_world
from moesim.ops import AllToAll, Compute, Program
from moesim.placement import Decision
from moesim.records import op_cells, phase_times_batch, program_relayout_bytes
from moesim.routing import rank_matrix
from moesim.routing_blocks import block_column_sums
from moesim.traffic import Traffic

#: bytes of per-iteration arrays one batch may hold (schedule rows, phase cells, routed data)
BATCH_BYTES = 2**30
MAX_BATCH = 64


def same_routing(a: Decision | None, b: Decision | None) -> bool:
    """Whether ``b`` places experts and routes tokens as ``a`` does (the same routing plan)."""
    if a is b:
        return a is not None
    return (a is not None and b is not None and a.routing == b.routing
            and a.info.get("ep_size") == b.info.get("ep_size")
            and a.placement.phy2log_LP.shape == b.placement.phy2log_LP.shape
            and a.placement.slots_per_rank == b.placement.slots_per_rank
            and np.array_equal(a.placement.phy2log_LP, b.placement.phy2log_LP))


def same_decision(a: Decision | None, b: Decision | None) -> bool:
    """:func:`same_routing` with the same slot capacity (so it lowers to the same
    structure)."""
    return same_routing(a, b) and (a is b or a.slot_capacity == b.slot_capacity)


@dataclass
class Template:
    """One fully lowered iteration's structure and its data-free facts (module docstring)."""

    decision: Decision
    ops: list
    durations: list  # per op: the template's seconds (the data ops' are replaced per batch)
    a2a: list  # (op index, mb, layer, representative BlockDiag)
    gemm: dict  # (passes, weight bytes, FLOPs per token) -> [(op index, mb, layer)]
    act: list  # recomputed expert activations: (op index, mb, layer)
    act_ctx: Any  # a stage context (sizes the activations)
    cells: list  # per op, its (layer, phase) cell (records.op_cells)
    pass_order: list
    relayout_bytes: float
    traffic_edges: list
    traffic_groups: list  # (signature, [(mb, layer), ...])
    one_traffic_group: bool  # one group holds every (pass, layer) of the iteration
    traffic_layers: list | None  # per group its layers, when it holds all their passes
    shape: tuple  # (M, L, R, S): R token sources (one stage's ranks)
    world: int  # ranks of the program
    batch: int
    first: bool = False  # captured from a first iteration (no previous decision)
    engine_memo: dict = field(default_factory=dict)  # schedule_batch's, across batches
    states: dict = field(default_factory=dict)  # id(decision) -> (decision, state)

    def fits(self, decision: Decision, previous: Decision | None) -> bool:
        """An iteration under ``decision`` after ``previous`` repeats this structure (after
        none: when the template itself came from a first iteration)."""
        return same_decision(self.decision, decision) and (
            same_decision(decision, previous) or (previous is None and self.first))


def capture(policy: Any, ctx: Any, durations: list, batched: tuple[set, set],
            layout_plan: Any) -> Template | None:
    """The :class:`Template` of a fully lowered iteration, or None when it may not serve
    (a policy without ``repeats_structure``, expert tensor parallelism, a changed placement,
    or an op whose data the batch could not price the way the full path does: ``batched``
    names the ops :meth:`~moesim.costmodel.CostModel.durations_batched` priced so). The first
    iteration (no previous decision) serves when its program relays nothing out: it is
    then the program every later iteration under the same decision lowers to."""
    from moesim.policies.base import repeats_structure

    ops = ctx.program.ops
    if not repeats_structure(policy) or (layout_plan is not None and layout_plan.layout.etp > 1):
        return None
    if ctx.previous is None:  # the first iteration: it serves when nothing was relaid out
        if any(op.phase == "relayout" for op in ops):
            return None
    elif not same_decision(ctx.previous, ctx.decision):
        return None
    stages = getattr(ctx, "stage_contexts", None) or [ctx]
    batches = {id(c._iter["token_batch"]): (c._iter["token_batch"], c.layer_ids)
               for c in stages if "token_batch" in c._iter}

    def global_index(B: Any) -> tuple[int, int] | None:
        """A matrix's (pass, global MoE layer) in the iteration's routed tokens."""
        hit = None if B.batch is None else batches.get(id(B.batch[0]))
        if hit is None or hit[0] is not B.batch[0]:
            return None
        mb, l = B.batch[1]
        return mb, (l if hit[1] is None else int(hit[1][l]))

    a2a_ok, gemm_ok = batched  # the ops the cost model priced in batches
    M, L, R, _ = ctx.tokens_MLRG.shape
    S = ctx.placement.slots_per_rank
    a2a, gemm, act = [], {}, []
    for i, op in enumerate(ops):
        if isinstance(op, AllToAll):
            at = global_index(op.bytes_RR)
            if i not in a2a_ok or at is None:
                return None
            a2a.append((i, *at, op.bytes_RR))
        elif isinstance(op, Compute) and op.gemm_tokens_RS is not None:
            mb, l = op.micro_batch, op.layer
            if i not in gemm_ok or mb < 0 or l < 0 or np.shape(op.gemm_tokens_RS) != (R, S) \
                    or not np.array_equal(op.gemm_tokens_RS, ctx.rows_MLP[mb, l].reshape(R, S)):
                return None
            key = (float(op.gemm_passes), op.weight_bytes, op.flops_per_token)
            gemm.setdefault(key, []).append((i, mb, l))
        elif isinstance(op, Compute) and op.phase == "expert":  # the recomputed activation
            if not _is_moe_act(op, stages[0], ctx.rows_MLP, S):
                return None
            act.append((i, op.micro_batch, op.layer))
    edges, groups = Traffic.edges_and_blocks(ops, ctx.program.num_ranks)
    traffic_groups = []
    for sig, mats in groups:
        idx = [global_index(B) for B in mats]
        if any(x is None for x in idx):
            return None
        traffic_groups.append((sig, idx))
    world = ctx.program.num_ranks
    members = sum(world if spans_world(op) else len(members_of(op, world)[0]) for op in ops)
    per_it = 8 * (2 * members + 3 * (L + 1) * 10 * world + 8 * M * L * R * S)
    return Template(
        decision=ctx.decision, ops=ops, durations=durations, a2a=a2a, gemm=gemm, act=act,
        act_ctx=stages[0], cells=op_cells(ops, L), pass_order=metrics.pass_order(ops, M, L),
        relayout_bytes=program_relayout_bytes(ops), traffic_edges=edges.edges,
        traffic_groups=traffic_groups, shape=(M, L, R, S), world=world,
        one_traffic_group=len(traffic_groups) == 1
        and sorted(traffic_groups[0][1]) == [(mb, l) for mb in range(M) for l in range(L)],
        traffic_layers=_group_layers(traffic_groups, M),
        batch=int(max(1, min(MAX_BATCH, BATCH_BYTES // max(per_it, 1)))),
        first=ctx.previous is None)


def _group_layers(groups: list, M: int) -> list | None:
    """Each traffic group's layers when it holds every pass of each (what lets the one pass
    sum them per layer), else None."""
    out = []
    for _, idx in groups:
        layers = sorted({l for _, l in idx})
        if sorted(idx) != [(mb, l) for mb in range(M) for l in layers]:
            return None
        out.append(layers)
    return out


def _is_moe_act(op: Compute, stage: Any, rows_MLP: np.ndarray, S: int) -> bool:
    """Whether ``op`` is the recomputed expert activation of its (pass, layer), sized from
    the routed rows as :meth:`~moesim.stage_context.StageView.moe_act_work` sizes it."""
    if op.label != "recompute" or op.micro_batch < 0 or op.layer < 0:
        return False
    want = stage.moe_act_work(rows_MLP[op.micro_batch, op.layer].reshape(-1, S).sum(axis=1))
    return all(np.array_equal(np.asarray(getattr(op, k)), v) for k, v in want.items())


def batch_durations(t: Template, ctx: Any, cost: Any, B: int) -> list[np.ndarray]:
    """Every op's ``[B, …]`` seconds for a batch routed into ``ctx`` (its passes: ``B·M``)."""
    M, L, R, S = t.shape
    out = [np.broadcast_to(d, (B, len(d))) for d in t.durations]
    batch = ctx.token_batch()
    g = cost.cluster.gpus_per_node
    bw = cost._links["all_to_all"][0]
    tables: dict[tuple, tuple] = {}
    b_idx = np.arange(B) * M
    for i, mb, l, rep in t.a2a:
        key = (rep.scale, rep.transposed)
        if key not in tables:
            tables[key] = batch_times(rep, batch, g, bw)
        tmax_XL, spans_XL, K = tables[key]
        x = b_idx + mb
        sec = a2a_latency_times(cost, tmax_XL[x, l], spans_XL[x, l], K)
        out[i] = cost.finish_a2a(sec, t.ops[i])[:, None]
    rows_BMLRS = ctx.rows_MLP.reshape(B, M, L, R, S)
    for (p, w, f), items in t.gemm.items():
        idx = np.array([(mb, l) for _, mb, l in items])
        m_int = rows_BMLRS[:, idx[:, 0], idx[:, 1]]
        t_BNR = gemm_stack_times(cost, m_int.astype(np.float64), p, w, f,
                                 m_int if m_int.dtype.kind in "iu" else None)
        for n, (i, _, _) in enumerate(items):
            out[i] = cost.finish_compute(t_BNR[:, n], t.ops[i])
    for i, mb, l in t.act:  # the roofline of the rows' work, per iteration
        work = t.act_ctx.moe_act_work(rows_BMLRS[:, mb, l].sum(axis=2))
        op = t.ops[i]
        out[i] = cost.finish_compute(cost.plain_compute(op, work["flops_R"], work["bytes_R"]),
                                     op)
    return out


def simulate_batch(t: Template, run: Any, items: list[tuple[int, Decision, np.ndarray]],
                   routed_context: Any, attach_memory: Any, check_memory: Any,
                   build_record: Any, decision_state: Any) -> Iterator[tuple[Any, dict]]:
    """``(record, state)`` of each ``(iteration, decision, counts)`` in ``items`` (all under
    the template's decision), yielded in order as each is done (so an iteration that fails
    its memory check stops the run after the earlier ones were written, as on the full
    path); the simulator's own routing, memory (with the layout's stage contexts), OOM check,
    record and state functions do the per-iteration parts."""
    B = len(items)
    M, L, R, S = t.shape
    its = [it for it, _, _ in items]
    if its == list(range(its[0], its[0] + B)):  # consecutive: one view of the trace
        counts = iterations_counts(run.trace.counts_TLRE, M, its[0], B)
    else:
        counts = np.concatenate([c for _, _, c in items])
    decision = items[0][1]
    g = run.cost.cluster.gpus_per_node
    sums: dict = {}
    # the per-iteration traffic groups' rows of the C pass: one per iteration (one group of
    # every (pass, layer)) or one per (iteration, layer)
    x_XL = np.arange(B * M * L)
    acc_rows, acc_count = ((x_XL // (M * L), B) if t.one_traffic_group
                           else ((x_XL // (M * L)) * L + x_XL % L, B * L))
    one_pass = t.traffic_layers is not None and block_sums_available()

    def column_sums(kept: np.ndarray, block: int) -> np.ndarray:
        """One pass over the kept tokens gives the slot rows, the rank-level all-to-all sums
        and the traffic (so the rank matrix itself is never built)."""
        X, _, Rk, Q = kept.shape
        K = Q // S
        if one_pass and (K % g == 0 or g % K == 0):
            got = block_sums(kept.reshape(X * L, Rk, Q), K, g, slots=S, acc_rows=acc_rows,
                             acc_count=acc_count)
            if got is not None:
                sums["all"] = got
                return (got[1] if S == 1 else got[6]).reshape(X, L, -1)
        return block_column_sums(kept, block)

    ctx = routed_context(run.policy, decision, decision, counts, run.model,
                         run.view or run.cluster, run.plan, column_sums, rank_tokens=not one_pass)
    totals = None
    if "all" in sums:
        row, col, diag, node_row, node_col, totals, _ = sums["all"]
        K = ctx.kept_MLRP.shape[-1] // S
        io = io_from_sums(row, col, diag, node_row, node_col, K, g)
        ctx._iter["token_batch"] = BlockBatch.known(
            {g: tuple(x.reshape(B * M, L, -1) for x in io)}, K)
    elif ctx.tokens_MLRG is None:  # the pass did not run (an unexpected dtype): numpy sums
        ctx.tokens_MLRG = rank_matrix(ctx.kept_MLRP, S)
    durs = batch_durations(t, ctx, run.cost, B)
    W = t.world
    bsched = schedule_batch(t.ops, durs, W, B, memo=t.engine_memo)
    phases = phase_times_batch(t.cells, bsched.ranks_O, bsched.start_O, bsched.end_O, L, W,
                               B)
    ends_B = np.full(B, -np.inf)
    for e in bsched.end_O:
        if e.size:
            e = e.reshape(B, -1)
            np.maximum(ends_B, np.where(np.isfinite(e), e, -np.inf).max(axis=1), out=ends_B)
    from moesim.layout_run import world_tokens

    tokens_XLW, dropped_XLW = world_tokens(ctx, run.layout_plan)
    for b, (it, dec, _) in enumerate(items):
        x = slice(b * M, (b + 1) * M)
        c = _iteration_context(ctx, dec, x, run)
        attach_memory(c)
        oom = check_memory(c, run, it)
        known = {"phase_times": phases[b],
                 "traffic": _traffic(t, c, W, None if totals is None
                                     else totals[b] if t.one_traffic_group
                                     else totals[b * L:(b + 1) * L]),
                 "pass_order": t.pass_order, "relayout_bytes": t.relayout_bytes,
                 "makespan_s": float(ends_B[b]) if ends_B[b] > -np.inf else 0.0,
                 "world_tokens": (tokens_XLW[x], dropped_XLW[x])}
        record = build_record(c, _LazySchedule(bsched, b), it, oom, False, run.layout_plan,
                              known=known)
        hit = t.states.get(id(dec))
        if hit is None or hit[0] is not dec:  # the entry keeps ``dec`` alive
            hit = t.states[id(dec)] = (dec, decision_state(dec))
        yield record, hit[1]


class _LazySchedule:
    """Iteration ``b`` of a batch's schedule, sliced out only if a reader asks (the record
    takes its phase times and makespan from the batch)."""

    def __init__(self, bsched: Any, b: int) -> None:
        self._bsched, self._b, self._sched = bsched, b, None

    def __getattr__(self, name: str) -> Any:
        if self._sched is None:
            self._sched = self._bsched.iteration(self._b)
        return getattr(self._sched, name)


def _iteration_context(ctx: Any, decision: Decision, x: slice, run: Any) -> Any:
    """Iteration ``x``'s passes of a batch's routed context, over the template's ops."""
    from moesim.lowering import LoweringContext

    return LoweringContext(
        policy=ctx.policy, decision=decision, previous=decision, model=ctx.model,
        cluster=ctx.cluster, counts_MLRE=ctx.counts_MLRE[x], kept_MLRP=ctx.kept_MLRP[x],
        dropped_MLRP=ctx.dropped_MLRP[x],
        tokens_MLRG=None if ctx.tokens_MLRG is None else ctx.tokens_MLRG[x],
        program=Program(num_ranks=run.template.world, ops=run.template.ops),
        rows_MLP=ctx.rows_MLP[x], dropped_MLR=ctx.dropped_MLR[x],
        layer_bwd_done=list(ctx.layer_bwd_done), block=ctx.block, _consts=run.cache)


def _traffic(t: Template, ctx: Any, world: int, totals: np.ndarray | None = None
             ) -> Traffic:
    """The iteration's :class:`~moesim.traffic.Traffic`: the template's edges (their ops
    move what they moved there) and its block groups summed over this iteration's matrices
    (``totals``: from the one pass, the iteration's sum ``[R, K]`` when one group holds every
    (pass, layer), else its per-layer sums ``[L, R, K]``)."""
    out = Traffic(world)
    out.edges = list(t.traffic_edges)
    if totals is not None and t.one_traffic_group:
        out.fill_blocks([(t.traffic_groups[0][0], [totals])])
    elif totals is not None:
        out.fill_blocks([(sig, [_layer_sum(totals, layers)])
                         for (sig, _), layers in zip(t.traffic_groups, t.traffic_layers,
                                                     strict=True)])
    else:
        tok = ctx.tokens_MLRG
        out.fill_blocks([(sig, [tok[mb, l] for mb, l in idx])
                         for sig, idx in t.traffic_groups])
    return out


def _layer_sum(totals_LRK: np.ndarray, layers: list[int]) -> np.ndarray:
    """The sum of some layers' matrices (int64: exact in any order)."""
    acc = totals_LRK[layers[0]].copy()
    for l in layers[1:]:
        acc += totals_LRK[l]
    return acc
