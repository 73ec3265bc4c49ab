"""How one layer's tokens reach physical slots: replica split rules and capacity drops.

Both backends call these, so the simulator's byte counts and the executor's forced routing agree
token for token. Shape legend: ``R`` source ranks, ``E`` logical experts, ``P`` physical slots,
``G`` ranks holding slots (= R), ``L`` layers, ``M`` passes (micro-batches) routed together.

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

Speed: every rule is one closed form over ``[R, P]`` arrays. For source ``r`` and slot ``p``
holding expert ``x[p]``, let ``cand[r, p]`` say whether ``p`` is one of the replicas ``r`` may
use, ``c[r, p]`` how many such replicas ``x[p]`` has for ``r``, and ``j[r, p]`` the index of
``p`` among them (ascending slot order). Then with ``n = counts[r, x[p]]``::

    tokens[r, p] = cand · (n // c + ((j − r) mod c < n mod c))

:class:`RoutePlan` precomputes ``x, cand, c, j`` once per placement (per decision, not per
pass) and routes all layers and micro-batches of an iteration in a few array operations; when
every (source, expert) pair has exactly one candidate it is a pure gather, and when
``phy2log`` is the identity (static EP, one slot per expert) routing is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.placement import Placement


@dataclass(frozen=True)
class RoutePlan:
    """Per-placement routing structures for every layer (see the module docstring).

    ``x_LP`` experts of slots (empty slots clamped to 0 and masked out by ``cand``);
    ``cand_LRP`` bool, ``c_LRP`` and ``j_LRP`` int64 (each one's ``R`` axis has length 1 when it
    does not depend on the source; they broadcast against each other). ``single``: every
    (source, expert) has exactly one candidate, and ``slot_LRE`` then names it (when every
    expert has a replica);
    ``identity``: additionally ``x`` is ``arange(E)`` in every layer and every slot is used.
    """

    x_LP: np.ndarray
    cand_LRP: np.ndarray
    c_LRP: np.ndarray
    j_LRP: np.ndarray
    slots_per_rank: int
    single: bool
    identity: bool
    slot_LRE: np.ndarray | None = None

    @classmethod
    def build(cls, placement: Placement, rule: str, gpus_per_node: int,
              ep_size: int | None = None) -> RoutePlan:
        """Precompute the plan for ``placement`` under ``rule``."""
        per_layer = [_layer_plan(placement.phy2log_LP[l], placement.slots_per_rank,
                                 placement.num_experts, rule, gpus_per_node, ep_size,
                                 placement.num_ranks)
                     for l in range(placement.num_layers)]
        cand, c, j = (_stack_bcast([p[i] for p in per_layer]) for i in range(3))  # each alone
        x = np.maximum(placement.phy2log_LP, 0)
        single = bool(np.all((c == 1) | ~cand))
        identity = (single and x.shape[1] == placement.num_experts and bool(cand.all())
                    and bool((x == np.arange(x.shape[1])).all()))
        one_each = bool((placement.logcnt_LE <= 1).all())
        use_slot = single and not identity and (rule == "ep_group" or one_each)
        slot = _slot_of(placement, rule, ep_size) if use_slot else None
        return cls(x, cand, c, j, placement.slots_per_rank, single, identity, slot)

    def split(self, counts_MLRE: np.ndarray) -> np.ndarray:
        """Tokens each source sends each slot: ``[M, L, R, P]`` int64 (before capacity)."""
        counts = np.asarray(counts_MLRE, dtype=np.int64)
        if self.identity:
            return counts
        if self.slot_LRE is not None:  # one slot per (source, expert): a scatter
            out = np.zeros(counts.shape[:3] + (self.x_LP.shape[1],), dtype=np.int64)
            idx = np.broadcast_to(self.slot_LRE[None], counts.shape)
            np.put_along_axis(out, idx, counts, axis=3)
            return out
        R = counts.shape[2]
        idx = np.broadcast_to(self.x_LP[None, :, None, :],
                              counts.shape[:3] + (self.x_LP.shape[1],))
        n = np.take_along_axis(counts, idx, axis=3)
        if self.single:
            return n * self.cand_LRP[None]
        c = np.maximum(self.c_LRP, 1)[None]
        r = np.arange(R)[None, None, :, None]
        extra = ((self.j_LRP[None] - r) % c) < (n % c)
        return (n // c + extra) * self.cand_LRP[None]

    def route(self, counts_MLRE: np.ndarray, slot_capacity: int | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Split and clip: ``(kept_MLRP, dropped_MLRP)``."""
        return apply_capacity(self.split(counts_MLRE), slot_capacity)


