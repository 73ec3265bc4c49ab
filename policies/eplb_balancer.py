"""DeepSeek's Expert Parallelism Load Balancer, computed as its published ``eplb.py`` computes it.

DeepSeek-AI, "Expert Parallelism Load Balancer" (github.com/deepseek-ai/EPLB, ``eplb.py``;
DeepSeek-V3 technical report, arXiv 2412.19437, §3.4). ``rebalance_experts(weight[L, E],
num_replicas, num_groups, num_nodes, num_gpus)`` → ``(phy2log[L, P], log2phy[L, E, K],
logcnt[L, E])``:

- **hierarchical** (the reference's rule: ``num_groups % num_nodes == 0``): pack the expert
  groups onto nodes (balanced packing: equal item count per pack, heaviest item first into the
  lightest pack with room); replicate each node's experts into its ``P / num_nodes`` slots
  (repeatedly copy the expert with the highest load per copy); pack the copies onto the node's
  GPUs by per-copy load.
- **global** otherwise: the same with one group on one node (the reference's current code; its
  first release only replicated, without packing onto GPUs, deepseek-ai/EPLB issue 14).

``balancing`` makes the choice explicit (vLLM PR 51988): ``auto`` is the reference's rule,
``hierarchical`` refuses topologies it cannot serve, ``global`` always balances globally.

Two numerical modes (``precision``):

- ``float32`` (default) matches the reference on tie-free inputs, slot for slot: (1) loads,
  per-copy loads and pack sums are float32 values, as the reference's ``weight.float()``
  tensors (group sums are formed exactly, then rounded once; torch may sum a non-integer group
  in another order, so the last bit of a group sum can differ there); (2) balanced packing
  with one item per pack puts item ``i`` in pack ``i``; (3) ``log2phy`` lists an expert's
  replicas in creation order (the original first, then copies as they were made).
- ``float64`` is moesim's earlier, better-conditioned path: float64 loads and sums (no
  rounding of per-copy loads to 24 bits, so near-equal loads above ~2^24 tokens or with
  fractional per-copy loads are told apart where float32 ties or flips them); one item per
  pack goes heaviest-first to pack 0, 1, ... (the same balance, other GPU labels);
  ``log2phy`` lists replicas by ascending slot.

Both break exact ties towards the lower index (a stable sort; torch's CPU sort gives the same
order on the golden inputs). Input checks follow the reference (it asserts where this raises
``MoesimError``): hierarchical mode needs ``E % num_groups == 0``, ``num_gpus % num_nodes ==
0``; both need ``num_replicas % num_gpus == 0`` and ``num_replicas >= E``; global mode ignores
``num_groups`` (the reference runs with ``E = 6`` and 4 groups there).

The greedy steps run on heaps (``O(P log E)`` per row instead of the reference's ``O(P·E)``),
with the same picks: the copy goes to the highest per-copy load, lowest index on ties; the
item goes to the lightest pack with room, lowest index on ties.

Shape legend: ``L`` layers, ``E`` experts, ``P`` physical slots, ``K`` most replicas.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

from moesim.errors import MoesimError
from moesim.policies.stdsort import sort_desc

PRECISIONS = ("float32", "float64")
BALANCING = ("auto", "hierarchical", "global")


def balancing_mode(balancing: str, num_groups: int, num_nodes: int) -> str:
    """``hierarchical`` or ``global``: ``auto`` follows the reference (hierarchical when the
    groups divide over the nodes)."""
    if balancing not in BALANCING:
        raise MoesimError(f"eplb: balancing={balancing!r}; use one of {', '.join(BALANCING)}")
    if balancing == "auto":
        return "hierarchical" if num_groups % num_nodes == 0 else "global"
    return balancing


def check_inputs(E: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 mode: str) -> None:
    """The reference's preconditions, as one-line errors."""
    if num_replicas % num_gpus or num_replicas < E:
        raise MoesimError(f"eplb: {num_replicas} replicas must be a multiple of {num_gpus} GPUs "
                          f"and at least {E} experts")
    if mode != "hierarchical":
        return
    if num_groups < 1 or E % num_groups or num_groups % num_nodes:
        raise MoesimError(f"eplb: hierarchical balancing needs num_groups={num_groups} to divide "
                          f"the {E} experts and be a multiple of {num_nodes} nodes; pick such a "
                          "group count or balancing=global")
    if num_gpus % num_nodes:
        raise MoesimError(f"eplb: hierarchical balancing needs the {num_gpus} GPUs to split "
                          f"evenly over {num_nodes} nodes; use balancing=global")
    if num_replicas // num_nodes < E // num_nodes:
        raise MoesimError(f"eplb: {num_replicas} replicas leave a node fewer slots than "
                          "experts")


_F32 = struct.Struct("f")


def _round(precision: str):
    """Rounding of a Python float to the working precision (identity for float64); exact for
    sums and quotients of float32 values, whose float64 result rounds once more correctly."""
    if precision == "float32":
        return lambda x: _F32.unpack(_F32.pack(x))[0]
    return float


