"""The original per-expert loop of ``split_tokens``: a naive reference for the fast version."""

from __future__ import annotations

import numpy as np


def _split_even(n: np.ndarray, k: int, rotate: np.ndarray) -> np.ndarray:
    """Split each ``n[i]`` over ``k`` parts; returns ``[len(n), k]`` with rotated remainders."""
    base = n // k
    rem = n - base * k
    j = np.arange(k)
    extra = ((j[None, :] - rotate[:, None]) % k) < rem[:, None]
    return base[:, None] + extra


def split_tokens_reference(counts_RE: np.ndarray, phy2log_P: np.ndarray, num_ranks: int,
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


