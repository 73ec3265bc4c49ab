"""Routing in blocks: when every source sends only to slots of its own group of consecutive
ranks (``ep_group`` routing, static EP with EDP replicas), route in the group's coordinates.

Shape legend: ``M`` passes, ``L`` layers, ``R`` source ranks, ``E`` experts, ``K`` ranks per
block (the EP size), ``S`` slots per rank, ``Q = K·S`` slots of one block, ``N = R / K``
blocks.

Under ``ep_group`` source ``r`` uses replica ``(r // K) mod cnt[e]`` of expert ``e``
(:mod:`moesim.routing`). When that replica sits on a rank of ``r``'s own block for every layer,
group and expert, the ``[R, P]`` split (``P = R·S`` slots) is zero outside the blocks, and
:class:`BlockRoutePlan` returns only the in-block part ``[M, L, R, Q]``: entry ``[…, r, q]``
is what ``r`` sends slot ``(r // K)·Q + q``. Its cost grows with the trace (``R·E``), not with
``R·P``. Static EP's contiguous placement is the identity inside each block (local slot ``q``
holds expert ``q``), so its split is the trace's counts themselves, not a copy.

:func:`plan_routes` picks this plan when it applies and :class:`~moesim.routing.RoutePlan`
otherwise; both route to the same tokens (the dense ``[R, P]`` entries of a block plan's
output are its blocks; ``tests/sim/test_routing_blocks.py`` checks this against the dense
plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.placement import Placement
from moesim.routing import RoutePlan, apply_capacity


@dataclass(frozen=True)
class BlockRoutePlan:
    """``local_LNE[l, b, e]``: block ``b``'s slot (``0 … Q−1``) for expert ``e``; None when
    it is the identity (``Q = E`` and slot ``q`` holds expert ``q`` in every block)."""

    block: int
    slots_per_rank: int
    local_LNE: np.ndarray | None

    @property
    def identity(self) -> bool:
        return self.local_LNE is None

    def split(self, counts_MLRE: np.ndarray) -> np.ndarray:
        """In-block tokens each source sends each slot of its block: ``[M, L, R, Q]`` (the
        counts' own dtype; the counts themselves for an identity plan)."""
        counts = np.asarray(counts_MLRE)
        if self.local_LNE is None:
            return counts
        M, L, R, E = counts.shape
        K, Q = self.block, self.block * self.slots_per_rank
        out = np.zeros((M, L, R, Q), dtype=counts.dtype)
        for b in range(R // K):
            rows = slice(b * K, (b + 1) * K)
            idx = np.broadcast_to(self.local_LNE[None, :, b, None, :], (M, L, K, E))
            np.put_along_axis(out[:, :, rows], idx, counts[:, :, rows], axis=3)
        return out

    def route(self, counts_MLRE: np.ndarray, slot_capacity: int | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Split and clip: ``(kept_MLRQ, dropped_MLRQ)`` in block coordinates."""
        return apply_capacity(self.split(counts_MLRE), slot_capacity)


def plan_routes(placement: Placement, rule: str, gpus_per_node: int,
                ep_size: int | None = None) -> RoutePlan | BlockRoutePlan:
    """A :class:`BlockRoutePlan` when the routing stays inside blocks of ``ep_size`` ranks
    (module docstring), else the dense :class:`~moesim.routing.RoutePlan`."""
    plan = block_plan(placement, rule, ep_size)
    if plan is not None:
        return plan
    return RoutePlan.build(placement, rule, gpus_per_node, ep_size)


def block_plan(placement: Placement, rule: str, ep_size: int | None) -> BlockRoutePlan | None:
    """The block plan of ``ep_group`` routing, or None when some source would leave its
    block (or an expert has no replica)."""
    R, S, E = placement.num_ranks, placement.slots_per_rank, placement.num_experts
    if rule != "ep_group" or not ep_size or R % ep_size:
        return None
    cnt_LE = placement.logcnt_LE
    if (cnt_LE == 0).any():
        return None
    K, N, L = ep_size, R // ep_size, placement.num_layers
    k_LNE = np.arange(N)[None, :, None] % cnt_LE[:, None, :]
    slot_LNE = placement.log2phy_LEK[np.arange(L)[:, None, None], np.arange(E)[None, None, :],
                                     k_LNE]
    local_LNE = slot_LNE - (np.arange(N) * K * S)[None, :, None]
    if ((local_LNE < 0) | (local_LNE >= K * S)).any():
        return None
    if K * S == E and (local_LNE == np.arange(E)).all():
        return BlockRoutePlan(block=K, slots_per_rank=S, local_LNE=None)
    return BlockRoutePlan(block=K, slots_per_rank=S, local_LNE=local_LNE)


def block_column_sums(x_MLRQ: np.ndarray, block: int) -> np.ndarray:
    """Per-slot sums over each block's sources, ``[M, L, N·Q]`` int64 (``block`` 0: the
    whole ``R`` axis is one block)."""
    M, L, R, Q = x_MLRQ.shape
    K = block or R
    return x_MLRQ.reshape(M, L, R // K, K, Q).sum(axis=3, dtype=np.int64).reshape(M, L, -1)
