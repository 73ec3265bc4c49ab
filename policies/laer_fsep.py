"""LAER-MoE: Fully Sharded Expert Parallel (FSEP) with a load-adaptive re-layout planner.

Liu et al., "LAER-MoE: Load-Adaptive Expert Re-layout for Efficient Mixture-of-Experts Training"
(arXiv 2602.11686, ASPLOS'26). Every expert's parameters, gradients and optimizer state are
sharded ``1/G`` over all ``G`` GPUs; each GPU has ``C`` expert slots and, per layer, gathers the
shards of the ``C`` experts the plan gives it. Re-layout is free: the gather that happens anyway
fetches the new experts.

Planner (per layer), as in the paper:

1. **Load**: token counts ``n[i, e]`` summed over the last ``window`` iterations that the planner
   may see. The planner runs asynchronously and its result is **applied one iteration later**:
   the decision for iteration ``t`` uses counts of iterations ``≤ t − 1 − lag`` (``lag = 1``:
   ``≤ t − 2``). We implement this statelessly: ``decide`` drops the newest ``lag`` iterations
   of ``History.past_TLRE`` before planning, which is exactly the plan an asynchronous planner
   launched at the start of iteration ``t − 1`` (seeing counts up to ``t − 2``) would deliver.
   While fewer than ``lag + 1`` iterations exist, the even split is used.
2. **Candidate replica vectors** ``r[E]`` with ``Σ r = G·C`` (``r_e ≤ G``):
   ``even`` (``C·G/E`` each, only when divisible); ``precise`` (max-heap on ``load_e / r_e``:
   every expert starts at ``N`` replicas if ``N·E ≤ G·C`` — one per node — and then grows in
   steps of ``N``; otherwise starts at 1 and grows by 1); and ``num_random_candidates``
   perturbations of ``precise`` (random moves of one step from a donor to a receiver, from the
   explicit ``rng``).
3. **Greedy placement** of each candidate: replicas in decreasing per-replica load
   (``load_e / r_e``); each goes to a free slot on the node holding the fewest copies of that
   expert; among those nodes, to the least-loaded GPU (GPUs already holding the expert last).
4. **Modelled cost**, keep the cheapest candidate::

       cost = 4 · Σ_i comm_i + (3 + [recompute]) · max_j comp_j

   with tokens per pass (window counts / passes in the window) routed by ``node_first``
   (a source's tokens for ``e`` split evenly over ``e``'s replicas on its own node if any, else
   over all replicas; split fractionally in the model):

   - ``comm_i = (s^intra_i + r^intra_i) · b_tok / bw_intra + (s^inter_i + r^inter_i) · b_tok /
     bw_inter`` — tokens GPU ``i`` sends to (``s``) and receives from (``r``) *other* GPUs,
     split by whether the peer is on the same node; ``b_tok = H · bytes_activation``;
     ``bw_*`` = ``cluster.intra/inter.bw_GBps``. The factor 4 is the four all-to-alls
     (dispatch/combine, forward/backward).
   - ``comp_j = tokens_j · expert_flops_per_token / peak_flops`` (forward; backward ≈ 2×, a
     recomputed forward +1, hence 3 or 4).

   Like the paper, communication is *summed* over GPUs while compute takes the straggler.

Departures: the paper's planner is C++ and runs off the critical path; ours is Python with
per-node heaps for the greedy (placing an expert's replicas a round of nodes at a time — the
same result as one replica at a time, see :func:`greedy_place`) and numpy for the cost of all
candidates at once. Counts are averaged per pass rather than summed (the cost is linear in the
counts and the precise split scale-free, so the choice is the same; the costs read as seconds
per pass). Random perturbations are "optional" in the paper; we keep ``num_random_candidates``
(default 2). Ties and the paper's unstated details: GPUs already holding an expert are used
last; an expert never gets more than ``G`` replicas. Routing ``node_first``; dropless unless
``capacity_factor`` is set.

Lowering (FSEP): per layer and micro-batch, an all-to-all of ``1/G`` shards materialises each
GPU's slotted experts on the prefetch stream, in the forward and again in the backward
(``≈ C·P·b_w·(G−1)/G`` received per GPU); after the layer's last backward an all-to-all
*reduce* returns slot gradients to the shard owners (``≈ C·P·b_g·(G−1)/G`` sent); the optimizer
is sharded ``1/G``; re-layout costs nothing extra.

``Decision.info``: ``planned_through_iteration`` (last iteration whose counts were used, -1 for
none), ``candidate_names_L``, ``candidate_costs_L``, ``candidate_replicas_L`` (``[K][E]``),
``chosen_L``, ``replicas_LE``; with ``keep_candidates``, ``candidate_copies_L`` (copies
``[K, G, E]`` per layer).

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks (= ``G``), ``E`` experts, ``G``
GPUs, ``N`` nodes, ``P = G·C`` slots, ``K`` candidates.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import AllToAll
from moesim.placement import Decision, Placement
from moesim.policies.base import History, Policy, register_policy
from moesim.policies.primitives import dense_params_R, emit_gpu_optimizer, slot_capacity
from moesim.specs import Cluster, ModelSpec

# --------------------------------------------------------------------------------------------
# replica vectors


def even_replicas(num_experts: int, num_slots: int, max_per_expert: int) -> np.ndarray | None:
    """``[E]`` with ``num_slots / E`` each, or ``None`` when it does not divide (or exceeds the
    per-expert cap)."""
    if num_slots % num_experts or num_slots // num_experts > max_per_expert:
        return None
    return np.full(num_experts, num_slots // num_experts, dtype=np.int64)


def precise_replicas(load_E: np.ndarray, num_slots: int, num_nodes: int,
                     max_per_expert: int) -> np.ndarray:
    """LAER's precise split: ``[E]`` int64, ``Σ ≤ num_slots``.

    Start every expert at ``N`` replicas when ``N·E ≤ num_slots`` (then grow in steps of ``N``),
    else at 1 (grow by 1); repeatedly grow the expert with the highest ``load / replicas``
    (lowest id on ties) while the step fits and the expert stays ``≤ max_per_expert``.
    """
    load = [float(x) for x in load_E]
    E = len(load)
    step = num_nodes if num_nodes * E <= num_slots else 1
    r = [step] * E
    budget = num_slots - step * E
    heap = [(-load[e] / step, e) for e in range(E) if 2 * step <= max_per_expert]
    heapq.heapify(heap)
    while budget >= step and heap:
        _, e = heapq.heappop(heap)
        r[e] += step
        budget -= step
        if r[e] + step <= max_per_expert:
            heapq.heappush(heap, (-load[e] / r[e], e))
    return np.array(r, dtype=np.int64)


def perturbed_replicas(r_E: np.ndarray, step: int, max_per_expert: int,
                       rng: np.random.Generator, moves: int) -> np.ndarray:
    """``r_E`` after ``moves`` random attempts to move ``step`` replicas from a donor (kept
    ``≥ step``) to a receiver (kept ``≤ max_per_expert``): ``[E]``, same sum."""
    r = r_E.copy()
    pairs = rng.integers(0, r.shape[0], size=(moves, 2))
    for d, t in pairs:
        if d != t and r[d] >= 2 * step and r[t] + step <= max_per_expert:
            r[d] -= step
            r[t] += step
    return r


# --------------------------------------------------------------------------------------------
# greedy placement


def greedy_place(replicas_E: np.ndarray, load_E: np.ndarray, gpus_per_node: int,
                 free_G: np.ndarray, copies_GE: np.ndarray | None = None,
                 gpu_load_G: np.ndarray | None = None,
                 allow_duplicates: bool = True, skip_unplaceable: bool = False) -> np.ndarray:
    """Place ``replicas_E[e]`` new copies of each expert; returns copies ``[G, E]`` (the initial
    ``copies_GE`` plus the new ones).

    Replicas go in decreasing per-replica load ``load_e / (all copies of e)`` (lowest id first
    on ties). Each goes to a GPU with a free slot (``free_G`` counts them) on a node holding the
    fewest copies of that expert; among those nodes, to the least-loaded GPU (``gpu_load_G``,
    tokens, grows by the per-replica load; lowest GPU id on ties). A GPU already holding the
    expert comes last, or never with ``allow_duplicates=False``. A replica that fits nowhere
    raises, or is left out with ``skip_unplaceable=True``.

    All replicas of one expert carry the same load, so placing them one at a time visits the
    nodes of the lowest copy level in increasing order of their best GPU's key, each node once:
    we do such a *round* with one sort. Per node, a heap of ``(load, gpu)`` over GPUs with free
    slots gives the best GPU. Plain Python: at these sizes it beats numpy's per-call overhead.
    """
    G, E = free_G.shape[0], len(load_E)
    N = G // gpus_per_node
    init = np.zeros((G, E), dtype=np.int64) if copies_GE is None else np.asarray(copies_GE)
    free = [int(x) for x in free_G]
    heaps = _node_heaps(free, gpu_load_G, gpus_per_node)
    total = init.sum(0) + np.asarray(replicas_E)
    per_copy = (np.asarray(load_E, dtype=np.float64) / np.maximum(total, 1)).tolist()
    held_E: list[set[int]] = [set() for _ in range(E)]
    for gpu, e in zip(*np.nonzero(init), strict=True):
        held_E[e].add(int(gpu))
    level_EN = init.reshape(N, gpus_per_node, E).sum(1).T.tolist()
    reps = [int(x) for x in replicas_E]
    placed_gpu, placed_exp = [], []
    for e in sorted(range(E), key=lambda x: -per_copy[x]):
        if reps[e] == 0:
            continue
        gpus = _place_expert(heaps, free, reps[e], per_copy[e], held_E[e], level_EN[e],
                             allow_duplicates)
        if len(gpus) < reps[e] and not skip_unplaceable:
            raise MoesimError(f"no free slot left for a replica of expert {e}; raise the "
                              "slots per rank")
        placed_gpu += gpus
        placed_exp += [e] * len(gpus)
    copies = init.astype(np.int64).copy()
    np.add.at(copies, (np.array(placed_gpu, dtype=np.int64),
                       np.array(placed_exp, dtype=np.int64)), 1)
    return copies


def _node_heaps(free: list[int], gpu_load_G: np.ndarray | None,
                gpus_per_node: int) -> list[list[tuple[float, int]]]:
    """Per node, a heap of ``(load, gpu)`` over its GPUs with free slots."""
    G = len(free)
    gl = [0.0] * G if gpu_load_G is None else [float(x) for x in gpu_load_G]
    heaps = [[(gl[i], i) for i in range(n, n + gpus_per_node) if free[i] > 0]
             for n in range(0, G, gpus_per_node)]
    for h in heaps:
        heapq.heapify(h)
    return heaps


def _place_expert(heaps: list, free: list[int], count: int, per_copy: float, held: set[int],
                  level_N: list[int], allow_duplicates: bool) -> list[int]:
    """Place up to ``count`` copies of one expert in rounds (see :func:`greedy_place`);
    updates ``heaps``, ``free``, ``held`` and ``level_N`` in place; returns the GPUs used."""
    placed: list[int] = []
    while len(placed) < count:
        offers = _node_offers(heaps, held, level_N, allow_duplicates)
        if not offers:
            break
        offers.sort()
        low = offers[0][0]
        for lev, _, key, n, gpu in offers[:count - len(placed)]:
            if lev != low:
                break
            h = heaps[n]
            if h[0][1] == gpu and free[gpu] > 1:      # the common case, inlined
                free[gpu] -= 1
                heapq.heapreplace(h, (key + per_copy, gpu))
            else:
                _take(h, gpu, key + per_copy, free)
            held.add(gpu)
            level_N[n] += 1
            placed.append(gpu)
    return placed


def _node_offers(heaps: list, held: set[int], level_N: list[int],
                 allow_duplicates: bool) -> list[tuple[int, bool, float, int, int]]:
    """Each node's best GPU for the expert: ``(copy level, holds it, load, node, gpu)``."""
    if not held:                          # first round of an expert: every top is fine
        return [(level_N[n], False, h[0][0], n, h[0][1]) for n, h in enumerate(heaps) if h]
    out = []
    for n, h in enumerate(heaps):
        if not h:
            continue
        top = h[0]
        if top[1] not in held:
            out.append((level_N[n], False, top[0], n, top[1]))
            continue
        b = _best_gpu(h, held, allow_duplicates)
        if b is not None:
            out.append((level_N[n], b[1] in held, b[0], n, b[1]))
    return out


