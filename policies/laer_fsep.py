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

Departures: the paper's planner is C++ and runs off the critical path; ours is built for speed
without changing the result (``tests/policies/test_laer_reference.py`` holds it to the
straightforward version it replaced). Where ``pip install`` had a C compiler, the precise split,
the greedy, the token sums and the slot row run in a small C kernel (``policies/_greedy_c.c``,
the same rounds and tie-breaks); otherwise in Python: the precise split selects the heap's pops
in one numpy partition; the greedy (:func:`moesim.policies.greedy.greedy_place`) places every
candidate from one start with per-node heaps and a sorted list of the nodes' best GPUs, a round
of nodes per expert at a time; the cost of all candidates is one numpy pass over the placed
copies, with the sums over GPUs taken in closed form (equal up to float rounding, ~1e-16
relative). Counts are averaged per pass rather than summed (the cost is linear in the counts and
the precise split scale-free, so the choice is the same; the costs read as seconds per pass).
Random perturbations are "optional" in the paper; we keep ``num_random_candidates`` (default 2).
Ties and the paper's unstated details: GPUs already holding an expert are used last; an expert
never gets more than ``G`` replicas. Routing ``node_first``; dropless unless ``capacity_factor``
is set.

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

import time
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import AllToAll
from moesim.placement import Decision, Placement
from moesim.policies import greedy
from moesim.policies.base import (
    History,
    Policy,
    check_bools,
    check_capacity_factor,
    check_ints,
    check_slots_cover,
    register_policy,
    sum_counts,
)
from moesim.policies.greedy import copies_J_to_phy2log, greedy_place_J, precise_replicas
from moesim.policies.primitives import (
    dense_params_R,
    emit_gpu_optimizer,
    relabel_gpus_for_layer,
    slot_capacity,
)
from moesim.specs import Cluster, ModelSpec

# --------------------------------------------------------------------------------------------
# replica vectors


