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
``emit_*`` helpers of :class:`LoweringContext` are static EP's per-iteration ops
(:mod:`moesim.lowering_ops`); policies call them from their hooks or write their own. Under
expert tensor parallelism the sources are routed in *expert order* (:mod:`moesim.expert_tp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim import memory as memory_model
from moesim.blockmatrix import BlockDiag
from moesim.expert_tp import expert_order
from moesim.lowering_ops import StaticEPOps
from moesim.ops import (
    LayerRoute,
    Program,
)
from moesim.placement import Decision, Placement
from moesim.routing import RoutePlan, rank_matrix
from moesim.routing_blocks import BlockRoutePlan, block_column_sums, plan_routes
from moesim.specs import Cluster, ModelSpec
from moesim.stage_context import StageView


@dataclass
class LoweringContext(StaticEPOps, StageView):
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



# --------------------------------------------------------------------------------------------
# the iteration


def route_iteration(decision: Decision, counts_MLRE: np.ndarray, cluster: Cluster,
                    plan: RoutePlan | BlockRoutePlan | None = None, rank_tokens: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Route all passes and layers: ``(kept_MLRP, dropped_MLRP, tokens_MLRG)``; with a
    :class:`~moesim.routing_blocks.BlockRoutePlan` in block coordinates (``P``: the block's
    slots, ``G``: its ranks). ``rank_tokens`` False: no ``tokens_MLRG`` (None), for a caller
    that takes what it needs of it from the kept tokens directly."""
    if plan is None:
        plan = route_plan(decision, cluster)
    kept, dropped = plan.route(counts_MLRE, decision.slot_capacity)
    tokens = rank_matrix(kept, decision.placement.slots_per_rank) if rank_tokens else None
    return kept, dropped, tokens


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
    one stage's policy decision was made on and ``layout_plan.world`` the real world. With
    ``etp > 1`` the context's routed arrays (``counts_MLRE`` too) are in expert order."""
    from moesim import layered

    counts = np.asarray(counts_PLRE)
    if layout_plan is not None and layout_plan.layout.etp > 1:  # sources in expert order
        ep = int(decision.info.get("ep_size") or cluster.world_size // layout_plan.layout.etp)
        counts = counts[:, :, expert_order(cluster.world_size, ep, layout_plan.layout.etp)]
    ctx = routed_context(policy, decision, previous, counts, model, cluster, plan)
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


def routed_context(policy: Any, decision: Decision, previous: Decision | None,
                   counts_MLRE: np.ndarray, model: ModelSpec, cluster: Cluster,
                   plan: RoutePlan | BlockRoutePlan | None, column_sums: Any = None,
                   rank_tokens: bool = True) -> LoweringContext:
    """Route every pass and layer, and wrap the result in a fresh context. ``column_sums``
    (default :func:`~moesim.routing_blocks.block_column_sums`): ``(kept, block) → rows``,
    for a caller that takes the slot rows from a pass it makes anyway; ``rank_tokens``: see
    :func:`route_iteration`."""
    if plan is None:
        plan = route_plan(decision, cluster)
    kept, dropped, tokens = route_iteration(decision, counts_MLRE, cluster, plan, rank_tokens)
    M, L, R, _ = kept.shape
    dropped_MLR = (np.zeros((M, L, R), dtype=np.int64) if decision.slot_capacity is None
                   else dropped.sum(axis=3))
    block = getattr(plan, "block", 0)
    return LoweringContext(policy=policy, decision=decision, previous=previous, model=model,
                           cluster=cluster, counts_MLRE=counts_MLRE, kept_MLRP=kept,
                           dropped_MLRP=dropped, tokens_MLRG=tokens,
                           program=Program(num_ranks=cluster.world_size),
                           rows_MLP=(column_sums or block_column_sums)(kept, block),
                           dropped_MLR=dropped_MLR,
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
    order (its dispatch ``AllToAll``'s ``ranks`` are their world ranks); under expert TP in
    expert order, with ``ranks_R`` naming each position's stage rank. Routed in blocks,
    ``kept_RP`` is a :class:`~moesim.blockmatrix.BlockDiag` (dense on demand)."""
    S = ctx.placement.slots_per_rank
    M, L = ctx.kept_MLRP.shape[:2]
    contexts = getattr(ctx, "stage_contexts", None) or [ctx]
    ranks_R = contexts[0].expert_ranks
    for mb in range(M):
        for l in range(L):
            kept = ctx.kept_MLRP[mb, l]
            if ctx.block and ctx.block < kept.shape[0]:
                kept = BlockDiag(kept, 1, ctx.block)
            ctx.program.routes[(mb, l)] = LayerRoute(
                kept_RP=kept, dropped_R=ctx.dropped_MLR[mb, l],
                phy2log_P=ctx.placement.layer(l), slots_per_rank=S, ranks_R=ranks_R)
