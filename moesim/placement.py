"""Where each expert lives: physical slots per layer, in DeepSeek EPLB's vocabulary.

Shape legend: ``L`` MoE layers, ``E`` logical experts, ``G`` ranks (GPUs), ``S`` slots per rank,
``P = G·S`` physical slots, ``K`` the most replicas any expert has, ``R`` source ranks (= G).

- ``phy2log_LP[l, p]``: the logical expert held by physical slot ``p`` of layer ``l``; slot ``p``
  lives on rank ``p // S``. ``-1`` marks an empty slot.
- ``logcnt_LE[l, e]``: replicas of expert ``e``.
- ``log2phy_LEK[l, e, j]``: the ``j``-th slot holding ``e`` (ascending), ``-1`` padded.

A :class:`Decision` is what a policy returns for one iteration: the placement, the rule that
splits a source rank's tokens over an expert's replicas, the per-(source, slot) capacity, and the
planner's own wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.errors import MoesimError

ROUTING_RULES = ("ep_group", "even", "local_first", "node_first")


@dataclass(frozen=True)
class Placement:
    """Physical expert slots of every layer; immutable; derived maps are computed once."""

    phy2log_LP: np.ndarray
    num_ranks: int
    slots_per_rank: int
    num_experts: int

    def __post_init__(self) -> None:
        arr = np.asarray(self.phy2log_LP, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != self.num_ranks * self.slots_per_rank:
            want = self.num_ranks * self.slots_per_rank
            raise MoesimError(f"phy2log must be [layers, ranks*slots] = [L, {want}], "
                              f"got shape {arr.shape}")
        if arr.size and (arr.max() >= self.num_experts or arr.min() < -1):
            raise MoesimError(f"phy2log holds expert ids outside [-1, {self.num_experts})")
        arr.setflags(write=False)
        object.__setattr__(self, "phy2log_LP", arr)

    @property
    def num_layers(self) -> int:
        return self.phy2log_LP.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log_LP.shape[1]

    @property
    def rank_of_slot_P(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.slots_per_rank

    @property
    def logcnt_LE(self) -> np.ndarray:
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for l in range(self.num_layers):
            row = self.phy2log_LP[l]
            np.add.at(out[l], row[row >= 0], 1)
        return out

    @property
    def log2phy_LEK(self) -> np.ndarray:
        cnt = self.logcnt_LE
        k = max(int(cnt.max(initial=0)), 1)
        out = np.full((self.num_layers, self.num_experts, k), -1, dtype=np.int64)
        for l in range(self.num_layers):
            order = np.argsort(self.phy2log_LP[l], kind="stable")
            experts = self.phy2log_LP[l][order]
            keep = experts >= 0
            order, experts = order[keep], experts[keep]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            j = np.arange(len(experts)) - starts[experts]
            out[l, experts, j] = order
        return out

    def layer(self, l: int) -> np.ndarray:
        return self.phy2log_LP[l]

    @classmethod
    def from_layers(cls, rows: list[np.ndarray] | np.ndarray, num_ranks: int,
                    slots_per_rank: int, num_experts: int) -> Placement:
        return cls(np.asarray(rows, dtype=np.int64), num_ranks, slots_per_rank, num_experts)

    def moved_slots_LP(self, previous: Placement | None) -> np.ndarray:
        """Boolean mask of slots whose expert changed since ``previous`` (all, if none)."""
        if previous is None:
            return self.phy2log_LP >= 0
        if previous.phy2log_LP.shape != self.phy2log_LP.shape:
            return self.phy2log_LP >= 0
        return (self.phy2log_LP != previous.phy2log_LP) & (self.phy2log_LP >= 0)


@dataclass(frozen=True)
class Decision:
    """One iteration's plan from a policy.

    ``routing`` names how a source rank's tokens for expert ``e`` split over ``e``'s replicas
    (see :func:`moesim.routing.split_tokens`). ``slot_capacity`` caps the tokens one source rank
    may send one slot per pass (``None``: dropless). ``info`` carries policy-specific facts the
    policy's lowering needs (e.g. Hecate's owners, SwiftMoE's optimizer-shard homes); it must be
    JSON-serialisable numbers, lists or arrays.
    """

    placement: Placement
    routing: str = "even"
    slot_capacity: int | None = None
    planner_time_s: float = 0.0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_RULES:
            raise MoesimError(f"unknown routing rule {self.routing!r}; use one of {ROUTING_RULES}")
        if self.slot_capacity is not None and self.slot_capacity < 0:
            raise MoesimError("slot_capacity must be >= 0 or None (dropless)")