def replicate_row(weight_E: np.ndarray, num_phy: int, precision: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's replication of one row: ``(phy2log_P, rank_P, logcnt_E)``; slots ``0..E-1`` hold
    the experts in order, copies follow in creation order, ``rank`` is the copy's number.

    The greedy (copy the highest ``w_e / c_e``, lowest ``e`` on ties) takes the ``P − E``
    largest quotients ``w_e / c`` (``c >= 1``) in the order ``(−q, e, c)``, since each
    expert's quotients fall with ``c``. An expert ends with at most ``w_e·P/W + 1`` copies
    (every quotient taken is at least the last one, which is at least ``W/P``), so only
    ``c <= w_e·P/W + 2`` is examined and one sort replaces ``P − E`` steps; the step-by-step
    heap runs instead when a bound is reached (float rounding) or nothing is loaded."""
    w = np.asarray(weight_E, dtype=np.float64)
    E, extra = w.shape[0], num_phy - w.shape[0]
    total = float(w.sum())
    if extra > 0 and total > 0:
        bound_E = np.minimum(np.floor(w * (num_phy / total)).astype(np.int64) + 2, extra)
        e_J = np.repeat(np.arange(E), bound_E)
        c_J = np.arange(len(e_J)) - np.repeat(np.cumsum(bound_E) - bound_E, bound_E) + 1
        q_J = w[e_J] / c_J
        if precision == "float32":
            q_J = q_J.astype(np.float32).astype(np.float64)
        take = np.lexsort((c_J, e_J, -q_J))[:extra]
        cnt = 1 + np.bincount(e_J[take], minlength=E)
        if ((cnt - 1 < bound_E) | (bound_E == extra)).all():
            return (np.concatenate([np.arange(E), e_J[take]]),
                    np.concatenate([np.zeros(E, dtype=np.int64), c_J[take]]), cnt)
    return _replicate_heap(w, num_phy, precision)


def _replicate_heap(w: np.ndarray, num_phy: int, precision: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`replicate_row` one copy at a time on a heap of ``(−w_e / c_e, e)``."""
    rnd = _round(precision)
    wl = w.tolist()
    E = len(wl)
    cnt = [1] * E
    phy2log, rank = list(range(E)), [0] * E
    heap = [(-wl[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(num_phy - E):
        _, e = heapq.heappop(heap)
        phy2log.append(e)
        rank.append(cnt[e])
        cnt[e] += 1
        heapq.heappush(heap, (-rnd(wl[e] / cnt[e]), e))
    return (np.array(phy2log, dtype=np.int64), np.array(rank, dtype=np.int64),
            np.array(cnt, dtype=np.int64))


def pack_row(weight_I: np.ndarray, num_packs: int, precision: str, torch_ties: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Balanced packing of one row: ``(pack_I, rank_in_pack_I)``, ``I / num_packs`` items per
    pack, heaviest first into the lightest pack with room (pack sums in the working precision,
    lowest pack index on ties). One item per pack: item ``i`` in pack ``i`` (float32, the
    reference) or heaviest first (float64). Equal weights are taken in torch's sort order with
    ``torch_ties`` (:mod:`~moesim.policies.stdsort`), else lowest index first.

    When the ``K`` heaviest items weigh more than 0, the first round is known: item ``j`` of
    the order goes to pack ``j`` (every empty pack is lighter than every filled one); with two
    items per pack so is the second: the packs fill in ascending ``(sum, index)``. A heap runs
    any further rounds."""
    I = len(weight_I)
    if num_packs <= 0 or I % num_packs:
        raise MoesimError(f"{I} items do not split evenly into {num_packs} packs; make the "
                          "item count a multiple of the pack count")
    K, per_pack = num_packs, I // num_packs
    pack = np.empty(I, dtype=np.int64)
    rank = np.zeros(I, dtype=np.int64)
    if per_pack == 1 and precision == "float32":
        return np.arange(I, dtype=np.int64), rank
    w = np.asarray(weight_I, dtype=np.float64)
    order = sort_desc(w) if torch_ties else np.argsort(-w, kind="stable")
    if per_pack == 1:
        pack[order] = np.arange(I)
        return pack, rank
    if w[order[K - 1]] > 0:
        pack[order[:K]] = np.arange(K)
        if per_pack == 2:
            second = np.lexsort((np.arange(K), w[order[:K]]))
            pack[order[K:]] = second
            rank[order[K:]] = 1
            return pack, rank
        heap = list(zip(w[order[:K]].tolist(), range(K), strict=True))
        heapq.heapify(heap)
        count, rest = [1] * K, order[K:]
    else:
        heap, count, rest = [(0.0, k) for k in range(K)], [0] * K, order
    rnd = _round(precision)
    wl = w.tolist()
    pack_l, rank_l = pack.tolist(), rank.tolist()
    for i in rest.tolist():
        total, k = heapq.heappop(heap)
        pack_l[i], rank_l[i] = k, count[k]
        count[k] += 1
        if count[k] < per_pack:
            heapq.heappush(heap, (rnd(total + wl[i]), k))
    return np.array(pack_l, dtype=np.int64), np.array(rank_l, dtype=np.int64)


def _hierarchical_row(w: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                      num_gpus: int, precision: str, torch_ties: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer of the hierarchical algorithm: ``(phy2log_P, rank_P, logcnt_E)``."""
    dtype = np.float32 if precision == "float32" else np.float64
    E = w.shape[0]
    gsize, per_node_E, per_node_P = E // num_groups, E // num_nodes, num_phy // num_nodes
    gpus_per_node, per_gpu = num_gpus // num_nodes, num_phy // num_gpus
    group_w = w.astype(np.float64).reshape(num_groups, gsize).sum(axis=1).astype(dtype)
    g_pack, g_rank = pack_row(group_w, num_nodes, precision, torch_ties)
    log2mlog = ((g_pack * (num_groups // num_nodes) + g_rank) * gsize)[:, None] \
        + np.arange(gsize)
    log2mlog = log2mlog.ravel()
    mlog2log = np.empty(E, dtype=np.int64)
    mlog2log[log2mlog] = np.arange(E)
    mlog_w = w.astype(dtype)[mlog2log]
    phy2log = np.empty(num_phy, dtype=np.int64)
    rank = np.empty(num_phy, dtype=np.int64)
    mlogcnt = np.empty(E, dtype=np.int64)
    for n in range(num_nodes):
        node_w = mlog_w[n * per_node_E:(n + 1) * per_node_E]
        p2m, prank, cnt = replicate_row(node_w, per_node_P, precision)
        mlogcnt[n * per_node_E:(n + 1) * per_node_E] = cnt
        copy_w = (node_w.astype(np.float64) / cnt).astype(dtype)[p2m]
        pk, rk = pack_row(copy_w, gpus_per_node, precision, torch_ties)
        slot = pk * per_gpu + rk                             # node-local slot of each copy
        base = n * per_node_P
        phy2log[base + slot] = mlog2log[p2m + n * per_node_E]
        rank[base + slot] = prank
    return phy2log, rank, mlogcnt[log2mlog]


def rebalance_experts(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, precision: str = "float32", balancing: str = "auto",
                      torch_ties: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: ``(phy2log_LP, log2phy_LEK, logcnt_LE)`` with ``P = num_replicas``
    (slot ``p`` on GPU ``p // (P / num_gpus)``).

    ``torch_ties`` (default: on for float32) orders equal loads as torch's CPU sort does, which
    only changes which copy of an expert is called replica ``j`` in ``log2phy`` when the loads
    are otherwise tie-free; the policy switches it off (``phy2log`` is the same, and the
    Python introsort costs ~3 ms per 2048 slots)."""
    if precision not in PRECISIONS:
        raise MoesimError(f"eplb: precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    weight = np.asarray(weight_LE, dtype=np.float64)
    if weight.ndim != 2:
        raise MoesimError(f"eplb: weight must be [layers, experts], got shape {weight.shape}")
    L, E = weight.shape
    mode = balancing_mode(balancing, num_groups, num_nodes)
    check_inputs(E, num_replicas, num_groups, num_nodes, num_gpus, mode)
    groups, nodes = (num_groups, num_nodes) if mode == "hierarchical" else (1, 1)
    ties = precision == "float32" if torch_ties is None else bool(torch_ties)
    rows = [_hierarchical_row(weight[l], num_replicas, groups, nodes, num_gpus, precision, ties)
            for l in range(L)]
    phy2log = np.stack([r[0] for r in rows]) if rows else np.zeros((0, num_replicas), np.int64)
    rank = np.stack([r[1] for r in rows]) if rows else phy2log.copy()
    logcnt = np.stack([r[2] for r in rows]) if rows else np.zeros((0, E), np.int64)
    return phy2log, log2phy_of(phy2log, rank, logcnt, by_creation=precision == "float32"), \
        logcnt


def log2phy_of(phy2log_LP: np.ndarray, rank_LP: np.ndarray, logcnt_LE: np.ndarray,
               by_creation: bool) -> np.ndarray:
    """``log2phy[l, e, j]``: the slot of replica ``j`` of ``e`` (``-1`` padded) — ``j`` the
    creation rank (``by_creation``) or the ``j``-th slot in ascending order."""
    L, P = phy2log_LP.shape
    E = logcnt_LE.shape[1]
    K = max(int(logcnt_LE.max(initial=1)), 1)
    out = np.full((L, E, K), -1, dtype=np.int64)
    for l in range(L):
        if by_creation:
            j = rank_LP[l]
        else:
            order = np.argsort(phy2log_LP[l], kind="stable")
            starts = np.searchsorted(phy2log_LP[l][order], np.arange(E))
            j = np.empty(P, dtype=np.int64)
            j[order] = np.arange(P) - starts[phy2log_LP[l][order]]
        out[l, phy2log_LP[l], j] = np.arange(P)
    return out
