"""Shared building blocks of placement policies: replica counting, packing, slot layouts, loads.

Every function is pure numpy, deterministic, and vectorised over a leading "row" axis where the
caller usually has one (layers, or layer × node). Ties are always broken towards the lower index,
so results never depend on hash order or a global RNG.

Shape legend: ``N`` rows (layers, or layers × nodes), ``L`` layers, ``E`` logical experts,
``I`` items to pack, ``K`` packs, ``G`` ranks (GPUs), ``S`` slots per rank, ``P = G·S`` physical
slots of one layer, ``R`` source ranks.

Vocabulary (DeepSeek EPLB's): ``phy2log`` maps a physical slot to its logical expert,
``log2phy`` the reverse, ``logcnt`` counts replicas, ``rank`` is a replica's index among the
copies of its expert.

The last section holds small lowering helpers several policies' hooks share (a GPU Adam step
with the ZeRO-1 dense shard, per-rank slot parameters).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from moesim.errors import MoesimError

# --------------------------------------------------------------------------------------------
# replica counts


def replica_counts_swiftmoe(pop_E: np.ndarray, num_slots: int) -> np.ndarray:
    """SwiftMoE's replica counts (arXiv 2504.19925, App. A.3): ``[E]`` int64 summing to
    ``num_slots``, every entry >= 1.

    ``goal = pop/Σpop · num_slots``; ``cnt = floor(max(goal, 1))``; ``diff = cnt − goal``;
    while ``Σcnt > num_slots`` decrement at ``argmax(diff)`` among experts with ``cnt > 1`` and
    ``diff −= 1`` there; while ``Σcnt < num_slots`` increment at ``argmin(diff)`` and ``diff += 1``.
    A popularity vector with no tokens gives the uniform goal ``num_slots / E``.
    """
    pop = np.asarray(pop_E, dtype=np.float64)
    E = pop.shape[0]
    if num_slots < E:
        raise MoesimError(f"{num_slots} slots cannot hold {E} experts; give every expert a slot "
                          "(raise slots_per_rank)")
    total = pop.sum()
    goal = pop / total * num_slots if total > 0 else np.full(E, num_slots / E)
    cnt = np.floor(np.maximum(goal, 1.0)).astype(np.int64)
    diff = cnt - goal
    while cnt.sum() > num_slots:
        masked = np.where(cnt > 1, diff, -np.inf)
        e = int(np.argmax(masked))
        cnt[e] -= 1
        diff[e] -= 1.0
    while cnt.sum() < num_slots:
        e = int(np.argmin(diff))
        cnt[e] += 1
        diff[e] += 1.0
    return cnt


def uniform_counts(num_experts: int, num_slots: int) -> np.ndarray:
    """Replica counts as even as possible: ``[E]``, the first ``num_slots % E`` get one more."""
    if num_slots < num_experts:
        raise MoesimError(f"{num_slots} slots cannot hold {num_experts} experts; raise "
                          "slots_per_rank")
    cnt = np.full(num_experts, num_slots // num_experts, dtype=np.int64)
    cnt[: num_slots % num_experts] += 1
    return cnt


def replicate_experts(weight_NE: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """EPLB's replication: start with one copy each, then repeatedly copy the expert with the
    highest load per copy (``weight / logcnt``, lowest index on ties).

    Returns ``phy2log_NP`` (the first ``E`` slots are experts ``0..E-1`` in order, extra copies
    follow in the order they were made), ``rank_NP`` (each slot's replica index) and
    ``logcnt_NE``. ``P = num_phy``.
    """
    weight = np.asarray(weight_NE, dtype=np.float64)
    N, E = weight.shape
    if num_phy < E:
        raise MoesimError(f"{num_phy} physical slots cannot hold {E} experts; raise the slot "
                          "count")
    rows = np.arange(N)
    phy2log = np.empty((N, num_phy), dtype=np.int64)
    rank = np.empty((N, num_phy), dtype=np.int64)
    phy2log[:, :E] = np.arange(E)
    rank[:, :E] = 0
    logcnt = np.ones((N, E), dtype=np.int64)
    for p in range(E, num_phy):
        e = np.argmax(weight / logcnt, axis=1)
        phy2log[:, p] = e
        rank[:, p] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, rank, logcnt


# --------------------------------------------------------------------------------------------
# packing


def balanced_packing(weight_NI: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's balanced packing: ``I`` weighted items into ``num_packs`` packs of exactly
    ``I / num_packs`` items each, heaviest item first into the currently lightest pack that still
    has room (lowest pack index on ties).

    Returns ``pack_index_NI`` (the pack of each item) and ``rank_in_pack_NI`` (its position
    inside the pack, in the order items arrived). ``I`` must be a multiple of ``num_packs``.
    """
    weight = np.asarray(weight_NI, dtype=np.float64)
    N, I = weight.shape
    if num_packs <= 0 or I % num_packs:
        raise MoesimError(f"{I} items do not split evenly into {num_packs} packs; make the "
                          "item count a multiple of the pack count")
    per_pack = I // num_packs
    pack_index = np.empty((N, I), dtype=np.int64)
    rank_in_pack = np.empty((N, I), dtype=np.int64)
    if per_pack == 1:  # every item alone in a pack: heaviest to pack 0, ...
        order = np.argsort(-weight, axis=1, kind="stable")
        pack_index[np.arange(N)[:, None], order] = np.arange(I)
        rank_in_pack[:] = 0
        return pack_index, rank_in_pack
    for n in range(N):
        _pack_row(weight[n], num_packs, per_pack, pack_index[n], rank_in_pack[n])
    return pack_index, rank_in_pack


def _pack_row(weight_I: np.ndarray, num_packs: int, per_pack: int, pack_out_I: np.ndarray,
              rank_out_I: np.ndarray) -> None:
    """One row of :func:`balanced_packing` with a heap of ``(pack weight, pack id)``."""
    heap = [(0.0, k) for k in range(num_packs)]
    count = [0] * num_packs
    for i in np.argsort(-weight_I, kind="stable"):
        w, k = heapq.heappop(heap)
        pack_out_I[i] = k
        rank_out_I[i] = count[k]
        count[k] += 1
        if count[k] < per_pack:
            heapq.heappush(heap, (w + float(weight_I[i]), k))


def packs_to_slots(pack_index_NI: np.ndarray, rank_in_pack_NI: np.ndarray) -> np.ndarray:
    """Invert a packing: ``item_NP[n, k·per_pack + j]`` is the item at position ``j`` of pack
    ``k`` (``P = I``)."""
    N, I = pack_index_NI.shape
    num_packs = int(pack_index_NI.max(initial=0)) + 1 if I else 1
    per_pack = I // max(num_packs, 1)
    slot = pack_index_NI * per_pack + rank_in_pack_NI
    out = np.empty((N, I), dtype=np.int64)
    out[np.arange(N)[:, None], slot] = np.arange(I)[None, :]
    return out


def greedy_pack_fixed(weight_I: np.ndarray, num_packs: int,
                      capacity_K: np.ndarray) -> np.ndarray:
    """Heaviest item first into the lightest pack with free capacity (ragged capacities).

    Returns ``pack_I``. ``capacity_K.sum()`` must be at least ``I``.
    """
    cap = np.asarray(capacity_K, dtype=np.int64).copy()
    if cap.sum() < len(weight_I):
        raise MoesimError("not enough free slots for the items to place")
    heap = [(0.0, k) for k in range(num_packs) if cap[k] > 0]
    heapq.heapify(heap)
    out = np.empty(len(weight_I), dtype=np.int64)
    for i in np.argsort(-np.asarray(weight_I, dtype=np.float64), kind="stable"):
        w, k = heapq.heappop(heap)
        out[i] = k
        cap[k] -= 1
        if cap[k] > 0:
            heapq.heappush(heap, (w + float(weight_I[i]), k))
    return out


# --------------------------------------------------------------------------------------------
# replica counts placed on GPUs (LAER-MoE's precise split and greedy; Hecate and oracle_ilp
# reuse them)


def precise_replicas(load_E: np.ndarray, num_slots: int, num_nodes: int,
                     max_per_expert: int) -> np.ndarray:
    """LAER-MoE's precise split: ``[E]`` int64, ``Σ ≤ num_slots``.

    Start every expert at ``N`` replicas when ``N·E ≤ num_slots`` (then grow in steps of ``N``),
    else at 1 (grow by 1); repeatedly grow the expert with the highest ``load / replicas``
    (lowest id on ties) while the step fits and the expert stays ``≤ max_per_expert``.

    That max-heap pops the quotients ``load_e / (step·m)`` (``m = 1, 2, …`` while
    ``step·(m+1) ≤ max_per_expert``) in order of ``(−quotient, e)``; we select the popped ones
    at once with a partition (ties to the lowest ``(e, m)``), the same counts.
    """
    load = np.asarray(load_E, dtype=np.float64)
    E = load.shape[0]
    step = num_nodes if num_nodes * E <= num_slots else 1
    picks, M = (num_slots - step * E) // step, max_per_expert // step - 1
    if picks <= 0 or M <= 0:
        return np.array([step] * E, dtype=np.int64)
    neg_EM = -load[:, None] / (step * np.arange(1, M + 1))[None, :]
    if picks >= neg_EM.size:
        return np.array([step * (M + 1)] * E, dtype=np.int64)
    flat = neg_EM.ravel()
    kth = np.partition(flat, picks - 1)[picks - 1]
    take = flat < kth
    take[(flat == kth).nonzero()[0][:picks - int(take.sum())]] = True
    return step * (take.reshape(E, M).sum(1) + 1)


def greedy_place(replicas_E: np.ndarray, load_E: np.ndarray, gpus_per_node: int,
                 free_G: np.ndarray, copies_GE: np.ndarray | None = None,
                 gpu_load_G: np.ndarray | None = None, allow_duplicates: bool = True,
                 skip_unplaceable: bool = False) -> np.ndarray:
    """LAER-MoE's greedy: place ``replicas_E[e]`` new copies of each expert; returns copies
    ``[G, E]`` (the initial ``copies_GE`` plus the new ones). Given ``replicas_KE`` (``K``
    candidate vectors) it places each independently from the same start: ``[K, G, E]``.

    Replicas go in decreasing per-replica load ``load_e / (all copies of e)`` (lowest id first
    on ties). Each goes to a GPU with a free slot (``free_G`` counts them) on a node holding the
    fewest copies of that expert; among those nodes, to the least-loaded GPU (``gpu_load_G``,
    tokens, grows by the per-replica load; lowest GPU id on ties). A GPU already holding the
    expert comes last, or never with ``allow_duplicates=False``. A replica that fits nowhere
    raises, or is left out with ``skip_unplaceable=True``.

    All replicas of one expert carry the same load, so placing them one at a time visits the
    nodes of the lowest copy level in increasing order of their best GPU's key, each node once:
    we place such a *round* at once (:func:`_place_candidate`). Plain Python on per-node heaps:
    at these sizes it beats numpy's per-call overhead.
    """
    reps_KE = np.asarray(replicas_E, dtype=np.int64)
    K, E, G = int(np.prod(reps_KE.shape[:-1])), reps_KE.shape[-1], len(free_G)
    k, gpu, expert = greedy_place_J(reps_KE.reshape(K, E), load_E, gpus_per_node, free_G,
                                    copies_GE, gpu_load_G, allow_duplicates, skip_unplaceable)
    copies = np.bincount((k * G + gpu) * E + expert, minlength=K * G * E).reshape(K, G, E)
    if copies_GE is not None:
        copies += np.asarray(copies_GE, dtype=np.int64)
    return copies.reshape(reps_KE.shape[:-1] + (G, E))


def greedy_place_J(replicas_KE: np.ndarray, load_E: np.ndarray, gpus_per_node: int,
                   free_G: np.ndarray | list[int], copies_GE: np.ndarray | None = None,
                   gpu_load_G: np.ndarray | None = None, allow_duplicates: bool = True,
                   skip_unplaceable: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The new copies :func:`greedy_place` makes for ``K`` candidate vectors ``[K, E]``, one
    entry per copy, in placement order: ``(candidate_J, gpu_J, expert_J)``, int64."""
    reps_KE = np.asarray(replicas_KE, dtype=np.int64)
    K, E = reps_KE.shape
    init = None if copies_GE is None else np.asarray(copies_GE, dtype=np.int64)
    total_KE = reps_KE if init is None else reps_KE + init.sum(0)
    per_copy_KE = np.asarray(load_E, dtype=np.float64) / np.maximum(total_KE, 1)
    order_KE = (-per_copy_KE).argsort(axis=1, kind="stable")
    rows_K1 = np.arange(K)[:, None]
    reps_KE = reps_KE[rows_K1, order_KE]                      # both in placement order
    start = _greedy_start(free_G, gpu_load_G, int(gpus_per_node), init)
    gpus, sizes, per_candidate = [], [], []
    for row in zip(order_KE.tolist(), reps_KE.tolist(),
                   per_copy_KE[rows_K1, order_KE].tolist(), strict=True):
        placed = _place_candidate(start, *row, allow_duplicates, skip_unplaceable, sizes)
        gpus += placed
        per_candidate.append(len(placed))
    return (np.arange(K, dtype=np.int64).repeat(per_candidate),
            np.array(gpus, dtype=np.int64), order_KE.ravel().repeat(sizes))


def _greedy_start(free_G: np.ndarray | list[int], gpu_load_G: np.ndarray | None, gpus_per_node: int,
                  init_GE: np.ndarray | None) -> tuple:
    """The greedy's starting state: per node a heap of ``(load, gpu, free slots, node)`` over
    its GPUs with free slots; per expert the GPUs holding it and its copies per node (``None``
    without initial copies)."""
    free = free_G if isinstance(free_G, list) else np.asarray(free_G).tolist()
    G = len(free)
    gl = [0.0] * G if gpu_load_G is None else np.asarray(gpu_load_G, np.float64).tolist()
    items = list(zip(gl, range(G), free, [g // gpus_per_node for g in range(G)], strict=True))
    heaps = [items[first:first + gpus_per_node] for first in range(0, G, gpus_per_node)]
    if min(free, default=1) <= 0:
        heaps = [[it for it in heap if it[2] > 0] for heap in heaps]
    for heap in heaps:
        heapq.heapify(heap)
    if init_GE is None:
        return heaps, None, None
    E = init_GE.shape[1]
    held_E = [set(np.flatnonzero(col).tolist()) for col in init_GE.T]
    level_EN = init_GE.reshape(len(heaps), gpus_per_node, E).sum(1).T.tolist()
    return heaps, held_E, level_EN


def _place_candidate(start: tuple, order: list[int], reps: list[int], per_copy: list[float],
                     allow_duplicates: bool, skip_unplaceable: bool,
                     sizes: list[int]) -> list[int]:
    """:func:`greedy_place` of one candidate (experts in placement ``order``, with their replica
    counts and per-copy loads): returns the GPUs used, in order, and appends to ``sizes`` how
    many each expert took.

    An expert nobody holds yet takes the first ``k`` of the nodes' tops (kept sorted across
    experts: every node is then at copy level 0 and its least-loaded GPU is its offer); later
    rounds of an expert, and experts with initial copies, go through :func:`_rounds`. The hot
    loop is written for speed (bound methods, no per-copy function call)."""
    base_heaps, held_E, level_EN = start
    heaps = [h[:] for h in base_heaps]
    tops = sorted([h[0] for h in heaps if h])
    push, replace, pop = tops.append, heapq.heapreplace, heapq.heappop
    takes = []
    for e, k, p in zip(order, reps, per_copy, strict=True):
        if not k:
            takes.append(())
            continue
        if held_E is None or not held_E[e]:
            take = tops[:k]
            del tops[:k]
            for load, g, f, n in take:
                h = heaps[n]
                if f > 1:
                    replace(h, (load + p, g, f - 1, n))
                    push(h[0])
                else:
                    pop(h)
                    if h:
                        push(h[0])
            tops.sort()
            takes.append(take)
            if len(take) == k:
                continue
            held, level = {it[1] for it in take}, [0] * len(heaps)
            for it in take:
                level[it[3]] += 1
        else:
            take, held, level = [], set(held_E[e]), list(level_EN[e])
            takes.append(take)
        take += _rounds(heaps, held, level, k - len(take), p, allow_duplicates)
        tops[:] = sorted([h[0] for h in heaps if h])
        if len(take) < k and not skip_unplaceable:
            raise MoesimError(f"no free slot left for a replica of expert {e}; raise the "
                              "slots per rank")
    sizes += [len(t) for t in takes]
    return [it[1] for take in takes for it in take]


def _rounds(heaps: list, held: set[int], level_N: list[int], count: int, per_copy: float,
            allow_duplicates: bool) -> list[tuple]:
    """Place up to ``count`` copies of one expert, a round of lowest-level nodes at a time,
    each node offering its least-loaded GPU not holding the expert (a holder last); updates
    ``heaps``, ``held`` and ``level_N`` in place; returns the heap items used."""
    placed: list[tuple] = []
    while len(placed) < count:
        offers = []
        for h in heaps:
            if not h:
                continue
            if h[0][1] not in held:
                offers.append((level_N[h[0][3]], False, h[0]))
                continue
            free = [it for it in h if it[1] not in held]
            if free:
                best = min(free)
                offers.append((level_N[best[3]], False, best))
            elif allow_duplicates:
                offers.append((level_N[h[0][3]], True, h[0]))
        if not offers:
            break
        offers.sort()
        low = offers[0][0]
        for lev, _, item in offers[:count - len(placed)]:
            if lev != low:
                break
            load, g, f, n = item
            h = heaps[n]
            if h[0] is item:
                heapq.heappop(h)
            else:
                h.remove(item)
                heapq.heapify(h)
            if f > 1:
                heapq.heappush(h, (load + per_copy, g, f - 1, n))
            held.add(g)
            level_N[n] += 1
            placed.append(item)
    return placed


def copies_to_phy2log(copies_GE: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Slot row ``[G·S]`` from copies ``[G, E]``: each rank's experts in id order, ``-1`` pad."""
    G, E = copies_GE.shape
    copies = copies_GE.ravel()
    flat = (copies != 0).nonzero()[0]                       # rank-major, experts ascending
    flat = flat.repeat(copies[flat])
    rank = flat // E
    pos = np.arange(flat.shape[0]) - rank.searchsorted(rank)
    assert (pos < slots_per_rank).all(), "more copies than slots on a rank"
    out = np.array([-1] * (G * slots_per_rank), dtype=np.int64)
    out[rank * slots_per_rank + pos] = flat % E
    return out


# --------------------------------------------------------------------------------------------
# slot layouts


def contiguous_slots(cnt_E: np.ndarray, num_slots: int) -> np.ndarray:
    """SwiftMoE's layout: ``[0]*cnt[0] + [1]*cnt[1] + ...`` — ``phy2log_P`` of length
    ``num_slots`` (slot ``j`` of rank ``r`` is index ``r·S + j``)."""
    cnt = np.asarray(cnt_E, dtype=np.int64)
    if cnt.sum() != num_slots or (cnt < 0).any():
        raise MoesimError(f"replica counts sum to {int(cnt.sum())}, need exactly {num_slots}")
    return np.repeat(np.arange(len(cnt), dtype=np.int64), cnt)


def striped_slots(num_experts: int, num_slots: int) -> np.ndarray:
    """Uniform layout ``phy2log_P[p] = p % E``: with ``S = E/G`` it is static EP's contiguous
    assignment; with more slots every expert's replicas sit on different ranks."""
    if num_slots < num_experts:
        raise MoesimError(f"{num_slots} slots cannot hold {num_experts} experts; raise "
                          "slots_per_rank")
    return np.arange(num_slots, dtype=np.int64) % num_experts


def uniform_phy2log_LP(num_layers: int, num_experts: int, num_ranks: int,
                       slots_per_rank: int) -> np.ndarray:
    """The iteration-0 placement of every layer: :func:`striped_slots` repeated, ``[L, G·S]``."""
    row = striped_slots(num_experts, num_ranks * slots_per_rank)
    return np.tile(row, (num_layers, 1))


def logcnt_of(phy2log_P: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas per expert of one layer: ``[E]`` (empty slots, ``-1``, ignored)."""
    row = np.asarray(phy2log_P)
    return np.bincount(row[row >= 0], minlength=num_experts).astype(np.int64)


# --------------------------------------------------------------------------------------------
# loads and capacity


def slot_load(phy2log_P: np.ndarray, load_E: np.ndarray) -> np.ndarray:
    """Expected tokens per slot when each expert's load splits evenly over its replicas: ``[P]``
    (0 for empty slots)."""
    row = np.asarray(phy2log_P)
    load = np.asarray(load_E, dtype=np.float64)
    cnt = logcnt_of(row, load.shape[0])
    per_copy = load / np.maximum(cnt, 1)
    return np.where(row >= 0, per_copy[np.maximum(row, 0)], 0.0)


def gpu_load(phy2log_P: np.ndarray, load_E: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Expected tokens per rank, ``[G]``, under an even split of each expert over its replicas."""
    return slot_load(phy2log_P, load_E).reshape(-1, slots_per_rank).sum(axis=1)


def gpu_load_LG(phy2log_LP: np.ndarray, load_LE: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """:func:`gpu_load` for every layer: ``[L, G]``."""
    return np.stack([gpu_load(phy2log_LP[l], load_LE[l], slots_per_rank)
                     for l in range(phy2log_LP.shape[0])])


def slot_capacity(capacity_factor: float | None, tokens_per_rank: int, top_k: int,
                  num_slots: int) -> int | None:
    """Tokens one source rank may send one slot per pass: ``ceil(cf · tokens_per_rank · k / P)``.

    A pass holds ``G · tokens_per_rank · k`` token assignments; a slot's fair share is that over
    ``P = G·S`` slots, times ``cf``; split evenly over the ``G`` source ranks (gates drop locally,
    before the dispatch) gives ``cf · tokens_per_rank · k / (S·G)``. ``None`` cf is dropless.
    """
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * tokens_per_rank * top_k / num_slots))


def window_load_LE(history, iterations: int, num_layers: int, num_experts: int) -> np.ndarray:
    """Expert load summed over the last ``iterations`` iterations, ``[L, E]`` float; zeros when
    there is no history (so planners fall back to uniform)."""
    load = history.recent_load_LE(iterations)
    if load is None:
        return np.zeros((num_layers, num_experts))
    return np.asarray(load, dtype=np.float64)


def per_iteration_load_TLE(history, iterations: int | None = None) -> np.ndarray:
    """Expert load per past iteration (summed over its passes and ranks), oldest first:
    ``[T_it, L, E]``; only the last ``iterations`` iterations when given."""
    past = history.past_TLRE
    mb = history.passes_per_iteration
    T = past.shape[0] // mb
    if iterations is not None:
        T = min(T, iterations)
    if T == 0:
        return np.zeros((0, past.shape[1], past.shape[3]))
    recent = past[past.shape[0] - T * mb:]
    return recent.sum(axis=2).reshape(T, mb, past.shape[1], past.shape[3]).sum(axis=1)


def ema_load_LE(history, decay: float, num_layers: int, num_experts: int,
                window: int | None = None) -> np.ndarray:
    """Exponential moving average of per-iteration expert load, ``[L, E]``: ``x ← d·x +
    (1−d)·load_t`` over the last ``window`` iterations (all when None), seeded by the oldest.
    Zeros with no history."""
    per_it = per_iteration_load_TLE(history, window)
    if per_it.shape[0] == 0:
        return np.zeros((num_layers, num_experts))
    avg = per_it[0].astype(np.float64)
    for t in range(1, per_it.shape[0]):
        avg = decay * avg + (1.0 - decay) * per_it[t]
    return avg


def moved_slots_LP(phy2log_LP: np.ndarray, previous_LP: np.ndarray | None) -> np.ndarray:
    """Slots whose expert differs from the previous placement (all filled slots if none)."""
    if previous_LP is None or previous_LP.shape != phy2log_LP.shape:
        return phy2log_LP >= 0
    return (phy2log_LP != previous_LP) & (phy2log_LP >= 0)


def moved_count_L(phy2log_LP: np.ndarray, previous_LP: np.ndarray | None) -> np.ndarray:
    """Slots per layer whose expert must be (re)loaded since the previous placement, ``[L]``;
    zeros when there is none (the initial placement is loaded with the model, not migrated)."""
    if previous_LP is None:
        return np.zeros(phy2log_LP.shape[0], dtype=np.int64)
    return moved_slots_LP(phy2log_LP, previous_LP).sum(axis=1)


# --------------------------------------------------------------------------------------------
# lowering helpers shared by several policies' hooks (``ctx`` is a LoweringContext)


def dense_params_R(model, world: int) -> np.ndarray:
    """Dense parameters whose ZeRO-1 optimizer shard each rank owns: ``[R]``."""
    return np.full(world, model.num_layers * model.dense_params / world)


def emit_gpu_optimizer(ctx, expert_params_R: np.ndarray, deps: tuple[int, ...],
                       label: str = "adam") -> list[int]:
    """A memory-bound GPU Adam step over ``expert_params_R`` plus each rank's ZeRO-1 dense
    shard, then the all-gather of the updated dense weights (no expert all-gather: the
    caller's experts are either unreplicated or updated identically on every replica).

    Per parameter Adam reads and writes master/m/v (``2·b_o``), reads the grad and writes the
    weight; 10 FLOPs. Returns the op indices later work waits for."""
    from moesim.ops import AllGather, Compute

    m = ctx.model
    params_R = np.asarray(expert_params_R, dtype=np.float64) + dense_params_R(m, ctx.world)
    per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
    step = ctx.add(Compute(phase="optimizer", direction="step", kind="other", deps=deps,
                           flops_R=params_R * 10.0, bytes_R=params_R * per_param, label=label))
    out = [step]
    dense_bytes = m.num_layers * m.dense_params * m.bytes_weight
    if ctx.world > 1 and dense_bytes > 0:
        out.append(ctx.add(AllGather(
            phase="optimizer", direction="step", deps=(step,), groups=(np.arange(ctx.world),),
            bytes_G=np.array([dense_bytes]), experts_G=np.array([-1]), label="dense_params")))
    return out


def slot_params_R(placement, params_per_expert: float) -> np.ndarray:
    """Expert parameters held in filled slots per rank, summed over layers: ``[R]``."""
    filled_LRS = (placement.phy2log_LP >= 0).reshape(placement.num_layers, placement.num_ranks,
                                                       placement.slots_per_rank)
    return filled_LRS.sum(axis=(0, 2)) * float(params_per_expert)


def relabel_gpus_for_layer(phy2log_P: np.ndarray, layer: int, slots_per_rank: int,
                           gpus_per_node: int) -> np.ndarray:
    """Move GPU ``(node n, local j)``'s slots to ``((n + layer) % N, (j + layer // N) % g)``.

    Greedy placements break ties towards the lowest GPU index, so without this every layer puts
    its hottest expert on the same GPU, which then holds every layer's largest activations and
    expert time (one rank's memory and busy time piling up across layers). The relabelling maps
    nodes to nodes, so per-layer loads, node spreading and modelled costs are unchanged; only
    which GPU plays which role differs from layer to layer (``G`` consecutive layers give a GPU
    every role once).
    """
    G = phy2log_P.shape[0] // slots_per_rank
    g = min(gpus_per_node, G)
    N = G // g
    rank = np.arange(G)
    target = ((rank // g + layer) % N) * g + (rank % g + layer // N) % g
    out = np.empty_like(phy2log_P)
    out.reshape(G, slots_per_rank)[target] = phy2log_P.reshape(G, slots_per_rank)
    return out