def _best_gpu(heap: list, held: set, allow_duplicates: bool) -> tuple[float, int] | None:
    """The least-loaded GPU of one node's heap not holding the expert; a holder only when all
    free GPUs hold it and duplicates are allowed; ``None`` when the node has nothing to offer."""
    for item in sorted(heap):
        if item[1] not in held:
            return item
    return heap[0] if allow_duplicates else None


def _take(heap: list, gpu: int, new_load: float, free: list) -> None:
    """Use one free slot of ``gpu`` (in ``heap``) and raise its load to ``new_load``."""
    free[gpu] -= 1
    if heap[0][1] == gpu:
        if free[gpu] > 0:
            heapq.heapreplace(heap, (new_load, gpu))
        else:
            heapq.heappop(heap)
        return
    heap[:] = [item for item in heap if item[1] != gpu]
    if free[gpu] > 0:
        heap.append((new_load, gpu))
    heapq.heapify(heap)


def copies_to_phy2log(copies_GE: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Slot row ``[G·S]`` from copies ``[G, E]``: each rank's experts in id order, ``-1`` pad."""
    G, E = copies_GE.shape
    per_rank = copies_GE.sum(1)
    assert (per_rank <= slots_per_rank).all(), "more copies than slots on a rank"
    experts = np.repeat(np.tile(np.arange(E), G), copies_GE.ravel())
    rank = np.repeat(np.arange(G), per_rank)
    starts = np.concatenate(([0], np.cumsum(per_rank)[:-1]))
    out = np.full((G, slots_per_rank), -1, dtype=np.int64)
    out[rank, np.arange(len(experts)) - starts[rank]] = experts
    return out.ravel()


def copies_of(phy2log_P: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """Copies ``[G, E]`` of a slot row ``[G·S]`` (``-1`` slots ignored)."""
    row = np.asarray(phy2log_P)
    rank = np.arange(row.shape[0]) // (row.shape[0] // num_ranks)
    out = np.zeros((num_ranks, num_experts), dtype=np.int64)
    keep = row >= 0
    np.add.at(out, (rank[keep], row[keep]), 1)
    return out


# --------------------------------------------------------------------------------------------
# cost model


def node_first_traffic(copies_KGE: np.ndarray, counts_RE: np.ndarray,
                       gpus_per_node: int) -> dict[str, np.ndarray]:
    """Per-GPU token traffic under fractional ``node_first`` routing, each ``[K, G]`` float, for
    ``K`` candidate placements (copies ``[K, G, E]``) of one layer's counts ``[R, E]``.

    Keys: ``send_intra``, ``send_inter``, ``recv_intra``, ``recv_inter`` (tokens to / from
    *other* GPUs, by whether the peer shares the node) and ``compute`` (tokens each GPU's expert
    slots process, its own included). A source whose node holds copies of ``e`` splits its
    tokens over them in proportion to copies; otherwise over all copies of ``e``.
    """
    K, G, E = copies_KGE.shape
    N = G // gpus_per_node
    node_of = np.arange(G) // gpus_per_node
    c = copies_KGE.astype(np.float64)
    n = np.asarray(counts_RE, dtype=np.float64)
    node_c_KNE = c.reshape(K, N, gpus_per_node, E).sum(2)
    node_n_NE = n.reshape(N, gpus_per_node, E).sum(1)
    node_c_KGE = node_c_KNE[:, node_of]
    local_KGE = node_c_KGE > 0                                   # source's node holds e
    share_local = np.divide(c, node_c_KGE, out=np.zeros_like(c), where=local_KGE)
    share_global = c / np.maximum(c.sum(1, keepdims=True), 1.0)
    remote_KE = (node_n_NE[None] * (node_c_KNE == 0)).sum(1)    # tokens from copy-less nodes
    node_n_GE = node_n_NE[node_of]
    recv_inter = (share_global * remote_KE[:, None, :]).sum(2)
    return {"send_intra": (n * local_KGE * (1.0 - share_local)).sum(2),
            "send_inter": (n * ~local_KGE).sum(2),
            "recv_intra": (share_local * (node_n_GE - n)).sum(2),
            "recv_inter": recv_inter,
            "compute": (share_local * node_n_GE).sum(2) + recv_inter}


def fsep_cost(copies_KGE: np.ndarray, counts_RE: np.ndarray, model: ModelSpec,
              cluster: Cluster, recompute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LAER's modelled layer cost ``4·Σ_i comm_i + (3 [+1])·max_j comp_j`` in seconds, for
    ``K`` candidate placements (copies ``[K, G, E]``) and one pass of counts ``[R, E]``;
    returns ``(cost_K, comm_KG, comp_KG)`` (see the module docstring for the terms)."""
    t = node_first_traffic(copies_KGE, counts_RE, cluster.gpus_per_node)
    b = model.token_bytes
    comm = ((t["send_intra"] + t["recv_intra"]) * b / (cluster.intra.bw_GBps * 1e9)
            + (t["send_inter"] + t["recv_inter"]) * b / (cluster.inter.bw_GBps * 1e9))
    comp = t["compute"] * model.expert_flops_per_token / cluster.hardware.peak_flops
    cost = 4.0 * comm.sum(1) + (4.0 if recompute else 3.0) * comp.max(1)
    return cost, comm, comp


# --------------------------------------------------------------------------------------------
# the policy


@register_policy("laer_fsep")
class LaerFsep(Policy):
    """LAER-MoE's FSEP planner: candidate replica vectors, greedy placement, modelled cost."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank`` (C): experts each GPU materialises per layer (paper: 2).
        ``window``: iterations of counts summed by the planner (paper: 5). ``lag_iterations``:
        how many of the newest iterations the asynchronous planner has not seen yet (paper: 1,
        "applied one iteration later"; 0 = synchronous ablation). ``num_random_candidates``:
        random perturbations of the precise split. ``perturb_moves``: moves per perturbation.
        ``recompute``: activation recomputation (cost weight 4 instead of 3 on compute).
        ``capacity_factor``: per-(source, slot) capacity factor, ``None`` = dropless (paper).
        ``keep_candidates``: also keep every candidate's placement (copies ``[K, G, E]``) in
        ``info`` — for tests and inspection; large at scale."""

        slots_per_rank: int = 2
        window: int = 5
        lag_iterations: int = 1
        num_random_candidates: int = 2
        perturb_moves: int = 2
        recompute: bool = False
        capacity_factor: float | None = None
        keep_candidates: bool = False

        def __post_init__(self) -> None:
            for name, lo in (("slots_per_rank", 1), ("window", 1), ("lag_iterations", 0),
                             ("num_random_candidates", 0), ("perturb_moves", 1)):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise MoesimError(f"laer_fsep: {name} must be an integer >= {lo}, got "
                                      f"{v!r}; set {name}={lo} or more")
            for name in ("recompute", "keep_candidates"):
                if not isinstance(getattr(self, name), bool):
                    raise MoesimError(f"laer_fsep: {name} must be true or false")
            cf = self.capacity_factor
            if cf is not None and not (isinstance(cf, (int, float)) and cf > 0):
                raise MoesimError(f"laer_fsep: capacity_factor must be > 0 or None (dropless), "
                                  f"got {cf!r}")

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Plan every layer from the counts the asynchronous planner has seen: ``[L, G·C]``."""
        t0 = time.perf_counter()
        cfg = self.config
        G, E, L = cluster.world_size, model.num_experts, model.num_layers
        if G * cfg.slots_per_rank < E:
            raise MoesimError(f"laer_fsep: {G} GPUs × slots_per_rank={cfg.slots_per_rank} "
                              f"cannot hold {E} experts; raise slots_per_rank to "
                              f"{-(-E // G)} or more")
        counts_LRE, seen = _visible_counts(history, cfg.window, cfg.lag_iterations, L, G, E)
        rows, info = [], _empty_info(seen)
        for l in range(L):
            row, layer_info = plan_layer(counts_LRE[l], model, cluster, cfg, rng)
            rows.append(row)
            for key, value in layer_info.items():
                info.setdefault(key + "_L", []).append(value)
        info["replicas_LE"] = [np.bincount(r[r >= 0], minlength=E).tolist() for r in rows]
        placement = Placement(np.stack(rows), G, cfg.slots_per_rank, E)
        cap = slot_capacity(cfg.capacity_factor, model.tokens_per_rank, model.top_k,
                            G * cfg.slots_per_rank)
        return Decision(placement, routing="node_first", slot_capacity=cap,
                        planner_time_s=time.perf_counter() - t0, info=info)

    # -- lowering hooks ---------------------------------------------------------------------
    def lower_relayout(self, ctx) -> list[int]:
        """Nothing: FSEP's per-layer gather fetches whatever experts the new plan names."""
        return []

    def lower_param_gather(self, ctx, micro_batch: int, layer: int, direction: str) -> list[int]:
        """Materialise ``layer``'s slotted experts from their ``1/G`` shards: an all-to-all on
        the prefetch stream (every GPU sends its shard of each expert GPU ``j`` holds, so ``j``
        receives ``C_j·P·b_w·(G−1)/G``), in the forward and again in the backward of every
        micro-batch (FSDP-style: freed after use); it waits for the op that frees the buffer."""
        if ctx.world < 2:
            return []
        deps = (ctx.gather_anchor,) if ctx.gather_anchor >= 0 else ()
        return [ctx.add(AllToAll(
            phase="param_gather", direction=direction, stream="prefetch", layer=layer,
            micro_batch=micro_batch, deps=deps,
            bytes_RR=shard_bytes_RR(ctx.placement, layer, ctx.model.expert_weight_bytes),
            label="fsep_gather"))]

    def lower_layer_grads(self, ctx, layer: int) -> list[int]:
        """All-to-all *reduce* of the slots' gradients back to the ``1/G`` shard owners after
        the layer's last backward (replaces FSDP's reduce-scatter): each GPU sends
        ``C_i·P·b_g·(G−1)/G``; receivers sum."""
        if ctx.world < 2:
            return []
        grad_bytes = ctx.model.params_per_expert * ctx.model.bytes_grad
        return [ctx.add(AllToAll(
            phase="grad_sync", direction="bwd", layer=layer, deps=(ctx.layer_bwd_done[layer],),
            bytes_RR=shard_bytes_RR(ctx.placement, layer, grad_bytes).T, reduce=True,
            label="fsep_grad_reduce"))]

    def lower_grad_sync(self, ctx) -> list[int]:
        """Expert grads already reduced onto their shards; only the dense all-reduce."""
        return ctx.emit_dense_grad_allreduce() + list(ctx.layer_grad_ops)

    def lower_optimizer(self, ctx) -> list[int]:
        """Sharded optimizer: each GPU updates ``1/G`` of every expert (plus its ZeRO-1 dense
        shard); no expert all-gather — the next iteration's gathers fetch the new weights."""
        m = ctx.model
        shard_R = np.full(ctx.world, m.num_layers * m.num_experts * m.params_per_expert
                          / ctx.world)
        return emit_gpu_optimizer(ctx, shard_R, ctx.optimizer_deps(), label="adam_fsep")

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """GPU bytes per rank: ``1/G`` shards of every expert's weights, grads and optimizer
        state; gather buffers for two layers' slots (the prefetch runs a layer ahead); slot
        gradients of every layer when several micro-batches accumulate (reduced after the
        last one), else of two layers; the dense part as static EP (ZeRO-1 optimizer)."""
        G, pl = cluster.world_size, decision.placement
        P = float(model.params_per_expert)
        shard = model.num_layers * model.num_experts * P / G
        filled_LR = (pl.phy2log_LP >= 0).reshape(pl.num_layers, G, -1).sum(2)
        two_layers_R = np.sort(filled_LR, axis=0)[-2:].sum(0) * P
        slot_grads_R = filled_LR.sum(0) * P if model.micro_batches > 1 else two_layers_R
        dense = model.num_layers * model.dense_params
        gpu = {"weights": np.full(G, (shard + dense) * model.bytes_weight),
               "grads": (shard + dense + slot_grads_R) * model.bytes_grad,
               "optimizer": np.full(G, shard * model.bytes_optim)
               + dense_params_R(model, G) * model.bytes_optim,
               "buffers": two_layers_R * model.bytes_weight}
        return gpu, {}


def shard_bytes_RR(placement: Placement, layer: int, bytes_per_expert: float) -> np.ndarray:
    """FSEP gather matrix ``[R, R]``: ``bytes[i, j]`` = rank ``i``'s ``1/G`` shard of every
    expert in rank ``j``'s filled slots (0 on the diagonal)."""
    G = placement.num_ranks
    filled_R = (placement.layer(layer) >= 0).reshape(G, -1).sum(1)
    out = np.broadcast_to(filled_R[None, :] * (bytes_per_expert / G), (G, G)).copy()
    np.fill_diagonal(out, 0.0)
    return out


def _empty_info(seen: int) -> dict:
    return {"planned_through_iteration": seen, "candidate_names_L": [],
            "candidate_costs_L": [], "candidate_replicas_L": [], "chosen_L": []}


def _visible_counts(history: History, window: int, lag: int, L: int, G: int,
                    E: int) -> tuple[np.ndarray, int]:
    """Per-pass counts ``[L, R, E]`` averaged over the ``window`` newest iterations the planner
    has seen (all but the newest ``lag``), and the last seen iteration (-1: none, zeros)."""
    past = history.past_TLRE
    ppi = history.passes_per_iteration
    if past.shape[0] and (past.shape[2] != G or past.shape[3] != E or past.shape[1] != L):
        raise MoesimError(f"laer_fsep: history counts have shape {past.shape[1:]} (L, R, E) but "
                          f"the model/cluster give ({L}, {G}, {E}); use a matching trace")
    end = past.shape[0] - lag * ppi
    if end <= 0:
        return np.zeros((L, G, E)), -1
    start = max(0, end - window * ppi)
    seen = history.iteration - 1 - lag
    return past[start:end].sum(axis=0) / (end - start), seen


def candidate_vectors(load_E: np.ndarray, num_slots: int, num_nodes: int, max_per_expert: int,
                      num_random: int, moves: int,
                      rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """LAER's candidates ``[(name, r_E)]``: even (when divisible), precise, perturbed;
    duplicates dropped (first name kept)."""
    out = []
    even = even_replicas(load_E.shape[0], num_slots, max_per_expert)
    if even is not None:
        out.append(("even", even))
    precise = precise_replicas(load_E, num_slots, num_nodes, max_per_expert)
    out.append(("precise", precise))
    step = num_nodes if num_nodes * load_E.shape[0] <= num_slots else 1
    for k in range(num_random):
        out.append((f"random{k}", perturbed_replicas(precise, step, max_per_expert, rng, moves)))
    seen: set[bytes] = set()
    unique = []
    for name, r in out:                       # identical vectors would place identically
        if r.tobytes() not in seen:
            seen.add(r.tobytes())
            unique.append((name, r))
    return unique


def plan_layer(counts_RE: np.ndarray, model: ModelSpec, cluster: Cluster, cfg,
               rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One layer: candidates → greedy placements → costs; returns the cheapest slot row
    ``[G·C]`` and the per-candidate facts (names, costs ``[K]``, copies ``[K, G, E]``)."""
    G, E = counts_RE.shape
    C = cfg.slots_per_rank
    load_E = counts_RE.sum(0)
    if load_E.sum() == 0:
        load_E = np.ones(E)
    cands = candidate_vectors(load_E, G * C, cluster.num_nodes, G, cfg.num_random_candidates,
                              cfg.perturb_moves, rng)
    free_G = np.full(G, C)
    copies = np.stack([greedy_place(r_E, load_E, cluster.gpus_per_node, free_G)
                       for _, r_E in cands])
    cost_K, _, _ = fsep_cost(copies, counts_RE, model, cluster, cfg.recompute)
    best = int(np.argmin(cost_K))
    facts = {"candidate_names": [name for name, _ in cands], "candidate_costs": cost_K.tolist(),
             "candidate_replicas": [r.tolist() for _, r in cands], "chosen": best}
    if cfg.keep_candidates:
        facts["candidate_copies"] = copies
    return copies_to_phy2log(copies[best], C), facts
