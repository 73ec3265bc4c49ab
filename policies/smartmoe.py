"""SmartMoE: periodic re-permutation of experts over GPUs, without replication.

Zhai et al., "SmartMoE: Efficiently Training Sparsely-Activated Models through Combining Offline
and Online Parallelization" (USENIX ATC'23). Its online part re-places experts every ``freq``
iterations (here the first re-plan comes as soon as there is history, at iteration 1, and
``freq`` counts from it): experts sorted by their running-mean load, each assigned to the
least-loaded GPU that still has a free slot, and the new placement is adopted only if it lowers
the maximum GPU load (moving weights point-to-point costs time, so a plan that does not help is
not applied).

Modelling choices:

- running mean = exponential moving average with ``ema_decay`` over the last ``window``
  iterations' per-iteration loads (seeded by the oldest one); the paper keeps a running
  average of the gate's statistics without fixing its form;
- no replication: ``S = ceil(E/G)`` slots per GPU; when ``G·S > E`` the extra slots are empty
  (``-1``) and packed as zero-load items, so each GPU still gets exactly ``S`` slots;
- the greedy is EPLB's balanced packing (heaviest first into the lightest GPU with room), its
  GPUs relabelled per layer (:func:`relabel_gpus_for_layer`) so that the hottest expert of
  every layer does not land on the same rank (the paper does not say how ties break; without it
  one rank holds every layer's hottest expert and its activation memory);
- adoption is decided per layer: max GPU load of the candidate vs the placement in force, both
  under the running-mean load; ties keep the placement in force.
- iteration 0 (or no usable previous placement): static EP's contiguous layout;
- ``migration_weight`` / ``min_gain`` (:mod:`moesim.policies.migration`): with a weight, the
  placement in force, the candidate and the candidate relabelled to keep experts where they
  are compete on layer time + weight × migration time / ``freq`` (in place of the max-load
  test); ``min_gain`` then skips an adoption that does not repay its migration.

``Decision.info``: ``adopted_L`` (this call), ``last_replan`` (iteration of the last re-plan,
``None`` before the first), ``last_adopt_L`` (iteration of each layer's last
adoption, -1 if none, carried from the previous decision), ``moved_slots_L``.
Dropless by default (SmartMoE builds on FastMoE, which does not drop); routing is trivial (one
replica per expert). Lowering: an adopted permutation moves each relocated expert's weights and
optimizer state point-to-point; everything else is static EP's.
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
    check_ints,
    register_policy,
)
from moesim.policies.migration import align_slots, check_migration_knobs, model_for, replan_due
from moesim.policies.primitives import (
    balanced_packing,
    ema_load_LE,
    gpu_load,
    moved_count_L,
    packs_to_slots,
    relabel_gpus_for_layer,
    slot_capacity,
)
from moesim.specs import Cluster, ModelSpec


def static_layout(num_experts: int, num_slots: int) -> np.ndarray:
    """Expert ``e`` in slot ``e``, the remaining slots empty: ``phy2log_P``."""
    p = np.arange(num_slots, dtype=np.int64)
    return np.where(p < num_experts, p, -1)


def permute_greedy(load_E: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """Heaviest expert first onto the least-loaded GPU with a free slot: ``phy2log_P``."""
    E = load_E.shape[0]
    P = num_ranks * slots_per_rank
    items = np.concatenate([load_E.astype(np.float64), np.zeros(P - E)])[None, :]
    pack, rank = balanced_packing(items, num_ranks)
    item_of_slot = packs_to_slots(pack, rank)[0]
    return np.where(item_of_slot < E, item_of_slot, -1)


@register_policy("smartmoe")
class SmartMoE(Policy):
    """Every ``freq`` iterations, greedily re-permute experts; adopt only if max load falls."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``freq``: iterations between re-plans. ``ema_decay`` / ``window``: the running mean
        of expert load. ``capacity_factor``: ``None`` = dropless. ``migration_weight`` /
        ``min_gain``: migration-aware adoption (0 / None: the paper's max-load rule)."""

        freq: int = 10
        ema_decay: float = 0.5
        window: int = 10
        capacity_factor: float | None = None
        migration_weight: float = 0.0
        min_gain: float | None = None

        def __post_init__(self) -> None:
            check_ints("smartmoe", self, {"freq": 1, "window": 1})
            check_migration_knobs("smartmoe", self.migration_weight, self.min_gain)
            if not 0.0 <= self.ema_decay < 1.0:
                raise MoesimError(f"smartmoe: ema_decay={self.ema_decay!r} must be in [0, 1)")
            check_capacity_factor("smartmoe", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Placement ``[L, G·S]``, ``S = ceil(E/G)``."""
        start = time.perf_counter()
        G, E, L = cluster.world_size, model.num_experts, model.num_layers
        S = -(-E // G)
        prev = history.previous
        usable = prev is not None and prev.placement.phy2log_LP.shape == (L, G * S)
        current_LP = (prev.placement.phy2log_LP if usable
                      else np.tile(static_layout(E, G * S), (L, 1)))
        last_adopt = list(prev.info.get("last_adopt_L", [-1] * L)) if usable else [-1] * L
        last = prev.info.get("last_replan") if usable else None
        adopted = [False] * L
        phy2log_LP = current_LP.copy()
        if replan_due(history, {"last_replan": last}, self.config.freq):
            last = history.iteration
            load_LE = ema_load_LE(history, self.config.ema_decay, L, E, self.config.window)
            mm = self._pricing(history, model, cluster, S)
            for l in range(L):
                cand = relabel_gpus_for_layer(permute_greedy(load_LE[l], G, S), l, S,
                                              cluster.gpus_per_node)
                pick = self._choose(cand, current_LP[l], load_LE[l], S, cluster, mm)
                if pick is not None:
                    phy2log_LP[l] = pick
                    adopted[l] = True
                    last_adopt[l] = history.iteration
        moved_L = moved_count_L(phy2log_LP, current_LP if usable else None)
        info = {"adopted_L": adopted, "last_adopt_L": last_adopt, "last_replan": last,
                "moved_slots_L": moved_L.tolist()}
        cap = slot_capacity(self.config.capacity_factor, model.tokens_per_rank, model.top_k,
                            G * S)
        return Decision(Placement(phy2log_LP, G, S, E), routing="even", slot_capacity=cap,
                        planner_time_s=time.perf_counter() - start, info=info)

    @staticmethod
    def _choose(cand: np.ndarray, current: np.ndarray, load_E: np.ndarray, S: int,
                cluster: Cluster, mm) -> np.ndarray | None:
        """The placement to adopt for one layer, or None to keep ``current``."""
        if mm is None:      # the paper: adopt when the max GPU load falls
            better = gpu_load(cand, load_E, S).max() < gpu_load(current, load_E, S).max()
            return cand if better else None
        pick = cand
        if mm.weight > 0:
            options = [current, cand, align_slots(cand, current, S, cluster.gpus_per_node,
                                                  keep_nodes=False)]
            pick = options[mm.best(options, current, load_E)]
            if pick is current:
                return None
        elif not gpu_load(cand, load_E, S).max() < gpu_load(current, load_E, S).max():
            return None
        return pick if mm.pays_off(pick, current, load_E) else None

    def _pricing(self, history: History, model: ModelSpec, cluster: Cluster, S: int):
        """The migration model of this config's knobs (None when both are off)."""
        cfg = self.config
        if cfg.migration_weight == 0 and cfg.min_gain is None:
            return None
        return model_for(model, cluster, slots_per_rank=S, interval=cfg.freq,
                         load_iterations=1.0,                 # the EMA is per iteration
                         slot_bytes=model.params_per_expert
                         * (model.bytes_weight + model.bytes_optim),
                         weight=cfg.migration_weight, min_gain=cfg.min_gain)

    # -- lowering hooks ---------------------------------------------------------------------
    def lower_relayout(self, ctx) -> list[int]:
        """An adopted permutation moves each relocated expert's weights and its optimizer state
        (the expert has one owner, so its whole state follows it): ``P·(b_w + b_o)``."""
        return ctx.emit_relayout_sendrecv(
            extra_bytes_per_expert=ctx.model.params_per_expert * ctx.model.bytes_optim)
