"""How one layer's tokens reach physical slots: replica split rules and capacity drops.

Both backends call these, so the simulator's byte counts and the executor's forced routing agree
token for token. Shape legend: ``R`` source ranks, ``E`` logical experts, ``P`` physical slots,
``G`` ranks holding slots (= R).

Rules (``Decision.routing``):

- ``ep_group`` — static EP with expert-data-parallel replicas: source rank ``i`` uses the replica
  on the rank of its own EP group (``rank // EP``), i.e. the replica whose index equals
  ``i``'s EDP group; with a single replica this is the only choice.
- ``even`` — split evenly over all replicas (SwiftMoE, FlexMoE, EPLB).
- ``local_first`` — replicas on the source's own rank if any, else the same node, else all
  (Hecate's dispatch).
- ``node_first`` — replicas on the source's own node if any, else all (LAER-MoE's routing).

An even split of ``n`` tokens over ``k`` replicas gives ``n // k`` to each and the remainder, one
each, to the first replicas in a rotation that starts at the source rank, so no replica is
systematically favoured.

Capacity (``Decision.slot_capacity``) is applied per (source rank, slot) — the rule of DeepSpeed
and Megatron, whose gates drop over-capacity tokens locally before the dispatch all-to-all.
"""

from __future__ import annotations

import numpy as np

from moesim.placement import Placement


def _split_even(n: np.ndarray, k: int, rotate: np.ndarray) -> np.ndarray:
    """Split each ``n[i]`` over ``k`` parts; returns ``[len(n), k]`` with rotated remainders."""
    base = n // k
    rem = n - base * k
    j = np.arange(k)
    extra = ((j[None, :] - rotate[:, None]) % k) < rem[:, None]
    return base[:, None] + extra


def split_tokens(counts_RE: np.ndarray, phy2log_P: np.ndarray, num_ranks: int,
                 slots_per_rank: int, rule: str, gpus_per_node: int,
                 ep_size: int | None = None) -> np.ndarray:
    """Tokens each source rank sends each physical slot: ``[R, P]`` int64.

    ``counts_RE`` are token assignments (top-k already expanded) of one layer and one pass.
    ``ep_size`` is needed by ``ep_group`` only (ranks per EP group). Every token is placed:
    ``out.sum(1) == counts_RE.sum(1)`` as long as every expert with tokens has a replica.
    """
    counts_RE = np.asarray(counts_RE, dtype=np.int64)
    R, E = counts_RE.shape
    P = phy2log_P.shape[0]
    out = np.zeros((R, P), dtype=np.int64)
    slot_rank = np.arange(P) // slots_per_rank
    slot_node = slot_rank // gpus_per_node
    src = np.arange(R)
    src_node = src // gpus_per_node
    for e in range(E):
        slots = np.flatnonzero(phy2log_P == e)
        n = counts_RE[:, e]
        if len(slots) == 0:
            if n.any():
                raise ValueError(f"expert {e} has tokens but no replica")
            continue
        if len(slots) == 1:
            out[:, slots[0]] += n
            continue
        if rule == "even":
            out[:, slots] += _split_even(n, len(slots), src)
            continue
        if rule == "ep_group":
            assert ep_size is not None, "ep_group routing needs ep_size"
            group = src // ep_size
            out[src, slots[group % len(slots)]] += n
            continue
        # local_first / node_first: choose each source's candidate set, then split evenly
        same_rank = slot_rank[None, :] == src[:, None] if rule == "local_first" else None
        for i in range(R):
            if n[i] == 0:
                continue
            cand = slots
            if same_rank is not None and same_rank[i, slots].any():
                cand = slots[same_rank[i, slots]]
            elif (slot_node[slots] == src_node[i]).any():
                cand = slots[slot_node[slots] == src_node[i]]
            out[i, cand] += _split_even(n[i:i + 1], len(cand), src[i:i + 1])[0]
    return out


def apply_capacity(tokens_RP: np.ndarray, slot_capacity: int | None) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Clip tokens per (source, slot) at capacity: returns ``(kept_RP, dropped_RP)``."""
    if slot_capacity is None:
        return tokens_RP, np.zeros_like(tokens_RP)
    kept = np.minimum(tokens_RP, slot_capacity)
    return kept, tokens_RP - kept


def rank_matrix(tokens_RP: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Tokens from each source rank to each destination rank: ``[R, G]``."""
    R, P = tokens_RP.shape
    return tokens_RP.reshape(R, P // slots_per_rank, slots_per_rank).sum(axis=2)


def route_layer(counts_RE: np.ndarray, placement: Placement, layer: int, rule: str,
                slot_capacity: int | None, gpus_per_node: int,
                ep_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split and clip one layer's tokens: ``(kept_RP, dropped_RP)``."""
    tokens = split_tokens(counts_RE, placement.layer(layer), placement.num_ranks,
                          placement.slots_per_rank, rule, gpus_per_node, ep_size)
    return apply_capacity(tokens, slot_capacity)
