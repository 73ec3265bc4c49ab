"""Lowering: one iteration's decision + routing counts → an SPMD :class:`~moesim.ops.Program`.

Shape legend: ``M`` micro-batches (passes) of the iteration, ``L`` MoE layers, ``R`` source
ranks (= world size), ``G`` destination ranks (= R), ``P = G·S`` physical slots, ``S`` slots per
rank, ``E`` logical experts, ``N`` point-to-point transfers.

Program shape (gradient accumulation; every micro-batch runs its forward then its backward)::

    relayout                                  policy.lower_relayout
    for mb:  for l in 0..L-1:                 forward
               [param_gather (prefetch)]      policy.lower_param_gather(mb, l, "fwd")
               dense → route → [after_route]  policy.lower_after_route(mb, l)
               dispatch a2a → expert → combine a2a
             for l in L-1..0:                 backward
               combine-bwd a2a → expert-bwd (2 GEMM passes) → [param_gather of l−1]
               → dispatch-bwd a2a → dense-bwd (2× FLOPs; router backward folded in)
               (last mb only) policy.lower_layer_grads(l)
    grad_sync                                 policy.lower_grad_sync
    optimizer                                 policy.lower_optimizer

Token bytes on the wire come from the *actual* source→destination counts after the routing rule
and capacity (:mod:`moesim.routing`); dispatch moves ``bytes_RG`` and combine its transpose (the
same array, transposed view: the cost model uses that to cost each layer's matrix once). The
``emit_*`` helpers of :class:`LoweringContext` are static EP's per-iteration ops; policies call
them from their hooks or write their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim import memory as memory_model
from moesim.blockmatrix import BlockDiag
from moesim.ops import (
    AllGather,
    AllReduce,
    Compute,
    LayerRoute,
    Program,
    ReduceScatter,
    SendRecv,
)
from moesim.placement import Decision, Placement
from moesim.routing import RoutePlan, rank_matrix
from moesim.routing_blocks import BlockRoutePlan, block_column_sums, plan_routes
from moesim.specs import Cluster, ModelSpec
from moesim.stage_context import StageView


@dataclass
class LoweringContext(StageView):
    """Everything a policy's lowering hook may read, plus where it appends ops.

    Routed tokens (after the routing rule and capacity): ``kept_MLRP`` / ``dropped_MLRP``
    (the trace's integer dtype), ``tokens_MLRG`` (source → destination rank). ``block`` > 0:
    sources send only inside blocks of ``block`` consecutive ranks, and these three hold the
    in-block part (``P``: the block's ``block·S`` slots, ``G``: its ranks; see
    :mod:`moesim.routing_blocks`); ``rows_MLP`` is over every slot either way. Anchors:
    ``gather_anchor`` (op whose end frees the gather buffer, -1 if none), ``layer_bwd_done[l]``
    (last expert-backward op of layer ``l``), ``backward_done`` (last op of the backward;
    per-iteration ops wait for it).
    """

    policy: Any
    decision: Decision
    previous: Decision | None
    model: ModelSpec
    cluster: Cluster
    counts_MLRE: np.ndarray
    kept_MLRP: np.ndarray
    dropped_MLRP: np.ndarray
    tokens_MLRG: np.ndarray
    program: Program
    rows_MLP: np.ndarray = None  # tokens each slot computes (kept, summed over sources)
    dropped_MLR: np.ndarray = None  # tokens each source dropped
    gather_anchor: int = -1
    layer_bwd_done: list[int] = field(default_factory=list)
    layer_grad_ops: list[int] = field(default_factory=list)
    backward_done: int = -1
    grad_sync_ops: list[int] = field(default_factory=list)
    block: int = 0
    _consts: dict = field(default_factory=dict)
    _iter: dict = field(default_factory=dict)  # this iteration's cached arrays

    # -- basics -----------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self.decision.placement

    @property
    def world(self) -> int:
        return self.cluster.world_size

    @property
    def all_ranks(self) -> np.ndarray:
        return np.arange(self.world)

    def const_R(self, value: float, dtype: Any = np.float64) -> np.ndarray:
        """A read-only ``[R]`` array filled with ``value`` (shared between ops)."""
        key = (float(value), np.dtype(dtype).str)
        if key not in self._consts:
            arr = np.full(self.world, value, dtype=dtype)
            arr.setflags(write=False)
            self._consts[key] = arr
        return self._consts[key]

    def step_deps(self) -> tuple[int, ...]:
        """Deps of per-iteration gradient ops: the end of the backward and every op the
        per-layer gradient hooks returned."""
        base = (self.backward_done,) if self.backward_done >= 0 else ()
        return base + tuple(self.layer_grad_ops)

    def optimizer_deps(self) -> tuple[int, ...]:
        """Deps of the optimizer step: the grad-sync ops (else :meth:`step_deps`)."""
        return tuple(self.grad_sync_ops) or self.step_deps()

    def holders_LEG(self) -> np.ndarray:
        """``holders[l, e, g]``: rank ``g`` holds a replica of expert ``e`` in layer ``l``."""
        if "holders" not in self._consts:
            p = self.placement
            phy = p.phy2log_LP
            out = np.zeros((p.num_layers, p.num_experts, p.num_ranks), dtype=bool)
            l_idx, s_idx = np.nonzero(phy >= 0)
            out[l_idx, phy[l_idx, s_idx], s_idx // p.slots_per_rank] = True
            self._consts["holders"] = out
        return self._consts["holders"]

    def holder_counts_LE(self) -> np.ndarray:
        """Distinct ranks holding each expert, ``[L, E]`` (from the slot map alone)."""
        if "holder_counts" not in self._consts:
            p = self.placement
            phy = p.phy2log_LP
            l_idx, s_idx = np.nonzero(phy >= 0)
            code = ((l_idx * p.num_experts + phy[l_idx, s_idx]) * p.num_ranks
                    + s_idx // p.slots_per_rank)
            counts = np.bincount(np.unique(code) // p.num_ranks,
                                 minlength=p.num_layers * p.num_experts)
            self._consts["holder_counts"] = counts.reshape(p.num_layers, p.num_experts)
        return self._consts["holder_counts"]

    def replica_rank_groups(self, layer: int) -> list[tuple[np.ndarray, list[int]]]:
        """Distinct sets of ranks holding replicas of the same expert in ``layer`` (only sets
        of 2+ ranks), each with the experts it holds, in order of each set's lowest expert:
        ``[(ranks, experts), ...]``. Computed once per decision (``cache``)."""
        key = ("replica_groups", layer)
        if key not in self._consts:
            self._consts[key] = self._replica_rank_groups(layer)
        return self._consts[key]

    def replica_rounds(self, layer: int) -> list[tuple[list[np.ndarray], list[int]]]:
        """:meth:`replica_rank_groups` split into rounds of disjoint groups, one expert per
        group (what one collective op can carry); cached per decision."""
        key = ("replica_rounds", layer)
        if key not in self._consts:
            self._consts[key] = _disjoint_rounds(self.replica_rank_groups(layer))
        return self._consts[key]

    def _replica_rank_groups(self, layer: int) -> list[tuple[np.ndarray, list[int]]]:
        multi = np.flatnonzero(self.holder_counts_LE()[layer] > 1)
        if len(multi) == 0:
            return []
        rows, cols = np.nonzero(self.holders_LEG()[layer][multi])
        bounds = np.flatnonzero(np.diff(rows)) + 1
        sets: dict[tuple[int, ...], list[int]] = {}
        for e, ranks in zip(multi.tolist(), np.split(cols, bounds), strict=True):
            sets.setdefault(tuple(ranks.tolist()), []).append(e)
        return [(np.array(k, dtype=np.int64), v) for k, v in sets.items()]

    # -- static EP's per-iteration ops (policies reuse them) ----------------------------------
    def emit_expert_grad_allreduce(self) -> list[int]:
        """All-reduce each expert's grads among the ranks holding it (with ``zero`` ≥ 1 a
        reduce-scatter: each replica keeps its optimizer shard's slice): per layer, rounds of
        disjoint groups (one expert per group, so the executor knows which tensor moves)."""
        m, out = self.model, []
        grad_bytes = m.params_per_expert * m.bytes_grad
        cls = ReduceScatter if self.layout.zero in (1, 2, 3) else AllReduce
        for l in range(self.placement.num_layers):
            for groups, experts in self.replica_rounds(l):
                out.append(self.add(cls(
                    phase="grad_sync", direction="step", layer=l, deps=self.step_deps(),
                    groups=tuple(groups), bytes_G=np.full(len(groups), grad_bytes),
                    experts_G=np.array(experts, dtype=np.int64), label="expert_grads")))
        return out

    def emit_dense_grad_allreduce(self) -> list[int]:
        """Synchronise the stage's dense (non-expert) grads over data parallelism: one group
        per TP shard (all ranks without TP); an all-reduce, or with ``zero`` 1–2 a
        reduce-scatter (ZeRO-3 already reduce-scattered them layer by layer)."""
        m, zero = self.model, self.layout.zero
        nbytes = self.stage_dense_params() / self.layout.tp * m.bytes_grad
        if self.dp_size < 2 or nbytes <= 0 or zero == 3:
            return []
        cls = ReduceScatter if zero in (1, 2) else AllReduce
        groups = self.dp_groups
        return [self.add(cls(
            phase="grad_sync", direction="step", deps=self.step_deps(), groups=groups,
            bytes_G=np.full(len(groups), nbytes) if len(groups) > 1 else np.array([nbytes]),
            experts_G=np.full(len(groups), -1), label="dense_grads"))]

    def emit_zero1_optimizer(self, deps: tuple[int, ...] | None = None) -> list[int]:
        """ZeRO-1: Adam on each rank's shard (1/DP of dense, 1/replicas of each local expert;
        memory-bound: reads and writes master/m/v, reads the grad, writes the weight), then an
        all-gather of updated dense weights and of each replicated expert's weights."""
        m = self.model
        deps = self.optimizer_deps() if deps is None else deps
        if "optimizer_params" not in self._consts:
            self._consts["optimizer_params"] = self.expert_shard_params_R() \
                + self.dense_shard_params_R()
        params_R = self._consts["optimizer_params"]
        per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
        step = self.add(Compute(phase="optimizer", direction="step", kind="other", deps=deps,
                                flops_R=params_R * 10.0, bytes_R=params_R * per_param,
                                label="adam"))
        return [step] + self.emit_param_allgather((step,))

    def emit_param_allgather(self, deps: tuple[int, ...]) -> list[int]:
        """ZeRO-1's second half: all-gather the updated dense weights over all ranks and each
        replicated expert's weights over its holders (phase ``optimizer``)."""
        m, out = self.model, self.emit_dense_param_allgather(deps)
        if self.layout.zero in (0, 3):  # every replica updated its own copy / kept sharded
            return out
        for l in range(self.placement.num_layers):
            for groups, experts in self.replica_rounds(l):
                out.append(self.add(AllGather(
                    phase="optimizer", direction="step", layer=l, deps=deps,
                    groups=tuple(groups), bytes_G=np.full(len(groups), m.expert_weight_bytes),
                    experts_G=np.array(experts, dtype=np.int64), label="expert_params")))
        return out

    def emit_dense_param_allgather(self, deps: tuple[int, ...]) -> list[int]:
        """All-gather the updated dense weights over data parallelism (one group per TP
        shard); none without a sharded optimizer (``zero=0``) or with ZeRO-3 (parameters
        stay sharded and are gathered layer by layer)."""
        m = self.model
        dense_bytes = self.stage_dense_params() / self.layout.tp * m.bytes_weight
        if self.dp_size < 2 or dense_bytes <= 0 or self.layout.zero in (0, 3):
            return []
        groups = self.dp_groups
        return [self.add(AllGather(
            phase="optimizer", direction="step", deps=deps, groups=groups,
            bytes_G=np.full(len(groups), dense_bytes) if len(groups) > 1
            else np.array([dense_bytes]), experts_G=np.full(len(groups), -1),
            label="dense_params"))]

    def expert_shard_params_R(self) -> np.ndarray:
        """Expert parameters whose optimizer state each rank updates: each expert's state
        split over its replicas (``zero=0``: every replica updates its own full copy)."""
        p, P = self.placement, self.model.params_per_expert
        if self.layout.zero == 0:
            return memory_model.slots_filled_R(p) * float(P)
        return memory_model.expert_optimizer_params_R(p, P)

    def emit_relayout_sendrecv(self, extra_bytes_per_expert: float = 0.0) -> list[int]:
        """Per layer, a ``SendRecv`` of every changed slot's weights (plus
        ``extra_bytes_per_expert``, e.g. optimizer state) from a previous holder."""
        if self.previous is None:
            return []
        prev = self.previous.placement
        if prev.phy2log_LP.shape != self.placement.phy2log_LP.shape or prev is self.placement \
                or np.array_equal(prev.phy2log_LP, self.placement.phy2log_LP):
            return []
        nbytes = self.model.expert_weight_bytes + extra_bytes_per_expert
        out = []
        for l in range(self.placement.num_layers):
            src, dst, exp = _moves(prev.layer(l), self.placement.layer(l),
                                   self.placement.slots_per_rank, self.cluster.gpus_per_node)
            if len(src):
                out.append(self.add(SendRecv(
                    phase="relayout", direction="step", layer=l, src_N=src, dst_N=dst,
                    bytes_N=np.full(len(src), nbytes), experts_N=exp, label="relayout")))
        return out


