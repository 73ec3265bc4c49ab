"""DeepSeek EPLB as a training policy: redundant experts placed to balance per-GPU load.

DeepSeek-AI, "Expert Parallelism Load Balancer" (github.com/deepseek-ai/EPLB; DeepSeek-V3
technical report, arXiv 2412.19437, §3.4). The balancer itself — hierarchical or global, the
reference's float32 arithmetic (default) or moesim's float64 path — is
:mod:`moesim.policies.eplb_balancer`; this module re-plans with it.

EPLB was written for inference; as a training policy it re-plans from the load summed over the
last ``window`` iterations, first as soon as there is history (iteration 1; iteration 0 has
none and stripes the replicas over the ranks), then every ``interval`` iterations counted from
that re-plan, and keeps the placement in between. Tokens split evenly over an expert's replicas
(routing ``even``); dropless by default as in DeepSeek-V3.

Re-planning modes:

- ``mode = full`` (the reference): every re-plan runs the balancer from scratch, ignoring where
  experts are, so it may reshuffle every slot; a training user pays that as migration
  (``info["moved_slots_L"]``).
- ``mode = incremental``: keep every replica that is not moved and move the fewest replicas the
  greedy of :mod:`moesim.policies.incremental` needs to reach ``max/mean GPU load <=
  target_imbalance``.
- ``migration_weight`` / ``min_gain`` (:mod:`moesim.policies.migration`): per layer, among the
  placement in force, every step of the incremental path and (in full mode) the balancer's
  plan relabelled to keep what it can in place, keep the lowest ``layer time + weight ·
  migration time / interval``; skip a re-plan that does not repay ``min_gain`` × its
  migration within the interval. Weight 0 and min_gain off are exactly the modes above.
- ``balancing``: ``auto`` (the reference's rule), ``hierarchical`` or ``global``, chosen
  explicitly as in vLLM PR 51988; the mode used is in ``info["balancing"]`` and in the
  run's ``config.json`` (``policy.resolved.balancing``).

Lowering: static EP's grad sync and ZeRO-1 optimizer over each expert's replicas; a re-plan
moves each changed slot's weights plus its average optimizer share (see ``lower_relayout``).

Shape legend: ``L`` layers, ``E`` experts, ``P`` physical slots.
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
from moesim.policies.eplb_balancer import (
    BALANCING,
    PRECISIONS,
    balancing_mode,
)
from moesim.policies.eplb_balancer import rebalance_experts as _rebalance
from moesim.policies.incremental import incremental_path
from moesim.policies.migration import (
    align_slots,
    check_migration_knobs,
    model_for,
    replan_due,
)
from moesim.policies.primitives import (
    moved_count_L,
    slot_capacity,
    striped_slots,
    window_load_LE,
)
from moesim.specs import Cluster, ModelSpec

MODES = ("full", "incremental")


def rebalance_experts(weight_LE: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, precision: str = "float32", balancing: str = "auto"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point (see :func:`moesim.policies.eplb_balancer.rebalance_experts`)."""
    return _rebalance(weight_LE, num_replicas, num_groups, num_nodes, num_gpus,
                      precision=precision, balancing=balancing)


