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
from functools import lru_cache

import numpy as np

from moesim.errors import MoesimError
from moesim.policies.base import sum_counts

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
    return sum_counts(recent, 2).reshape(T, mb, past.shape[1], past.shape[3]).sum(axis=1)


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
    """A memory-bound GPU Adam step over ``expert_params_R`` plus each rank's dense shard,
    then the all-gather of the updated dense weights (no expert all-gather: the caller's
    experts are either unreplicated or updated identically on every replica).

    The dense part follows the parallel layout (the context's ``dense_shard_params_R`` and
    ``emit_dense_param_allgather``): a ``1/t`` TP shard of the stage's dense weights, its
    optimizer state split over the DP group and gathered back over it (ZeRO-1, the
    policies' own scheme and the default layout's: all ranks, the whole dense model), or
    not gathered at all with ``zero=0`` (every rank updates its whole shard) or ``zero=3``
    (parameters stay sharded and are gathered layer by layer).

    Per parameter Adam reads and writes master/m/v (``2·b_o``), reads the grad and writes the
    weight; 10 FLOPs. Returns the op indices later work waits for."""
    from moesim.ops import Compute

    m = ctx.model
    params_R = np.asarray(expert_params_R, dtype=np.float64) + ctx.dense_shard_params_R()
    per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
    step = ctx.add(Compute(phase="optimizer", direction="step", kind="other", deps=deps,
                           flops_R=params_R * 10.0, bytes_R=params_R * per_param, label=label))
    return [step] + ctx.emit_dense_param_allgather((step,))


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
    return phy2log_P.reshape(G, slots_per_rank)[_relabel_source(G, gpus_per_node, layer)
                                                 ].reshape(phy2log_P.shape)


@lru_cache(maxsize=1024)
def _relabel_source(G: int, gpus_per_node: int, layer: int) -> np.ndarray:
    """``source[t]``: the GPU whose slots :func:`relabel_gpus_for_layer` moves to GPU ``t``
    (read-only; cached, the planners ask for the same few every iteration)."""
    g = min(gpus_per_node, G)
    N = G // g
    rank = np.arange(G)
    target = ((rank // g + layer) % N) * g + (rank % g + layer // N) % g
    source = np.empty(G, dtype=np.int64)
    source[target] = rank
    source.setflags(write=False)
    return source
