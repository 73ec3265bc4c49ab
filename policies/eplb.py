"""DeepSeek EPLB: redundant experts placed to balance per-GPU load.

DeepSeek-AI, "Expert Parallelism Load Balancer" (github.com/deepseek-ai/EPLB; DeepSeek-V3
technical report, arXiv 2412.19437, §3.4). ``rebalance_experts(weight[L, E], num_replicas,
num_groups, num_nodes, num_gpus)`` is rebuilt here from the published algorithm:

- **hierarchical** (``num_groups % num_nodes == 0``): pack the expert groups onto nodes with
  balanced packing (equal group count per node, heaviest group first into the lightest node);
  inside each node replicate its experts into the node's ``num_replicas / num_nodes`` slots
  (repeatedly copy the expert with the highest load per copy); pack the copies onto the node's
  GPUs with balanced packing (equal slot count per GPU). Replicas of a group never leave its node.
- **global** otherwise: the same with one group and one node.

EPLB ignores the previous placement: every re-plan may reshuffle every slot, which a training
user pays for as migration (``info["moved_slots_L"]``). EPLB was written for inference; as a
training policy it re-plans every ``interval`` iterations from the load summed over the last
``window`` iterations and keeps the previous placement in between. Its tokens split evenly over
an expert's replicas (routing ``even``); dropless by default as in DeepSeek-V3.

Lowering: static EP's grad sync and ZeRO-1 optimizer over each expert's replicas; a re-plan
moves each changed slot's weights plus its average optimizer share (see ``lower_relayout``).

Shape legend: ``L`` layers, ``E`` experts, ``P`` physical slots (= num_replicas), ``K`` nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_capacity_factor,
    check_choice,
    check_ints,
    check_slots_cover,
    register_policy,
)
from moesim.policies.primitives import (
    balanced_packing,
    moved_count_L,
    packs_to_slots,
    replicate_experts,
    slot_capacity,
    striped_slots,
    window_load_LE,
)
from moesim.specs import Cluster, ModelSpec


def _invert_LE(perm_LE: np.ndarray) -> np.ndarray:
    """Inverse of a permutation per row."""
    inv = np.empty_like(perm_LE)
    inv[np.arange(perm_LE.shape[0])[:, None], perm_LE] = np.arange(perm_LE.shape[1])
    return inv


def rebalance_hierarchical(weight_LE: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> np.ndarray:
    """EPLB's hierarchical algorithm: ``phy2log_LP`` (slot ``p`` on GPU ``p // (P/num_gpus)``).

    Requires ``E % num_groups == 0``, ``num_groups % num_nodes == 0``, ``num_gpus % num_nodes
    == 0`` and ``num_phy % num_gpus == 0``.
    """
    weight = np.asarray(weight_LE, dtype=np.float64)
    L, E = weight.shape
    group_size, experts_per_node = E // num_groups, E // num_nodes
    groups_per_node, phy_per_node = num_groups // num_nodes, num_phy // num_nodes
    # 1. groups → nodes. "meta-logical" ids number experts node-major.
    group_w = weight.reshape(L, num_groups, group_size).sum(axis=2)
    g_pack, g_rank = balanced_packing(group_w, num_nodes)
    meta_of_group = (g_pack * groups_per_node + g_rank) * group_size          # [L, groups]
    log2mlog = (meta_of_group[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _invert_LE(log2mlog)
    # 2. replicate within each node: rows are (layer, node)
    mlog_w = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes,
                                                                   experts_per_node)
    phy2mlog, _, mlogcnt = replicate_experts(mlog_w, phy_per_node)
    # 3. copies → GPUs of the node, by per-copy load
    copy_w = np.take_along_axis(mlog_w / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(copy_w, num_gpus // num_nodes)
    copy_of_slot = packs_to_slots(pack, rank)                 # node-local slot → copy index
    slot_mlog = np.take_along_axis(phy2mlog, copy_of_slot, axis=1)
    slot_mlog = slot_mlog.reshape(L, num_nodes, phy_per_node) \
        + (np.arange(num_nodes) * experts_per_node)[None, :, None]
    return np.take_along_axis(mlog2log, slot_mlog.reshape(L, num_phy), axis=1)


def rebalance_experts(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: ``(phy2log_LP, log2phy_LEK, logcnt_LE)`` with ``P = num_replicas``.

    Hierarchical when the groups divide over the nodes, global otherwise; the groups must
    divide the experts (as in EPLB).
    """
    L, E = np.shape(weight_LE)
    if num_replicas % num_gpus or num_replicas < E:
        raise MoesimError(f"eplb: {num_replicas} replicas must be a multiple of {num_gpus} GPUs "
                          f"and at least {E} experts")
    if num_groups < 1 or E % num_groups:
        raise MoesimError(f"eplb: num_groups={num_groups} must divide the {E} experts; pick a "
                          "divisor of the expert count (1 = no groups)")
    hierarchical = num_groups % num_nodes == 0 and num_gpus % num_nodes == 0
    if hierarchical:
        phy2log = rebalance_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log = rebalance_hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
    placement = Placement(phy2log, num_gpus, num_replicas // num_gpus, E)
    return phy2log, placement.log2phy_LEK, placement.logcnt_LE


@register_policy("eplb")
class EPLB(Policy):
    """Re-plan every ``interval`` iterations with DeepSeek's balancer; keep the plan between."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank``: total expert slots per GPU; when ``None`` it is
        ``ceil(E/G) + num_redundant_per_rank``. ``num_groups``: expert groups for the
        hierarchical mode (DeepSeek-V3: 8 groups of 32); 1 (the default, for traces without
        group-limited routing) means global balancing unless the cluster is one node.
        ``window``: iterations of load summed per plan. ``interval``: re-plan every this many
        iterations. ``capacity_factor``: ``None`` = dropless (DeepSeek-V3). ``routing``:
        ``even`` splits an expert's tokens over all its replicas (default); ``node_first``
        keeps them on the source's node when it holds a replica (what a multi-node deployment
        does to keep the all-to-all off the inter-node link)."""

        num_redundant_per_rank: int = 1
        slots_per_rank: int | None = None
        num_groups: int = 1
        window: int = 10
        interval: int = 10
        capacity_factor: float | None = None
        routing: str = "even"

        def __post_init__(self) -> None:
            check_choice("eplb", "routing", self.routing, ("even", "node_first", "local_first"))
            check_ints("eplb", self, {"window": 1, "interval": 1, "num_groups": 1,
                                      "num_redundant_per_rank": 0, "slots_per_rank": 1},
                       optional=("slots_per_rank",))
            check_capacity_factor("eplb", self.capacity_factor)

    def slots(self, model: ModelSpec, cluster: Cluster) -> int:
        """Slots per GPU under this config."""
        if self.config.slots_per_rank is not None:
            return self.config.slots_per_rank
        return -(-model.num_experts // cluster.world_size) + self.config.num_redundant_per_rank

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Re-plan at multiples of ``interval`` (and whenever no usable previous plan exists)."""
        start = time.perf_counter()
        S, G, E, L = self.slots(model, cluster), cluster.world_size, model.num_experts, \
            model.num_layers
        check_slots_cover("eplb", S, G, E)
        prev = history.previous.placement if history.previous else None
        usable = prev is not None and prev.phy2log_LP.shape == (L, S * G)
        replan = not usable or history.iteration % self.config.interval == 0
        if replan:
            weight_LE = window_load_LE(history, self.config.window, L, E)
            if weight_LE.any():
                phy2log_LP, _, _ = rebalance_experts(weight_LE, S * G, self.config.num_groups,
                                                     cluster.num_nodes, G)
            else:   # no load seen yet: replicas striped over ranks (EPLB on equal weights
                # would stack an expert's copies on one GPU by its tie-breaking)
                phy2log_LP = np.tile(striped_slots(E, S * G), (L, 1))
        else:
            phy2log_LP = prev.phy2log_LP
        moved_L = moved_count_L(phy2log_LP, prev.phy2log_LP if usable else None)
        info = {"replanned": bool(replan), "moved_slots_L": moved_L.tolist()}
        cap = slot_capacity(self.config.capacity_factor, model.tokens_per_rank, model.top_k,
                            S * G)
        return Decision(Placement(phy2log_LP, G, S, E), routing=self.config.routing,
                        slot_capacity=cap,
                        planner_time_s=time.perf_counter() - start, info=info)

    # -- lowering hooks ---------------------------------------------------------------------
    def lower_relayout(self, ctx) -> list[int]:
        """A re-plan moves every changed slot's weights plus the ZeRO-1 optimizer share its
        new holder owns, charged at the average share ``P·b_o·E/(G·S)`` per slot (replica
        counts change too, so the state is re-sharded rather than moved whole). Grad sync and
        optimizer are static EP's (ZeRO-1 over each expert's replicas)."""
        pl = ctx.placement
        share = pl.num_experts / pl.num_slots
        return ctx.emit_relayout_sendrecv(
            extra_bytes_per_expert=ctx.model.params_per_expert * ctx.model.bytes_optim * share)