def even_replicas(num_experts: int, num_slots: int, max_per_expert: int) -> np.ndarray | None:
    """``[E]`` with ``num_slots / E`` each, or ``None`` when it does not divide (or exceeds the
    per-expert cap)."""
    if num_slots % num_experts or num_slots // num_experts > max_per_expert:
        return None
    return np.array([num_slots // num_experts] * num_experts, dtype=np.int64)


def perturbed_replicas(r_E: np.ndarray, step: int, max_per_expert: int,
                       rng: np.random.Generator, moves: int) -> np.ndarray:
    """``r_E`` after ``moves`` random attempts to move ``step`` replicas from a donor (kept
    ``≥ step``) to a receiver (kept ``≤ max_per_expert``): ``[E]``, same sum."""
    r = r_E.tolist()
    for d, t in rng.integers(0, len(r), size=(moves, 2)).tolist():
        if d != t and r[d] >= 2 * step and r[t] + step <= max_per_expert:
            r[d] -= step
            r[t] += step
    return np.array(r, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# cost model


def node_first_tokens(copies_J: tuple[np.ndarray, np.ndarray, np.ndarray], num_candidates: int,
                      counts_RE: np.ndarray, gpus_per_node: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens under fractional ``node_first`` routing for ``K`` candidate placements of one
    layer's counts ``[R, E]``: ``(intra_K, inter_K, compute_KG)``. ``copies_J`` lists every
    copy as ``(candidate, gpu, expert)`` arrays ``[J]`` (as :func:`greedy_place_J` returns).

    ``intra_K`` / ``inter_K``: ``Σ_i (s_i + r_i)``, tokens GPUs send to plus receive from *other*
    GPUs on the same node / other nodes; ``compute_KG``: tokens each GPU's slots process, its
    own included. A source whose node holds copies of ``e`` splits its tokens over them in
    proportion to copies; otherwise over all copies of ``e``.

    Summed over GPUs every token sent is received once, so with ``kept`` (tokens whose source
    node holds the expert), ``own`` (tokens staying on their source GPU) and ``total``:
    ``intra = 2·(kept − own)``, ``inter = 2·(total − kept)``. Each copy of ``e`` on node ``n``
    receives ``n``'s tokens for ``e`` over its copies there, plus the copy-less nodes' tokens
    over all copies; so ``own`` and ``compute`` are sums over the ``J`` copies.
    """
    k, g, e = copies_J
    K, (G, E) = num_candidates, counts_RE.shape
    N = G // gpus_per_node
    n_GE = np.asarray(counts_RE, dtype=np.float64)
    if greedy._greedy_c is not None:                        # the same sums in C
        intra_K, inter_K, compute_KG = np.empty(K), np.empty(K), np.empty((K, G))
        greedy._greedy_c.node_first(K, gpus_per_node, *(np.ascontiguousarray(x, np.int64)
                                                        for x in copies_J),
                                    np.ascontiguousarray(n_GE), intra_K, inter_K, compute_KG)
        return intra_K, inter_K, compute_KG
    node_n_NE = n_GE.reshape(N, gpus_per_node, E).sum(1)
    at_KNE = (k * N + g // gpus_per_node) * E + e
    node_c_KNE = np.bincount(at_KNE, minlength=K * N * E).reshape(K, N, E)
    kept_KE = (node_n_NE * (node_c_KNE > 0)).sum(1)
    remote_KE = node_n_NE.sum(0) - kept_KE                  # tokens from copy-less nodes
    per_copy_KNE = np.maximum(node_c_KNE, 1)                # only held (k, node, e) are read
    tokens_KNE = node_n_NE / per_copy_KNE + (remote_KE / node_c_KNE.sum(1))[:, None, :]
    own_K = np.bincount(k, n_GE.ravel()[g * E + e] / per_copy_KNE.ravel()[at_KNE], K)
    compute_KG = np.bincount(k * G + g, tokens_KNE.ravel()[at_KNE], K * G).reshape(K, G)
    kept_K = kept_KE.sum(1)
    return 2.0 * (kept_K - own_K), 2.0 * (n_GE.sum() - kept_K), compute_KG


def fsep_cost(copies_J: tuple[np.ndarray, np.ndarray, np.ndarray], num_candidates: int,
              counts_RE: np.ndarray, model: ModelSpec, cluster: Cluster, recompute: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LAER's modelled layer cost ``4·Σ_i comm_i + (3 [+1])·max_j comp_j`` in seconds, for
    ``K`` candidate placements (``copies_J`` as in :func:`node_first_tokens`) and one pass of
    counts ``[R, E]``; returns ``(cost_K, Σ_i comm_i [K], comp_KG)`` (terms: module
    docstring)."""
    intra_K, inter_K, compute_KG = node_first_tokens(copies_J, num_candidates, counts_RE,
                                                     cluster.gpus_per_node)
    b = model.token_bytes
    comm_K = (intra_K * b / (cluster.intra.bw_GBps * 1e9)
              + inter_K * b / (cluster.inter.bw_GBps * 1e9))
    comp_KG = compute_KG * model.expert_flops_per_token / cluster.hardware.peak_flops
    cost_K = 4.0 * comm_K + (4.0 if recompute else 3.0) * comp_KG.max(1)
    return cost_K, comm_K, comp_KG


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
        ``recompute``: activation recomputation (cost weight 4 instead of 3 on compute); the
        simulator sets it from ``--parallel recompute=full``, which also recomputes.
        ``capacity_factor``: per-(source, slot) capacity factor, ``None`` = dropless (paper).
        ``keep_candidates``: also keep every candidate's placement (copies ``[K, G, E]``) in
        ``info`` — for tests and inspection; large at scale. ``planner``: false turns the
        planner off (LAER's "FSDP" baseline: FSEP's sharding with the plan it makes before any
        counts are seen, every iteration)."""

        slots_per_rank: int = 2
        window: int = 5
        lag_iterations: int = 1
        num_random_candidates: int = 2
        perturb_moves: int = 2
        recompute: bool = False
        capacity_factor: float | None = None
        keep_candidates: bool = False
        planner: bool = True

        def __post_init__(self) -> None:
            check_ints("laer_fsep", self, {"slots_per_rank": 1, "window": 1,
                                           "lag_iterations": 0, "num_random_candidates": 0,
                                           "perturb_moves": 1})
            check_bools("laer_fsep", self, "recompute", "keep_candidates", "planner")
            check_capacity_factor("laer_fsep", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Plan every layer from the counts the asynchronous planner has seen: ``[L, G·C]``."""
        t0 = time.perf_counter()
        cfg = self.config
        G, E, L = cluster.world_size, model.num_experts, model.num_layers
        check_slots_cover("laer_fsep", cfg.slots_per_rank, G, E)
        counts_LRE, seen = _visible_counts(history, cfg.window, cfg.lag_iterations, L, G, E)
        if not cfg.planner:  # FSDP: the plan of an empty history, kept for the whole run
            counts_LRE, seen = np.zeros_like(counts_LRE), -1
        rows, info = [], _empty_info(seen)
        for l in range(L):
            row, layer_info = plan_layer(counts_LRE[l], model, cluster, cfg, rng)
            rows.append(relabel_gpus_for_layer(row, l, cfg.slots_per_rank,
                                               cluster.gpus_per_node))
            for key, value in layer_info.items():
                info.setdefault(key + "_L", []).append(value)
        info["replicas_LE"] = [replicas[chosen] for replicas, chosen
                               in zip(info["candidate_replicas_L"], info["chosen_L"],
                                      strict=True)]
        placement = Placement(np.array(rows), G, cfg.slots_per_rank, E)
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
    return sum_counts(past[start:end], 0) / (end - start), seen


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
    replicas_KE = np.array([r_E for _, r_E in cands])
    K = replicas_KE.shape[0]
    k, g, e = copies_J = greedy_place_J(replicas_KE, load_E, cluster.gpus_per_node,
                                        [C] * G)
    cost_K, _, _ = fsep_cost(copies_J, K, counts_RE, model, cluster, cfg.recompute)
    best = int(cost_K.argmin())
    facts = {"candidate_names": [name for name, _ in cands], "candidate_costs": cost_K.tolist(),
             "candidate_replicas": replicas_KE.tolist(), "chosen": best}
    if cfg.keep_candidates:
        facts["candidate_copies"] = np.bincount((k * G + g) * E + e,
                                                minlength=K * G * E).reshape(K, G, E)
    mine = k == best
    return copies_J_to_phy2log(g[mine], e[mine], E, G, C), facts
