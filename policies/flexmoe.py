"""FlexMoE: threshold-triggered replica migration from cold experts to hot ones.

Nie et al., "FlexMoE: Scaling Large-scale Sparse Pre-trained Model Training via Dynamic Device
Placement" (SIGMOD'23, arXiv 2304.03946). Every ``check_interval`` iterations (the first check
as soon as there is history, at iteration 1; the interval counts from there) the scheduler
measures device-load imbalance ``max/min`` (expected tokens per GPU when an expert's load splits
evenly over its replicas); above ``threshold`` it repeatedly moves one replica from the coldest
expert (lowest load per replica) to the hottest (highest load per replica), accepting each move
while the modelled cost improves, and stops at the first move that does not.

Modelling choices:

- cost = max GPU load, ties broken by the sum of squared GPU loads (so a move that relieves one
  of several equally loaded GPUs still counts as progress); the paper's cost model is the
  step-time estimate of its Policy Maker, whose dominant term is the straggler GPU's load;
- a single move often cannot lower the max (the new copy lands whole on one GPU, e.g. the
  second copy of a hot expert only helps once the third exists), so the greedy may try up to
  ``patience`` non-improving moves in a row and keeps the best prefix; ``patience=0`` is the
  paper's literal "stop at the first move that does not improve";
- a moved replica keeps its slot (the slot on the GPU that loses the cold expert's copy is
  reloaded with the hot expert), chosen as the cold copy on the least-loaded GPU;
- a cold expert keeps ≥ 1 replica (paper), or ≥ 1 per node when ``keep_one_per_node`` (LAER-MoE's
  re-implementation of FlexMoE as a baseline);
- load = sum over the last ``window`` iterations; iteration 0 (or no usable previous placement)
  stripes replicas uniformly (``phy2log[p] = p % E``).

Moved replicas carry weights **and** optimizer state: ``info["moved_bytes_L"]`` =
moved slots · params · (bytes_weight + bytes_optim). ``info["last_trigger"]`` carries the last
iteration the threshold fired. Routing ``even``; dropless by default. Lowering: migrations are
point-to-point sends of weights + optimizer state; replicas' grads are all-reduced and every
replica keeps (and updates) the full optimizer state of its expert, which is why FlexMoE needs
more memory than ZeRO-sharded schemes.
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
from moesim.policies.migration import check_migration_knobs, model_for, replan_due
from moesim.policies.primitives import (
    dense_params_R,
    emit_gpu_optimizer,
    gpu_load,
    logcnt_of,
    moved_count_L,
    slot_capacity,
    slot_params_R,
    striped_slots,
    window_load_LE,
)
from moesim.specs import Cluster, ModelSpec


def imbalance(gpu_load_G: np.ndarray) -> float:
    """``max/min`` GPU load (``inf`` when some GPU is idle while another works; 1 if all idle)."""
    hi, lo = float(gpu_load_G.max()), float(gpu_load_G.min())
    if hi == 0.0:
        return 1.0
    return hi / lo if lo > 0 else float("inf")


def _cost(phy2log_P: np.ndarray, load_E: np.ndarray, S: int) -> tuple[float, float]:
    g = gpu_load(phy2log_P, load_E, S)
    return float(g.max()), float((g * g).sum())


def _removable_slots(phy2log_P: np.ndarray, e: int, S: int, gpus_per_node: int,
                     per_node: bool) -> np.ndarray:
    """Slots of expert ``e`` that may give up their copy under the ≥1 (per node) rule."""
    slots = np.flatnonzero(phy2log_P == e)
    if len(slots) <= 1:
        return slots[:0]
    if not per_node:
        return slots
    node = slots // (S * gpus_per_node)
    per = np.bincount(node)
    return slots[per[node] > 1]


def _next_move(row: np.ndarray, load_E: np.ndarray, S: int, gpus_per_node: int,
               per_node: bool) -> tuple[int, int] | None:
    """``(slot, hot)``: the coldest expert's copy on its least-loaded GPU, to become a copy of
    the hottest expert (by load per replica); ``None`` when no expert can give a copy up."""
    per_copy = load_E / np.maximum(logcnt_of(row, load_E.shape[0]), 1)
    hot = int(np.argmax(per_copy))
    for cold in np.argsort(per_copy, kind="stable"):
        slots = _removable_slots(row, int(cold), S, gpus_per_node, per_node)
        if cold != hot and len(slots):
            g = gpu_load(row, load_E, S)
            return int(slots[np.argmin(g[slots // S])]), hot
    return None


def migrate_layer(phy2log_P: np.ndarray, load_E: np.ndarray, S: int, gpus_per_node: int,
                  per_node: bool, max_moves: int, patience: int = 0,
                  path: list[np.ndarray] | None = None) -> np.ndarray:
    """FlexMoE's greedy: move one replica cold → hot while the cost improves; with
    ``patience`` > 0 up to that many non-improving moves in a row are tried before stopping,
    and the best prefix of moves is kept. Returns a copy of the row; ``path`` (if given)
    receives every placement visited, the start included."""
    row = phy2log_P.copy()
    best_row, best = row, _cost(row, load_E, S)
    if path is not None:
        path.append(row)
    misses = 0
    for _ in range(max_moves):
        move = _next_move(row, load_E, S, gpus_per_node, per_node)
        if move is None:
            break
        row = row.copy()
        row[move[0]] = move[1]
        if path is not None:
            path.append(row)
        cost = _cost(row, load_E, S)
        if cost < best:
            best_row, best, misses = row, cost, 0
            continue
        misses += 1
        if misses > patience:
            break
    return best_row


@register_policy("flexmoe")
class FlexMoE(Policy):
    """Check imbalance every ``check_interval`` iterations; migrate replicas above ``threshold``."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank``: expert slots per GPU. ``threshold``: trigger when max/min GPU load
        exceeds it. ``check_interval``: iterations between checks (paper: 10–100). ``window``:
        iterations of load per check. ``keep_one_per_node``: LAER's variant of the ≥1-replica
        rule. ``max_moves``: cap on moves per trigger (``None``: slots per layer). ``patience``:
        non-improving moves in a row tried before stopping (0 = the paper's literal rule).
        ``routing``: ``even`` over all replicas (default), or ``node_first`` (replicas on the
        source's node first, as a multi-node re-implementation would route).
        ``migration_weight`` / ``min_gain``: see :mod:`moesim.policies.migration` (with a
        weight, the greedy's visited placements compete on layer time + weight × migration
        time / ``check_interval``); 0 / None: the paper's rule. Checks start at the first
        iteration with history and repeat every ``check_interval`` iterations from there."""

        slots_per_rank: int = 4
        threshold: float = 1.5
        check_interval: int = 10
        window: int = 10
        keep_one_per_node: bool = False
        max_moves: int | None = None
        patience: int = 2
        capacity_factor: float | None = None
        routing: str = "even"
        migration_weight: float = 0.0
        min_gain: float | None = None

        def __post_init__(self) -> None:
            check_migration_knobs("flexmoe", self.migration_weight, self.min_gain)
            check_choice("flexmoe", "routing", self.routing,
                         ("even", "node_first", "local_first"))
            check_ints("flexmoe", self, {"slots_per_rank": 1, "check_interval": 1, "window": 1,
                                         "patience": 0, "max_moves": 0},
                       optional=("max_moves",))
            if not self.threshold >= 1.0:
                raise MoesimError(f"flexmoe: threshold={self.threshold!r} is a max/min ratio; "
                                  "use a value >= 1 (e.g. 1.5)")
            check_capacity_factor("flexmoe", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Placement ``[L, G·S]``: the previous one, migrated where the threshold fires."""
        start = time.perf_counter()
        S, G, E, L = self.config.slots_per_rank, cluster.world_size, model.num_experts, \
            model.num_layers
        check_slots_cover("flexmoe", S, G, E)
        prev = history.previous
        usable = prev is not None and prev.placement.phy2log_LP.shape == (L, G * S)
        current_LP = (prev.placement.phy2log_LP if usable
                      else np.tile(striped_slots(E, G * S), (L, 1)))
        last_trigger = int(prev.info.get("last_trigger", -1)) if usable else -1
        last_check = prev.info.get("last_check") if usable else None
        triggered = [False] * L
        phy2log_LP = current_LP.copy()
        if replan_due(history, {"last_replan": last_check}, self.config.check_interval):
            last_check = history.iteration
            load_LE = window_load_LE(history, self.config.window, L, E)
            mm = self._pricing(history, model, cluster) if usable else None
            max_moves = self.config.max_moves if self.config.max_moves is not None else G * S
            for l in range(L):
                if imbalance(gpu_load(current_LP[l], load_LE[l], S)) > self.config.threshold:
                    triggered[l] = True
                    path: list[np.ndarray] = []
                    best = migrate_layer(current_LP[l], load_LE[l], S, cluster.gpus_per_node,
                                         self.config.keep_one_per_node, max_moves,
                                         self.config.patience, path)
                    if mm is not None and mm.weight > 0:
                        best = path[mm.best(path, current_LP[l], load_LE[l])]
                    if mm is None or mm.pays_off(best, current_LP[l], load_LE[l]):
                        phy2log_LP[l] = best
            if any(triggered):
                last_trigger = history.iteration
        moved_L = moved_count_L(phy2log_LP, current_LP if usable else None)
        per_slot_bytes = model.params_per_expert * (model.bytes_weight + model.bytes_optim)
        info = {"triggered_L": triggered, "last_trigger": last_trigger, "last_check": last_check,
                "moved_slots_L": moved_L.tolist(),
                "moved_bytes_L": (moved_L * per_slot_bytes).tolist()}
        cap = slot_capacity(self.config.capacity_factor, model.tokens_per_rank, model.top_k,
                            S * G)
        return Decision(Placement(phy2log_LP, G, S, E), routing=self.config.routing,
                        slot_capacity=cap,
                        planner_time_s=time.perf_counter() - start, info=info)

    def _pricing(self, history: History, model: ModelSpec, cluster: Cluster):
        """The migration model of this config's knobs (None when both are off)."""
        cfg = self.config
        if cfg.migration_weight == 0 and cfg.min_gain is None:
            return None
        seen = history.past_TLRE.shape[0] // history.passes_per_iteration
        return model_for(model, cluster, slots_per_rank=cfg.slots_per_rank,
                         interval=cfg.check_interval, load_iterations=min(cfg.window, seen),
                         slot_bytes=model.params_per_expert
                         * (model.bytes_weight + model.bytes_optim),
                         weight=cfg.migration_weight, min_gain=cfg.min_gain)

    # -- lowering hooks ---------------------------------------------------------------------
    def lower_relayout(self, ctx) -> list[int]:
        """Migrations: each changed slot receives its expert's weights **and** optimizer state
        (``P·(b_w + b_o)``) from a previous holder."""
        return ctx.emit_relayout_sendrecv(
            extra_bytes_per_expert=ctx.model.params_per_expert * ctx.model.bytes_optim)

    def lower_optimizer(self, ctx) -> list[int]:
        """Every replica keeps the full optimizer state of its expert and applies the same
        (all-reduced) update, so there is no expert all-gather; dense is ZeRO-1. The step
        waits for the grad sync (the replicas' all-reduced grads are its input)."""
        experts_R = slot_params_R(ctx.placement, ctx.model.params_per_expert)
        return emit_gpu_optimizer(ctx, experts_R, ctx.optimizer_deps())

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Weights, grads and full optimizer state of every local replica; dense ZeRO-1."""
        experts_R = slot_params_R(decision.placement, model.params_per_expert)
        dense = model.num_layers * model.dense_params
        gpu = {"weights": (experts_R + dense) * model.bytes_weight,
               "grads": (experts_R + dense) * model.bytes_grad,
               "optimizer": (experts_R + dense_params_R(model, cluster.world_size))
               * model.bytes_optim}
        return gpu, {}
