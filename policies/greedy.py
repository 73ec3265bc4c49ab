"""LAER-MoE's replica split and node-spreading greedy placement (Hecate and ``oracle_ilp``
reuse them), written for planner speed without changing a single decision.

Liu et al., "LAER-MoE" (arXiv 2602.11686), §4 (planner): the *precise* split grows the expert
with the highest per-replica load one step at a time; the *greedy* places replicas in decreasing
per-replica load on the node holding the fewest copies of that expert, least-loaded GPU first.
``tests/policies/test_laer_reference.py`` holds every function here to the straightforward
version it replaced (``tests/policies/laer_reference.py``) on thousands of random cases. Where
``pip install`` had a C compiler, the precise split, the greedy and the slot rows run in
``_greedy_c.c`` (the same algorithm: one heap, the same rounds, the same tie-breaks; each node's
best free GPU cached until the node changes); the Python here is the fallback and the kernel's
reading.

Shape legend: ``E`` experts, ``G`` GPUs, ``N`` nodes, ``K`` candidate vectors, ``J`` placed
copies, ``S`` slots per GPU, ``M`` growth steps one expert may take, ``W`` the window of steps
:func:`precise_replicas` examines per expert.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from moesim.errors import MoesimError

try:                                        # built by setup.py where a C compiler is present
    from moesim.policies import _greedy_c
except ImportError:                         # pragma: no cover - the Python greedy then
    _greedy_c = None

# Relative margin under which a quotient is surely above the split's threshold (float error on
# the quotients is ~1e-16; any margin far above that and far below 1/picks is safe).
_MARGIN = 1e-9


def precise_replicas(load_E: np.ndarray, num_slots: int, num_nodes: int,
                     max_per_expert: int) -> np.ndarray:
    """LAER-MoE's precise split: ``[E]`` int64, ``Σ ≤ num_slots``.

    Start every expert at ``N`` replicas when ``N·E ≤ num_slots`` (then grow in steps of ``N``),
    else at 1 (grow by 1); repeatedly grow the expert with the highest ``load / replicas``
    (lowest id on ties) while the step fits and the expert stays ``≤ max_per_expert``.

    That max-heap pops the ``picks`` largest quotients ``q[e, m] = load_e / (step·m)``
    (``m = 1 … M``) in order of ``(−q, e, m)``; we select them at once with a partition. Only a
    window of each row is examined: with ``x_e = picks · load_e / Σ load``, every ``m < x_e``
    has ``q[e, m] > Σ load / (step·picks)``, which bounds the threshold from above (the
    ``picks`` largest quotients sum their counts to at most ``Σ load / (step·threshold)``) —
    those steps are surely taken. The ``need`` steps left come from the next ``need`` of each
    row (a row offering more than ``need`` at or above the threshold would put ``picks``
    quotients strictly above it), so ties resolve exactly as in the full ``[E, M]`` matrix.
    """
    load = np.asarray(load_E, dtype=np.float64)
    E = load.shape[0]
    if _greedy_c is not None:                              # the heap itself, in C
        out = np.empty(E, dtype=np.int64)
        _greedy_c.precise(np.ascontiguousarray(load), num_slots, num_nodes, max_per_expert, out)
        return out
    step = num_nodes if num_nodes * E <= num_slots else 1
    picks, M = (num_slots - step * E) // step, max_per_expert // step - 1
    if picks <= 0 or M <= 0:
        return np.array([step] * E, dtype=np.int64)
    if picks >= E * M:
        return np.array([step * (M + 1)] * E, dtype=np.int64)
    total = float(load.sum())
    sure_E = np.zeros(E, dtype=np.int64)
    if total > 0.0:
        x_E = load * (picks * (1.0 - _MARGIN) / total)
        sure_E = np.clip(np.ceil(x_E) - 1, 0, M).astype(np.int64)
    need = picks - int(sure_E.sum())
    W = min(M, need)
    m_EW = sure_E[:, None] + np.arange(1, W + 1)
    neg_EW = -load[:, None] / (step * m_EW)
    if int(sure_E.max()) + W > M:
        neg_EW[m_EW > M] = np.inf                              # past the per-expert cap
    flat = neg_EW.ravel()
    kth = np.partition(flat, need - 1)[need - 1]
    take = flat < kth
    take[(flat == kth).nonzero()[0][:need - int(take.sum())]] = True
    return step * (sure_E + take.reshape(E, W).sum(1) + 1)


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
    if _greedy_c is not None:
        return _greedy_in_c(replicas_KE, load_E, int(gpus_per_node), free_G, copies_GE,
                            gpu_load_G, allow_duplicates, skip_unplaceable)
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


def _greedy_in_c(replicas_KE: np.ndarray, load_E: np.ndarray, gpus_per_node: int,
                 free_G: np.ndarray | list[int], copies_GE: np.ndarray | None,
                 gpu_load_G: np.ndarray | None, allow_duplicates: bool,
                 skip_unplaceable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`greedy_place_J` by the C kernel (``_greedy_c.c``: the same rounds, the same
    order of experts)."""
    reps_KE = np.ascontiguousarray(replicas_KE, dtype=np.int64)
    K, E = reps_KE.shape
    free = np.ascontiguousarray(free_G, dtype=np.int64)
    load = (np.zeros(free.shape[0]) if gpu_load_G is None
            else np.ascontiguousarray(gpu_load_G, dtype=np.float64))
    room = max(int(reps_KE.sum()), 0)
    gpu_J, expert_J = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
    sizes_K = np.empty(K, dtype=np.int64)
    n = _greedy_c.place(K, E, reps_KE, np.ascontiguousarray(load_E, dtype=np.float64), free,
                        load, None if copies_GE is None
                        else np.ascontiguousarray(copies_GE, dtype=np.int64),
                        gpus_per_node, allow_duplicates, skip_unplaceable, gpu_J, expert_J,
                        sizes_K)
    if n < 0:
        raise MoesimError(f"no free slot left for a replica of expert {-n - 1}; raise the "
                          "slots per rank")
    return np.arange(K, dtype=np.int64).repeat(sizes_K), gpu_J[:n], expert_J[:n]


