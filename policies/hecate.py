"""Hecate: Fully Sharded Sparse Data Parallelism (FSSDP) with sparse materialisation.

Qing et al., "Hecate: Unlocking Efficient Sparse Model Training via Fully Sharded Sparse Data
Parallelism" (arXiv 2502.02581). Each layer's experts (parameters + optimizer state) are sharded
at expert granularity: exactly one **owner** device per expert. Every iteration a
SparseAllGather (grouped Broadcasts from owners, overlapped with the attention forward)
materialises extra replicas, and a SparseReduceScatter (grouped Reduces) returns their gradients
to the owners.

Decision for iteration ``i``, per layer:

1. **Heterogeneous sharding** (paper §4.3, Algorithm 2; the owner map is carried in
   ``Decision.info["owners_LE"]`` and kept unchanged between re-shards): the top-``t``
   ("overlappable") experts are set aside; the others, in decreasing load, go to the lightest
   node with room, then to the lightest device of that node with room; the top-``t`` fill the
   remaining slots. Each device owns at most ``O = ceil(E / G)`` experts (memory balance).
   Ranks are then relabelled per layer (``relabel_gpus_for_layer``, node to node) so that the
   greedy's lowest-index ties do not give rank 0 the heaviest owned expert of every layer.
   The paper initialises with an even (homogeneous) sharding and re-shards every ~100
   iterations (§5.1); ``migration_weight`` / ``min_gain`` make a re-shard weigh the owner
   moves it causes (:meth:`Hecate._price_reshard`). Here the even sharding made before any
   load is seen (iteration 0) is **provisional** (``info["owners_provisional"]``): the first
   iteration with history re-shards, and the ``reshard_interval`` clock starts there —
   otherwise a short simulation would run ~100 iterations on a load-blind owner map the paper
   only keeps for warm-up.
2. **Sparse materialisation** (paper §4.2, Algorithm 1) from ``load_e`` = mean load of the last
   ``load_window`` (5) iterations. Overlap degree ``t = floor(T_nonMoE · bw / expert_bytes)``
   (paper Eq. 1 / §4.2): how many experts the SparseAllGather can bring while the non-MoE
   compute before the MoE block runs.

   - ``T_nonMoE`` (:func:`non_moe_time_s`) = ``tokens_per_rank · attention_flops_per_token /
     (peak · eff(tokens_per_rank))``. The paper: "computation latency of previous non-MoE
     layers (e.g., the attention layer)". ``ModelSpec.attention_flops_per_token`` is a layer's
     whole non-MoE forward; the ``hecate-*`` presets (MoE every other layer) put the MoE block's
     attention, the interleaved dense block's attention + FFN and the router in it.
   - ``bw`` (:func:`gather_bw_GBps`): with more than one node (heterogeneous interconnect) the
     paper uses "the inter-node bandwidth, as the algorithm prioritizes minimizing cross-node
     communication" — the node's link (its testbeds: "nodes linked by a 100 Gbps / 400 Gbps
     network"), i.e. ``cluster.inter.bw_GBps · gpus_per_node`` (``Cluster.inter`` is one GPU's
     share of the NIC). A grouped broadcast of ``t`` experts whose owners are spread over the
     nodes brings each node ``≈ t·expert_bytes·(N−1)/N`` through that link, once per node.
     One node (homogeneous): ``cluster.intra.bw_GBps``.
   - ``expert_bytes = params_per_expert · bytes_weight``.

   Then, as Algorithm 1: ``t ← min(t, E)``, ``m ← min(m, t)`` with ``m =
   extra_slots_per_rank``. If ``t ≤ m``, the ``t`` hottest experts go to every device (their
   owners already hold them; remaining extra slots stay empty). Else the ``G·m`` extra slots
   go to the ``t`` hottest experts in proportion to load (max-heap on ``load / replicas``,
   ≤ 1 copy per device), spread greedily: hottest per-copy load first, to a free slot on the
   node holding the fewest copies, then the least-loaded device there. **``t = 0``
   materialises nothing**, even with free extra slots: line 1's ``m ← min(m, t)`` makes
   ``m = 0``, i.e. the paper only materialises what the attention hides (exposed gathers are
   left to its optional on-critical-path calibration, not modelled here).
3. Tokens dispatch ``local_first`` (local replica, else same node, else anywhere; even split;
   §4.4).

With no history yet: the even owner split only (experts round-robin over nodes), ``t = 0``.

Slots: ``S = O + m`` per device; slots ``[0, O)`` hold the owned experts, ``[O, S)`` the
materialised ones; empty slots are ``-1``.

``rematerialize`` (paper: optional; frees materialised experts after the forward and gathers
them again for the backward: −90% extra memory, 7.5–17% slower) does not change the placement;
it is reported in ``info`` for the lowering (a second SparseAllGather in the backward, no
replica buffers held across the layer).

This module holds the decision (the overlap degree, the owner map and its re-shard schedule,
the slot rows); the per-layer algorithms it composes are in :mod:`moesim.policies.hecate_plan`,
and the ops and memory a decision implies (SparseAllGather / SparseReduceScatter, re-shard
moves, the owners' optimizer, the footprint) in :mod:`moesim.policies.hecate_lowering`, mixed in
as :class:`~moesim.policies.hecate_lowering.FSSDPLowering`; the public names of both are
re-exported here.

Departures: the paper's optional calibration (re-plan right after gating) is not modelled;
``t`` is computed from the model and cluster (the paper profiles it); Algorithm 2 shards all
layers jointly so a device may own different expert counts per layer (equal in total), here
every device owns ``≤ O`` experts in every layer; the paper's ``m`` is a memory budget, here the
knob ``extra_slots_per_rank`` (default 2).

Shape legend: ``L`` layers, ``E`` experts, ``G`` devices, ``N`` nodes, ``O`` owned slots per
device, ``S`` slots per device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_bools,
    check_capacity_factor,
    check_ints,
    register_policy,
)
from moesim.policies.hecate_lowering import (  # noqa: F401  (re-exported)
    FSSDPLowering,
    materialised_groups,
)
from moesim.policies.hecate_plan import (  # noqa: F401  (re-exported)
    materialise,
    owned_copies,
    shard_owners,
    slot_row,
)
from moesim.policies.migration import check_migration_knobs, model_for, rank_permutation
from moesim.policies.primitives import (
    per_iteration_load_TLE,
    relabel_gpus_for_layer,
    slot_capacity,
)
from moesim.specs import Cluster, ModelSpec


def non_moe_time_s(model: ModelSpec, cluster: Cluster) -> float:
    """``T_nonMoE``: seconds of one layer's non-MoE forward on one device,
    ``tokens_per_rank · attention_flops_per_token / (peak · eff(tokens_per_rank))``."""
    tokens = model.tokens_per_rank
    eff = float(cluster.hardware.gemm_efficiency(tokens))
    return tokens * model.attention_flops_per_token / (cluster.hardware.peak_flops * eff)


def gather_bw_GBps(cluster: Cluster) -> float:
    """The SparseAllGather's ``bw``: a node's inter-node link (``inter.bw_GBps ·
    gpus_per_node``) on a multi-node cluster, else the intra-node link (paper §4.2)."""
    if cluster.num_nodes > 1:
        return cluster.inter.bw_GBps * cluster.gpus_per_node
    return cluster.intra.bw_GBps


def overlap_degree(model: ModelSpec, cluster: Cluster) -> int:
    """Hecate's ``t = floor(T_nonMoE · bw / expert_bytes)`` (paper Eq. 1, §4.2; see the module
    docstring); not yet capped at ``E``."""
    t_s, bw = non_moe_time_s(model, cluster), gather_bw_GBps(cluster)
    return int(math.floor(t_s * bw * 1e9 / model.expert_weight_bytes))


@register_policy("hecate")
class Hecate(FSSDPLowering, Policy):
    """FSSDP: one owner per expert (re-sharded periodically) + per-iteration materialisation."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``extra_slots_per_rank`` (m): experts a device can materialise beyond the ones it
        owns. ``reshard_interval``: iterations between re-shardings (paper ≈ 100).
        ``load_window``: iterations in the sliding-mean load (paper: 5). ``overlap_degree``:
        force ``t`` (``None``: computed from the model and cluster). ``rematerialize``: free
        materialised experts after the forward, gather again in the backward.
        ``capacity_factor``: per-(source, slot) capacity factor, ``None`` = dropless (paper).
        ``migration_weight`` / ``min_gain``: migration-aware re-sharding
        (:mod:`moesim.policies.migration`; 0 / None: the paper's re-shard)."""

        extra_slots_per_rank: int = 2
        reshard_interval: int = 100
        load_window: int = 5
        overlap_degree: int | None = None
        rematerialize: bool = False
        capacity_factor: float | None = None
        migration_weight: float = 0.0
        min_gain: float | None = None

        def __post_init__(self) -> None:
            check_migration_knobs("hecate", self.migration_weight, self.min_gain)
            check_ints("hecate", self, {"extra_slots_per_rank": 0, "reshard_interval": 1,
                                        "load_window": 1, "overlap_degree": 0},
                       optional=("overlap_degree",))  # None: computed from the cluster
            check_bools("hecate", self, "rematerialize")
            check_capacity_factor("hecate", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Owners (carried or re-sharded) plus this iteration's materialised replicas."""
        t0 = time.perf_counter()
        cfg = self.config
        G, E, L = cluster.world_size, model.num_experts, model.num_layers
        O, m = -(-E // G), cfg.extra_slots_per_rank
        load_LE, seen = _mean_load_LE(history, cfg.load_window, L, E)
        t = overlap_degree(model, cluster) if cfg.overlap_degree is None else cfg.overlap_degree
        t = min(t, E) if seen else 0            # no loads yet: owners only (an even split)
        owners_LE, reshard_it, provisional = self._owners(history, load_LE, seen, t, cluster, O)
        priced = {}
        if reshard_it == history.iteration and (cfg.migration_weight > 0
                                                or cfg.min_gain is not None):
            owners_LE, priced = self._price_reshard(history, owners_LE, load_LE, t, model,
                                                    cluster, O)
        rows, branches, lam = [], [], []
        for l in range(L):
            extra, branch = materialise(load_LE[l], owners_LE[l], t, m, cluster.gpus_per_node, G)
            rows.append(slot_row(owners_LE[l], extra, O, m))
            branches.append(branch)
            lam.append(float((rows[-1].reshape(G, O + m)[:, O:] >= 0).sum()) / (G * E))
        info = {"owners_LE": owners_LE, "reshard_iteration": reshard_it,
                "resharded": reshard_it == history.iteration,
                "owners_provisional": provisional, "owned_slots": O,
                "extra_slots": m, "overlap_degree": t, "branch_L": branches,
                "materialized_fraction_L": lam, "rematerialize": cfg.rematerialize, **priced}
        cap = slot_capacity(cfg.capacity_factor, model.tokens_per_rank, model.top_k,
                            G * (O + m))
        return Decision(Placement(np.stack(rows), G, O + m, E), routing="local_first",
                        slot_capacity=cap, planner_time_s=time.perf_counter() - t0, info=info)

    def _owners(self, history: History, load_LE: np.ndarray, seen: bool, t: int,
                cluster: Cluster, owned_per_rank: int) -> tuple[np.ndarray, int, bool]:
        """``(owners [L, E], iteration of that sharding, provisional)``: the carried owner map,
        or a new one when a re-shard is due — ``reshard_interval`` iterations after the last
        one, or at the first iteration with history (``seen``) after a provisional sharding
        made without any."""
        prev = history.previous.info if history.previous is not None else {}
        owners = prev.get("owners_LE")
        last = prev.get("reshard_iteration")
        provisional = bool(prev.get("owners_provisional", False))
        if (owners is not None and last is not None
                and np.shape(owners) == load_LE.shape
                and not (provisional and seen)
                and history.iteration - int(last) < self.config.reshard_interval):
            return np.asarray(owners, dtype=np.int64), int(last), provisional
        fresh = np.stack([_layer_ranks(l, cluster)[shard_owners(
            load, cluster.num_nodes, cluster.gpus_per_node, owned_per_rank, t)]
            for l, load in enumerate(load_LE)])
        return fresh, history.iteration, not seen

    def _price_reshard(self, history: History, fresh_LE: np.ndarray, load_LE: np.ndarray,
                       t: int, model: ModelSpec, cluster: Cluster, O: int
                       ) -> tuple[np.ndarray, dict]:
        """Migration-aware re-shard (:mod:`moesim.policies.migration`): per layer, keep the
        owner map in force, the fresh one, or the fresh one with its ranks relabelled (node to
        node) to leave most experts with their owner — whichever has the lowest layer time +
        ``migration_weight`` × migration time / ``reshard_interval``; then ``min_gain``. The
        layer time prices the whole slot row (owners plus this iteration's materialised
        copies, even split); the migration moves ``P·(b_w + b_o)`` per changed owner."""
        prev = history.previous.info if history.previous is not None else {}
        old = prev.get("owners_LE")
        if old is None or np.shape(old) != fresh_LE.shape:
            return fresh_LE, {}
        cfg, G = self.config, cluster.world_size
        old = np.asarray(old, dtype=np.int64)
        m = cfg.extra_slots_per_rank
        knobs = dict(interval=cfg.reshard_interval, load_iterations=1.0,
                     slot_bytes=model.params_per_expert * (model.bytes_weight
                                                           + model.bytes_optim),
                     weight=cfg.migration_weight, min_gain=cfg.min_gain)
        rows = model_for(model, cluster, slots_per_rank=O + m, **knobs)
        moves = model_for(model, cluster, slots_per_rank=O, **knobs)
        no_extra = np.zeros((G, fresh_LE.shape[1]), dtype=np.int64)
        out, skipped = [], []
        for l in range(fresh_LE.shape[0]):
            perm = rank_permutation(owned_copies(fresh_LE[l], G), owned_copies(old[l], G),
                                    cluster.gpus_per_node, keep_nodes=True)
            cands = [old[l], fresh_LE[l], perm[fresh_LE[l]]]
            own = [slot_row(c, no_extra, O, 0) for c in cands]
            full = [slot_row(c, materialise(load_LE[l], c, t, m, cluster.gpus_per_node, G)[0],
                             O, m) for c in cands]
            cost = [rows.layer_time_s(f, load_LE[l])
                    + cfg.migration_weight * moves.migration_time_s(o, own[0])
                    / cfg.reshard_interval for f, o in zip(full, own, strict=True)]
            pick = 1 if cfg.migration_weight == 0 else int(np.argmin(cost))
            saved = rows.layer_time_s(full[0], load_LE[l]) - rows.layer_time_s(full[pick],
                                                                               load_LE[l])
            ok = cfg.min_gain is None or saved * cfg.reshard_interval >= cfg.min_gain \
                * moves.migration_time_s(own[pick], own[0])
            out.append(cands[pick] if ok else old[l])
            skipped.append(not ok)
        return np.stack(out), {"reshard_skipped_L": skipped}


def _layer_ranks(layer: int, cluster: Cluster) -> np.ndarray:
    """Rank ``r`` of the sharding is rank ``out[r]`` in ``layer`` (:func:`relabel_gpus_for_layer`:
    nodes map to nodes, so the balance is kept, but the greedy's lowest-index ties — the
    heaviest expert on rank 0 — no longer pile every layer's hottest owner on one device)."""
    ranks = np.arange(cluster.world_size)
    return np.argsort(relabel_gpus_for_layer(ranks, layer, 1, cluster.gpus_per_node))


def _mean_load_LE(history: History, window: int, L: int, E: int) -> tuple[np.ndarray, bool]:
    """Sliding-mean expert load over the last ``window`` iterations, ``[L, E]``, and whether
    there was any history (uniform load when there is none)."""
    per_it = per_iteration_load_TLE(history, window)
    if per_it.shape[0] == 0:
        return np.ones((L, E)), False
    return per_it.mean(axis=0), True