def _disjoint_rounds(sets: list[tuple[np.ndarray, list[int]]]
                     ) -> list[tuple[list[np.ndarray], list[int]]]:
    """Split (ranks, experts) sets into rounds of pairwise disjoint groups, one expert per
    group (first fit, in order)."""
    items = [(ranks, e) for ranks, experts in sets for e in experts]
    rounds: list[tuple[list[np.ndarray], list[int], set]] = []
    for ranks, e in items:
        members = set(ranks.tolist())
        for groups, experts, used in rounds:
            if not used & members:
                groups.append(ranks)
                experts.append(e)
                used |= members
                break
        else:
            rounds.append(([ranks], [e], set(members)))
    return [(g, x) for g, x, _ in rounds]


def _moves(prev_P: np.ndarray, new_P: np.ndarray, slots_per_rank: int, gpus_per_node: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transfers that fill changed slots: ``(src_N, dst_N, experts_N)``; the source is a
    previous holder on the same rank (no transfer), else the same node, else round-robin."""
    src, dst, exp = [], [], []
    prev_rank = np.arange(len(prev_P)) // slots_per_rank
    for p in np.flatnonzero((new_P != prev_P) & (new_P >= 0)):
        e, r = int(new_P[p]), int(p // slots_per_rank)
        holders = np.unique(prev_rank[prev_P == e])
        if len(holders) == 0 or r in holders:
            continue
        local = holders[holders // gpus_per_node == r // gpus_per_node]
        pool = local if len(local) else holders
        src.append(int(pool[len(src) % len(pool)]))
        dst.append(r)
        exp.append(e)
    return (np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64),
            np.array(exp, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# the iteration


def route_iteration(decision: Decision, counts_MLRE: np.ndarray, cluster: Cluster,
                    plan: RoutePlan | BlockRoutePlan | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Route all passes and layers: ``(kept_MLRP, dropped_MLRP, tokens_MLRG)``; with a
    :class:`~moesim.routing_blocks.BlockRoutePlan` in block coordinates (``P``: the block's
    slots, ``G``: its ranks)."""
    if plan is None:
        plan = route_plan(decision, cluster)
    kept, dropped = plan.route(counts_MLRE, decision.slot_capacity)
    return kept, dropped, rank_matrix(kept, decision.placement.slots_per_rank)


def route_plan(decision: Decision, cluster: Cluster) -> RoutePlan | BlockRoutePlan:
    """The decision's routing plan (build once per decision and pass it around): in blocks
    of the EP size where routing stays inside them (:func:`~moesim.routing_blocks.plan_routes`)."""
    return plan_routes(decision.placement, decision.routing, cluster.gpus_per_node,
                       decision.info.get("ep_size"))


def lower_iteration(policy: Any, decision: Decision, previous: Decision | None,
                    counts_PLRE: np.ndarray, model: ModelSpec, cluster: Cluster, *,
                    plan: RoutePlan | None = None, cache: dict | None = None) -> Program:
    """One iteration (its passes ``counts_PLRE[M, L, R, E]``) for every rank → Program.

    ``plan``: the decision's :class:`RoutePlan` if the caller keeps one; ``cache``: see
    :func:`lower_iteration_ctx`."""
    return lower_iteration_ctx(policy, decision, previous, counts_PLRE, model, cluster,
                               plan=plan, cache=cache).program


def lower_iteration_ctx(policy: Any, decision: Decision, previous: Decision | None,
                        counts_PLRE: np.ndarray, model: ModelSpec, cluster: Cluster, *,
                        plan: RoutePlan | None = None, cache: dict | None = None,
                        layout_plan: Any = None) -> LoweringContext:
    """:func:`lower_iteration`, returning the whole context (routed tokens included).

    ``cache``: a dict the caller keeps for as long as ``decision`` stays in force (placement
    facts such as replica groups, the memory footprint and shared read-only arrays are
    computed once into it). ``layout_plan``: a :class:`~moesim.stages.LayoutPlan` (None: the
    default layout, one stage over every rank); with pipeline stages ``cluster`` is the view
    one stage's policy decision was made on and ``layout_plan.world`` the real world."""
    from moesim import layered

    ctx = _routed_context(policy, decision, previous, np.asarray(counts_PLRE), model, cluster,
                          plan)
    if cache is not None:
        ctx._consts = cache
    if layout_plan is None:
        layered.emit_program(ctx, None)
        attach_memory(ctx)
    else:
        layered.emit_program(ctx, layout_plan)
        layered.attach_layout_memory(ctx, layout_plan)
    _fill_routes(ctx)
    return ctx


def _routed_context(policy: Any, decision: Decision, previous: Decision | None,
                    counts_MLRE: np.ndarray, model: ModelSpec, cluster: Cluster,
                    plan: RoutePlan | BlockRoutePlan | None) -> LoweringContext:
    """Route every pass and layer, and wrap the result in a fresh context."""
    if plan is None:
        plan = route_plan(decision, cluster)
    kept, dropped, tokens = route_iteration(decision, counts_MLRE, cluster, plan)
    M, L, R, _ = kept.shape
    dropped_MLR = (np.zeros((M, L, R), dtype=np.int64) if decision.slot_capacity is None
                   else dropped.sum(axis=3))
    block = getattr(plan, "block", 0)
    return LoweringContext(policy=policy, decision=decision, previous=previous, model=model,
                           cluster=cluster, counts_MLRE=counts_MLRE, kept_MLRP=kept,
                           dropped_MLRP=dropped, tokens_MLRG=tokens,
                           program=Program(num_ranks=cluster.world_size),
                           rows_MLP=block_column_sums(kept, block), dropped_MLR=dropped_MLR,
                           layer_bwd_done=[-1] * model.num_layers, block=block)


def attach_memory(ctx: LoweringContext) -> None:
    """``Program.memory_bytes`` (policy footprint + activations + buffers), host memory."""
    if "footprint" not in ctx._consts:  # a function of the decision alone: once per decision
        ctx._consts["footprint"] = ctx.policy.memory_footprint(ctx.decision, ctx.model,
                                                               ctx.cluster)
    gpu, host = ctx._consts["footprint"]
    ctx.program.memory_bytes = {**gpu, **memory_model.dynamic_memory(
        ctx.rows_MLP, ctx.dropped_MLR, ctx.model, ctx.placement)}
    ctx.program.host_memory_bytes = dict(host)


def _fill_routes(ctx: LoweringContext) -> None:
    """``Program.routes[(mb, layer)]`` for the executor, by global MoE layer. Under pipeline
    stages a route's rows are the token sources of the stage holding the layer, in stage-rank
    order (its dispatch ``AllToAll``'s ``ranks`` are their world ranks). Routed in blocks,
    ``kept_RP`` is a :class:`~moesim.blockmatrix.BlockDiag` (dense on demand)."""
    S = ctx.placement.slots_per_rank
    M, L = ctx.kept_MLRP.shape[:2]
    for mb in range(M):
        for l in range(L):
            kept = ctx.kept_MLRP[mb, l]
            if ctx.block and ctx.block < kept.shape[0]:
                kept = BlockDiag(kept, 1, ctx.block)
            ctx.program.routes[(mb, l)] = LayerRoute(
                kept_RP=kept, dropped_R=ctx.dropped_MLR[mb, l],
                phy2log_P=ctx.placement.layer(l), slots_per_rank=S)
