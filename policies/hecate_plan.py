"""Hecate's per-layer planning steps (arXiv 2502.02581): heterogeneous sharding (Algorithm 2),
sparse materialisation (Algorithm 1) and the slot row they make. The policy, its re-shard
schedule and its lowering are in :mod:`moesim.policies.hecate`, which re-exports these.

Shape legend: ``E`` experts, ``G`` devices, ``N`` nodes, ``O`` owned slots per device, ``m``
extra slots per device, ``J`` materialised copies.
"""

from __future__ import annotations

import heapq

import numpy as np

from moesim.errors import MoesimError
from moesim.policies.greedy import greedy_place, precise_replicas
from moesim.policies.primitives import greedy_pack_fixed


def shard_owners(load_E: np.ndarray, num_nodes: int, gpus_per_node: int,
                 owned_per_rank: int, overlappable: int = 0) -> np.ndarray:
    """Heterogeneous sharding (paper Algorithm 2, one layer): owner rank of each expert, ``[E]``.

    The ``overlappable`` hottest experts are set aside; the others, heaviest first, go into the
    lightest node with room (``gpus_per_node · O`` experts), then, within each node, into the
    lightest device with room (``O`` experts); the set-aside experts fill the slots left
    (lightest first: they count as load 0, being materialised where their tokens are).

    The device step walks all experts once in the global heaviest-first order (restricted to a
    node it is that node's own order), with one heap of ``(load, device)`` per node.
    """
    load = np.asarray(load_E, dtype=np.float64).copy()
    load[np.argsort(-load, kind="stable")[:max(overlappable, 0)]] = 0.0
    node_E = greedy_pack_fixed(load, num_nodes, np.full(num_nodes, gpus_per_node * owned_per_rank))
    heaps = [[(0.0, k) for k in range(gpus_per_node)] if owned_per_rank > 0 else []
             for _ in range(num_nodes)]
    room = [[owned_per_rank] * gpus_per_node for _ in range(num_nodes)]
    owners = np.empty(load.shape[0], dtype=np.int64)
    load_l, node_l = load.tolist(), node_E.tolist()
    for e in np.argsort(-load, kind="stable").tolist():
        n = node_l[e]
        heap, cap = heaps[n], room[n]
        if not heap:
            raise MoesimError("not enough free slots for the items to place")
        w, k = heapq.heappop(heap)
        owners[e] = n * gpus_per_node + k
        cap[k] -= 1
        if cap[k] > 0:
            heapq.heappush(heap, (w + load_l[e], k))
    return owners


def owned_copies(owners_E: np.ndarray, num_ranks: int) -> np.ndarray:
    """One copy of each expert on its owner: ``[G, E]``."""
    out = np.zeros((num_ranks, owners_E.shape[0]), dtype=np.int64)
    out[owners_E, np.arange(owners_E.shape[0])] = 1
    return out


def materialise(load_E: np.ndarray, owners_E: np.ndarray, t: int, extra_slots: int,
                gpus_per_node: int, num_ranks: int) -> tuple[np.ndarray, str]:
    """Paper Algorithm 1: extra copies ``[G, E]`` (owners excluded) and the branch that made
    them (``none``, ``top_t`` or ``proportional``).

    ``t ← min(t, E)``, ``m ← min(m, t)``; ``t ≤ m``: the ``t`` hottest experts on every device
    (so ``t = 0`` materialises nothing); else the ``G·m`` extra slots to the ``t`` hottest
    experts in proportion to load, ≤ 1 copy per device, spread over nodes.
    """
    G, E = num_ranks, load_E.shape[0]
    t = min(max(t, 0), E)
    m = min(extra_slots, t)
    extra = np.zeros((G, E), dtype=np.int64)
    if G == 1 or m == 0:
        return extra, "none"
    hot = np.argsort(-load_E, kind="stable")[:t]
    if t <= m:
        extra[:, hot] = 1
        extra[owners_E[hot], hot] = 0
        return extra, "top_t"
    r_E = np.ones(E, dtype=np.int64)
    r_E[hot] = precise_replicas(load_E[hot], t + G * m, 1, G)
    gpu_load = np.bincount(owners_E, weights=load_E / r_E, minlength=G)
    cols = np.sort(hot)                     # only the hot experts get copies: those columns
    owned = np.zeros((G, len(cols)), dtype=np.int64)
    owned[owners_E[cols], np.arange(len(cols))] = 1
    copies = greedy_place(r_E[cols] - 1, load_E[cols], gpus_per_node, np.full(G, m), owned,
                          gpu_load, allow_duplicates=False, skip_unplaceable=True)
    extra[:, cols] = copies - owned
    return extra, "proportional"


def slot_row(owners_E: np.ndarray, extra_GE: np.ndarray, owned_per_rank: int,
             extra_slots: int) -> np.ndarray:
    """Slot row ``[G·(O + m)]``: owned experts then materialised ones per device (each part
    in expert order), ``-1`` pad."""
    G, E = extra_GE.shape
    S = owned_per_rank + extra_slots
    out = np.full((G, S), -1, dtype=np.int64)
    owners = np.asarray(owners_E, dtype=np.int64)
    expert = np.argsort(owners, kind="stable")            # rank-major, experts ascending
    rank = owners[expert]
    _fill(out, rank, expert, 0, owned_per_rank)
    cols = np.flatnonzero(extra_GE.any(axis=0))         # the few materialised experts
    rank, j = np.nonzero(extra_GE[:, cols])
    _fill(out, rank, cols[j], owned_per_rank, extra_slots)
    return out.ravel()


def _fill(out_GS: np.ndarray, rank: np.ndarray, expert: np.ndarray, offset: int,
          width: int) -> None:
    """Write ``expert`` (grouped by ascending ``rank``) into consecutive slots from
    ``offset`` of each rank's row."""
    pos = np.arange(len(rank)) - np.searchsorted(rank, rank)
    assert (pos < width).all(), "more experts than slots on a device"
    out_GS[rank, offset + pos] = expert
