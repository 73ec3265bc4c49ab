"""A frozen copy of LAER-MoE's planner as it stood before the speed-up (commit 44ad105), kept as
the old algorithm the optimised planner must reproduce decision for decision: the precise split
by a max-heap, the greedy placement with per-node heaps (a round of nodes at a time), and the
``node_first`` cost of all candidates in one numpy pass.

Do not optimise or restyle this file: ``test_laer_reference.py`` and ``benchmarks/planner_speed.py
--compare`` use it as the reference. Shape legend as in ``moesim.policies.laer_fsep``.
"""

from __future__ import annotations

import heapq

import numpy as np

from moesim.errors import MoesimError
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