def _greedy_start(free_G: np.ndarray | list[int], gpu_load_G: np.ndarray | None, gpus_per_node: int,
                  init_GE: np.ndarray | None) -> tuple:
    """The greedy's starting state: per node a heap of ``(load, gpu, free slots, node)`` over
    its GPUs with free slots; per expert the GPUs holding it and its copies per node (``None``
    without initial copies). Never mutated (each candidate copies the heaps)."""
    free = tuple(free_G) if isinstance(free_G, list) else tuple(np.asarray(free_G).tolist())
    if gpu_load_G is None and init_GE is None:
        return _empty_start(free, gpus_per_node)               # LAER: the same every call
    gl = [0.0] * len(free) if gpu_load_G is None else np.asarray(gpu_load_G, np.float64).tolist()
    heaps = _node_heaps(gl, free, gpus_per_node)
    if init_GE is None:
        return heaps, None, None
    E = init_GE.shape[1]
    held_E = [set(np.flatnonzero(col).tolist()) for col in init_GE.T]
    level_EN = init_GE.reshape(len(heaps), gpus_per_node, E).sum(1).T.tolist()
    return heaps, held_E, level_EN


@lru_cache(maxsize=64)
def _empty_start(free: tuple[int, ...], gpus_per_node: int) -> tuple:
    return _node_heaps([0.0] * len(free), free, gpus_per_node), None, None


def _node_heaps(gl: list[float], free: tuple[int, ...], gpus_per_node: int) -> list[list]:
    G = len(free)
    items = list(zip(gl, range(G), free, [g // gpus_per_node for g in range(G)], strict=True))
    heaps = [items[first:first + gpus_per_node] for first in range(0, G, gpus_per_node)]
    if min(free, default=1) <= 0:
        heaps = [[it for it in heap if it[2] > 0] for heap in heaps]
    for heap in heaps:
        heapq.heapify(heap)
    return heaps


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


def copies_J_to_phy2log(gpu_J: np.ndarray, expert_J: np.ndarray, num_experts: int,
                        num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """:func:`copies_to_phy2log` from a list of copies (GPU and expert per copy, any order)."""
    if _greedy_c is not None:
        out = np.empty(num_ranks * slots_per_rank, dtype=np.int64)
        _greedy_c.slot_row(np.ascontiguousarray(gpu_J, np.int64),
                           np.ascontiguousarray(expert_J, np.int64), num_experts, num_ranks,
                           slots_per_rank, out)
        return out
    key = np.sort(gpu_J * num_experts + expert_J)           # rank-major, experts ascending
    rank = key // num_experts
    pos = np.arange(key.shape[0]) - rank.searchsorted(rank)
    assert (pos < slots_per_rank).all(), "more copies than slots on a rank"
    out = np.full(num_ranks * slots_per_rank, -1, dtype=np.int64)
    out[rank * slots_per_rank + pos] = key % num_experts
    return out