@register_policy("eplb")
class EPLB(Policy):
    """Re-plan with DeepSeek's balancer (or incrementally) every ``interval`` iterations."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank``: total expert slots per GPU; when ``None`` it is
        ``ceil(E/G) + num_redundant_per_rank``. ``num_groups``: expert groups for the
        hierarchical mode (DeepSeek-V3: 8 groups of 32). ``balancing``: ``auto`` =
        hierarchical when the groups divide over the nodes (the reference's rule), else global;
        ``hierarchical`` / ``global`` force one (hierarchical refuses a topology it cannot
        serve). ``precision``: ``float32`` = DeepSeek's ``eplb.py`` slot for slot,
        ``float64`` = moesim's better-conditioned path. ``window``: iterations of load summed
        per plan. ``interval``: iterations between re-plans, counted from the first (which
        comes as soon as there is history). ``mode``: ``full`` re-plans from scratch,
        ``incremental`` moves the fewest replicas reaching ``target_imbalance`` (max/mean GPU
        load). ``migration_weight``: weight of the amortised migration time against the layer
        time (0 = ignore migration). ``min_gain``: skip a re-plan whose saved time over the
        interval is below ``min_gain`` × its migration time (``None`` = off).
        ``capacity_factor``: ``None`` = dropless (DeepSeek-V3). ``routing``: ``even`` over all
        replicas (default); ``node_first`` keeps tokens on the source's node when it holds a
        replica."""

        num_redundant_per_rank: int = 1
        slots_per_rank: int | None = None
        num_groups: int = 1
        balancing: str = "auto"
        precision: str = "float32"
        window: int = 10
        interval: int = 10
        mode: str = "full"
        target_imbalance: float = 1.05
        migration_weight: float = 0.0
        min_gain: float | None = None
        capacity_factor: float | None = None
        routing: str = "even"

        def __post_init__(self) -> None:
            check_choice("eplb", "routing", self.routing, ("even", "node_first", "local_first"))
            check_choice("eplb", "balancing", self.balancing, BALANCING)
            check_choice("eplb", "precision", self.precision, PRECISIONS)
            check_choice("eplb", "mode", self.mode, MODES)
            check_ints("eplb", self, {"window": 1, "interval": 1, "num_groups": 1,
                                      "num_redundant_per_rank": 0, "slots_per_rank": 1},
                       optional=("slots_per_rank",))
            check_capacity_factor("eplb", self.capacity_factor)
            check_migration_knobs("eplb", self.migration_weight, self.min_gain)
            if isinstance(self.target_imbalance, bool) or not isinstance(
                    self.target_imbalance, (int, float)) or not self.target_imbalance >= 1.0:
                raise MoesimError(f"eplb: target_imbalance={self.target_imbalance!r} is a "
                                  "max/mean GPU load; use a value >= 1 (e.g. 1.05)")

    def resolved_knobs(self, model: ModelSpec, cluster: Cluster) -> dict:
        """The balancing mode this cluster gets (``hierarchical`` or ``global``)."""
        return {"balancing": balancing_mode(self.config.balancing, self.config.num_groups,
                                            cluster.num_nodes)}

    def slots(self, model: ModelSpec, cluster: Cluster) -> int:
        """Slots per GPU under this config."""
        if self.config.slots_per_rank is not None:
            return self.config.slots_per_rank
        return -(-model.num_experts // cluster.world_size) + self.config.num_redundant_per_rank

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Re-plan when due (:func:`~moesim.policies.migration.replan_due`), else keep."""
        start = time.perf_counter()
        cfg = self.config
        S, G, E, L = self.slots(model, cluster), cluster.world_size, model.num_experts, \
            model.num_layers
        check_slots_cover("eplb", S, G, E)
        balancing = balancing_mode(cfg.balancing, cfg.num_groups, cluster.num_nodes)
        prev = history.previous
        usable = prev is not None and prev.placement.phy2log_LP.shape == (L, S * G)
        prev_LP = prev.placement.phy2log_LP if usable else None
        last = prev.info.get("last_replan") if usable else None
        info: dict = {"balancing": balancing, "precision": cfg.precision, "mode": cfg.mode}
        weight_LE = window_load_LE(history, cfg.window, L, E)
        due = replan_due(history, {"last_replan": last}, cfg.interval) and weight_LE.any()
        if due:
            phy2log_LP = self._replan(weight_LE, prev_LP, history, model, cluster, S,
                                      balancing, info)
            last = history.iteration
        elif usable:
            phy2log_LP = prev_LP
        else:   # no load seen yet: replicas striped over ranks (EPLB on equal weights
            # would stack an expert's copies on one GPU by its tie-breaking)
            phy2log_LP = np.tile(striped_slots(E, S * G), (L, 1))
        info.update(replanned=bool(due), last_replan=last,
                    moved_slots_L=moved_count_L(phy2log_LP, prev_LP).tolist())
        cap = slot_capacity(cfg.capacity_factor, model.tokens_per_rank, model.top_k, S * G)
        return Decision(Placement(phy2log_LP, G, S, E), routing=cfg.routing, slot_capacity=cap,
                        planner_time_s=time.perf_counter() - start, info=info)

    def _replan(self, weight_LE: np.ndarray, prev_LP: np.ndarray | None, history: History,
                model: ModelSpec, cluster: Cluster, S: int, balancing: str,
                info: dict) -> np.ndarray:
        """The new placement ``[L, P]`` (``info`` gets the per-layer objective figures)."""
        cfg = self.config
        G = cluster.world_size
        full = cfg.mode == "full" or prev_LP is None
        fresh_LP = (_rebalance(weight_LE, S * G, cfg.num_groups, cluster.num_nodes, G,
                               precision=cfg.precision, balancing=balancing, torch_ties=False)[0]
                    if full else None)
        priced = prev_LP is not None and (cfg.migration_weight > 0 or cfg.min_gain is not None)
        if not priced and full:
            return fresh_LP
        seen = history.past_TLRE.shape[0] // history.passes_per_iteration
        mm = model_for(model, cluster, slots_per_rank=S, interval=cfg.interval,
                       load_iterations=min(cfg.window, seen),
                       slot_bytes=self.slot_bytes(model, S * G),
                       weight=cfg.migration_weight, min_gain=cfg.min_gain)
        out, skipped, times = [], [], []
        for l in range(weight_LE.shape[0]):
            cands = []
            if cfg.mode == "incremental" or cfg.migration_weight > 0:
                cands = incremental_path(prev_LP[l], weight_LE[l], S, cfg.target_imbalance
                                         if cfg.mode == "incremental" else 1.0, S * G)
            if full:
                keep_nodes = balancing == "hierarchical"
                cands.append(fresh_LP[l] if cfg.migration_weight == 0 else
                             align_slots(fresh_LP[l], prev_LP[l], S, cluster.gpus_per_node,
                                         keep_nodes))
            pick = (cands[mm.best(cands, prev_LP[l], weight_LE[l])]
                    if cfg.migration_weight > 0 else cands[-1])
            ok = mm.pays_off(pick, prev_LP[l], weight_LE[l])
            out.append(pick if ok else prev_LP[l])
            skipped.append(not ok)
            times.append(mm.gain_info(out[-1], prev_LP[l], weight_LE[l]))
        info["skipped_L"] = skipped
        info["layer_time_s_L"] = [t["layer_time_s"] for t in times]
        info["migration_time_s_L"] = [t["migration_time_s"] for t in times]
        return np.stack(out)

    @staticmethod
    def slot_bytes(model: ModelSpec, num_slots: int) -> float:
        """Bytes a changed slot receives: the expert's weights plus its average optimizer
        share ``P·b_o·E/(G·S)`` (what :meth:`lower_relayout` charges)."""
        return model.expert_weight_bytes + model.params_per_expert * model.bytes_optim \
            * model.num_experts / num_slots

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