def _slot_of(placement: Placement, rule: str, ep_size: int | None) -> np.ndarray | None:
    """``slot[l, r, e]``: the one slot source ``r`` uses for expert ``e`` in a single-candidate
    plan (``ep_group``, or one replica per expert) — ``log2phy[l, e, (r // EP) mod cnt]``; None
    when some expert has no replica (then the gather path handles it)."""
    cnt_LE = placement.logcnt_LE
    if (cnt_LE == 0).any():
        return None
    log2phy_LEK = placement.log2phy_LEK
    src = np.arange(placement.num_ranks)
    group_R = src // ep_size if rule == "ep_group" and ep_size else np.zeros_like(src)
    k_LRE = group_R[None, :, None] % cnt_LE[:, None, :]
    L, E = cnt_LE.shape
    return log2phy_LEK[np.arange(L)[:, None, None], np.arange(E)[None, None, :], k_LRE]


def _stack_bcast(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack per-layer ``[1 or R, P]`` arrays into ``[L, R', P]`` (R' = 1 if all are 1)."""
    rows = max(a.shape[0] for a in arrays)
    return np.stack([np.broadcast_to(a, (rows, a.shape[1])) for a in arrays])


def _layer_plan(phy2log_P: np.ndarray, slots_per_rank: int, num_experts: int, rule: str,
                gpus_per_node: int, ep_size: int | None, num_ranks: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cand, c, j)`` of one layer, each ``[1 or R, P]`` (see the module docstring)."""
    row = np.asarray(phy2log_P, dtype=np.int64)
    valid = row >= 0
    x = np.maximum(row, 0)
    cnt_E = np.bincount(x[valid], minlength=num_experts)
    j_P = _replica_index(row, num_experts)
    if rule == "even" or (cnt_E[x[valid]] <= 1).all():
        return valid[None], np.where(valid, cnt_E[x], 0)[None], j_P[None]
    src = np.arange(num_ranks)
    if rule == "ep_group":  # exactly one candidate per (source, expert): c = 1, j = 0
        assert ep_size is not None, "ep_group routing needs ep_size"
        group = (src // ep_size)[:, None]
        cand = valid[None] & (j_P[None] == group % np.maximum(cnt_E[x], 1)[None])
        return cand, valid[None].astype(np.int64), np.zeros((1, len(row)), dtype=np.int64)
    else:
        cand = _nearest_candidates(row, valid, x, slots_per_rank, num_experts, rule,
                                   gpus_per_node, src)
    return cand, *_count_and_index(cand, x, num_experts)


def _replica_index(row_P: np.ndarray, num_experts: int) -> np.ndarray:
    """Index of each slot among its expert's slots (ascending), ``[P]`` (0 for empty)."""
    order = np.argsort(row_P, kind="stable")
    experts = row_P[order]
    starts = np.searchsorted(experts, np.maximum(experts, 0))
    out = np.zeros(len(row_P), dtype=np.int64)
    out[order] = np.arange(len(row_P)) - starts
    return np.where(row_P >= 0, out, 0)


def _nearest_candidates(row: np.ndarray, valid: np.ndarray, x: np.ndarray, slots_per_rank: int,
                        num_experts: int, rule: str, gpus_per_node: int,
                        src: np.ndarray) -> np.ndarray:
    """``cand[R, P]`` of ``local_first`` (rank, else node, else all) and ``node_first``."""
    slot_rank = np.arange(len(row)) // slots_per_rank
    slot_node = slot_rank // gpus_per_node
    src_node = src // gpus_per_node
    num_nodes = int(max(slot_node.max(initial=0), src_node.max(initial=0))) + 1
    on_node_NE = np.zeros((num_nodes, num_experts), dtype=bool)
    on_node_NE[slot_node[valid], x[valid]] = True
    same_node = slot_node[None, :] == src_node[:, None]
    has_node = on_node_NE[src_node][:, x]
    cand = np.where(has_node, same_node, True)
    if rule == "local_first":
        on_rank_GE = np.zeros((len(src), num_experts), dtype=bool)
        on_rank_GE[slot_rank[valid], x[valid]] = True
        has_rank = on_rank_GE[:, x]
        cand = np.where(has_rank, slot_rank[None, :] == src[:, None], cand)
    return cand & valid[None]


def _count_and_index(cand_RP: np.ndarray, x_P: np.ndarray, num_experts: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Candidates per (source, expert of slot) ``c[R, P]`` and each slot's index among them."""
    order = np.argsort(x_P, kind="stable")
    cs = np.cumsum(cand_RP[:, order], axis=1)
    excl = cs - cand_RP[:, order]
    xs = x_P[order]
    first = np.searchsorted(xs, xs)
    last = np.searchsorted(xs, xs, side="right") - 1
    j_sorted = excl - excl[:, first]
    c_sorted = cs[:, last] - excl[:, first]
    j = np.empty_like(j_sorted)
    c = np.empty_like(c_sorted)
    j[:, order] = j_sorted
    c[:, order] = c_sorted
    return c, j


def split_tokens(counts_RE: np.ndarray, phy2log_P: np.ndarray, num_ranks: int,
                 slots_per_rank: int, rule: str, gpus_per_node: int,
                 ep_size: int | None = None) -> np.ndarray:
    """Tokens each source rank sends each physical slot: ``[R, P]`` int64.

    ``counts_RE`` are token assignments (top-k already expanded) of one layer and one pass.
    ``ep_size`` is needed by ``ep_group`` only (ranks per EP group). Every token is placed:
    ``out.sum(1) == counts_RE.sum(1)`` as long as every expert with tokens has a replica.
    """
    counts_RE = np.asarray(counts_RE, dtype=np.int64)
    row = np.asarray(phy2log_P, dtype=np.int64)
    present = np.bincount(row[row >= 0], minlength=counts_RE.shape[1]) > 0
    missing = np.flatnonzero(~present & (counts_RE.sum(0) > 0))
    if len(missing):
        raise ValueError(f"expert {int(missing[0])} has tokens but no replica")
    placement = Placement(row[None], num_ranks, slots_per_rank, counts_RE.shape[1])
    plan = RoutePlan.build(placement, rule, gpus_per_node, ep_size)
    return np.array(plan.split(counts_RE[None, None])[0, 0])


def apply_capacity(tokens_RP: np.ndarray, slot_capacity: int | None) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Clip tokens per (source, slot) at capacity: returns ``(kept_RP, dropped_RP)`` (any
    leading axes are kept)."""
    if slot_capacity is None:  # a read-only view of zeros: no memory, no time
        return tokens_RP, np.broadcast_to(np.zeros((), dtype=tokens_RP.dtype), tokens_RP.shape)
    kept = np.minimum(tokens_RP, slot_capacity)
    return kept, tokens_RP - kept


def rank_matrix(tokens_RP: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Tokens from each source rank to each destination rank: ``[..., R, G]``."""
    *lead, R, P = tokens_RP.shape
    S = slots_per_rank
    if S == 1:
        return tokens_RP
    if tokens_RP.dtype.kind in "iub":  # S strided adds into int64: exact, and several
        out = tokens_RP[..., 0::S].astype(np.int64)  # times faster than a reduction over
        for s in range(1, S):                        # a short last axis
            out += tokens_RP[..., s::S]
        return out
    return tokens_RP.reshape(*lead, R, P // S, S).sum(axis=-1)


def route_layer(counts_RE: np.ndarray, placement: Placement, layer: int, rule: str,
                slot_capacity: int | None, gpus_per_node: int,
                ep_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split and clip one layer's tokens: ``(kept_RP, dropped_RP)``."""
    tokens = split_tokens(counts_RE, placement.layer(layer), placement.num_ranks,
                          placement.slots_per_rank, rule, gpus_per_node, ep_size)
    return apply_capacity(tokens, slot_capacity)
