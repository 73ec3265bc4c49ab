"""Migration-aware re-planning, shared by every re-planning policy (EPLB, FlexMoE, SmartMoE,
Hecate's re-sharding).

A re-plan trades balance against bytes moved. Every such policy takes the same two knobs:

- ``migration_weight`` (``w >= 0``): among the candidate plans of a re-plan (the plan in force,
  the policy's own new plan, and the intermediate plans the policy can build on the way) keep
  the one minimising, per layer,

      ``J = layer_time_s(plan) + w · migration_time_s(previous → plan) / interval``

  i.e. the modelled per-iteration expert time of the layer plus the migration time amortised
  over the iterations the plan is expected to live (the re-plan ``interval``). ``w = 0`` is the
  policy's behaviour without this module, exactly (the policies do not call it then).
  Requested for DeepSeek EPLB (deepseek-ai/EPLB PR 13) and vLLM (PRs 23243, 24069 and 37656,
  "SwiftBalancer": incremental exchanges cut a rebalance from 35.2 to 4.4 ms at EP 32).
- ``min_gain`` (``None`` = off): skip a re-plan whose modelled gain does not pay for its
  migration, ``(layer_time(old) − layer_time(new)) · interval < min_gain ·
  migration_time(old → new)``; ``min_gain = 1`` adopts exactly the plans that pay for
  themselves within the interval (after sglang PR 8345, which skips a rebalance when the
  GPUs are already well utilised).

The model (first principles, no fitted constants):

- ``layer_time_s`` = the most loaded GPU's token assignments per iteration (each expert's load
  split evenly over its replicas) × the forward + backward expert FLOPs of one token assignment
  (``3 · expert_flops_per_token``) / (peak FLOP/s · GEMM efficiency at the mean tokens per slot).
- ``migration_time_s``: each slot whose expert changed is filled from a previous holder, as
  the lowering does (:func:`moesim.lowering.LoweringContext.emit_relayout_sendrecv`): nothing
  when its rank held that expert already, else over the intra-node link when a holder shares
  its node, else over the inter-node link. A receiving rank takes its bytes one after another
  per link level; the migration lasts as long as the slowest rank's slowest level.

Shape legend: ``L`` layers, ``E`` experts, ``G`` ranks, ``S`` slots per rank, ``P = G·S``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.specs import Cluster, ModelSpec


def check_migration_knobs(policy: str, migration_weight, min_gain) -> None:
    """``migration_weight`` is a number >= 0; ``min_gain`` is None or a number >= 0."""
    for name, value, optional in (("migration_weight", migration_weight, False),
                                  ("min_gain", min_gain, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            none = " (or none to switch it off)" if optional else ""
            raise MoesimError(f"{policy}: {name}={value!r} must be a number >= 0{none}; "
                              f"e.g. {name}=1")


@dataclass(frozen=True, kw_only=True)
class MigrationModel:
    """What the objective needs to price one layer's plan; build it with :func:`model_for`.

    ``token_time_s``: expert time (fwd + bwd) of one token assignment on one GPU.
    ``load_scale``: multiplies the policy's load (e.g. summed over a window) into token
    assignments per iteration. ``slot_bytes``: bytes a filled slot's migration carries.
    ``intra_Bps`` / ``inter_Bps``: one GPU's intra- and inter-node bandwidth (bytes/s).
    ``interval``: iterations a plan is expected to live.
    """

    token_time_s: float
    load_scale: float
    slot_bytes: float
    intra_Bps: float
    inter_Bps: float
    slots_per_rank: int
    gpus_per_node: int
    interval: int
    weight: float = 0.0
    min_gain: float | None = None

    def layer_time_s(self, phy2log_P: np.ndarray, load_E: np.ndarray) -> float:
        """Modelled per-iteration expert time of the most loaded GPU under ``phy2log_P``."""
        return float(gpu_loads_G(phy2log_P, load_E, self.slots_per_rank).max()
                     * self.load_scale * self.token_time_s)

    def migration_time_s(self, phy2log_P: np.ndarray, previous_P: np.ndarray | None) -> float:
        """Seconds to fill the slots that changed since ``previous_P`` (0 without one)."""
        if previous_P is None:
            return 0.0
        intra_G, inter_G = incoming_slots_G(previous_P, phy2log_P, self.slots_per_rank,
                                            self.gpus_per_node)
        worst = max(float(intra_G.max(initial=0)) / self.intra_Bps,
                    float(inter_G.max(initial=0)) / self.inter_Bps)
        return worst * self.slot_bytes

    def objective_s(self, phy2log_P: np.ndarray, previous_P: np.ndarray | None,
                    load_E: np.ndarray) -> float:
        """``J = layer_time + weight · migration_time / interval`` (seconds per iteration)."""
        return (self.layer_time_s(phy2log_P, load_E)
                + self.weight * self.migration_time_s(phy2log_P, previous_P) / self.interval)

    def best(self, candidates: list[np.ndarray], previous_P: np.ndarray | None,
             load_E: np.ndarray) -> int:
        """Index of the candidate with the lowest objective (the first one on ties)."""
        scores = [self.objective_s(c, previous_P, load_E) for c in candidates]
        return int(np.argmin(scores))

    def pays_off(self, new_P: np.ndarray, previous_P: np.ndarray | None,
                 load_E: np.ndarray) -> bool:
        """``min_gain`` test: True when it is off, or when the time the new plan saves over
        the interval is at least ``min_gain`` × its migration time."""
        if self.min_gain is None or previous_P is None:
            return True
        saved_s = (self.layer_time_s(previous_P, load_E) - self.layer_time_s(new_P, load_E))
        return saved_s * self.interval >= self.min_gain * self.migration_time_s(new_P,
                                                                                previous_P)

    def gain_info(self, new_P: np.ndarray, previous_P: np.ndarray | None,
                  load_E: np.ndarray) -> dict:
        """Modelled figures of one layer's choice, for ``Decision.info``."""
        return {"layer_time_s": self.layer_time_s(new_P, load_E),
                "migration_time_s": self.migration_time_s(new_P, previous_P)}


def model_for(model: ModelSpec, cluster: Cluster, *, slots_per_rank: int, interval: int,
              load_iterations: float, slot_bytes: float, weight: float,
              min_gain: float | None) -> MigrationModel:
    """A :class:`MigrationModel` for ``model`` on ``cluster``; ``load_iterations`` is how many
    iterations the policy's load sums (the load is divided by it)."""
    hw = cluster.hardware
    per_slot = model.tokens_per_rank * model.top_k / max(slots_per_rank, 1)
    eff = float(hw.gemm_efficiency(max(per_slot, 1.0)))
    token_time_s = 3.0 * model.expert_flops_per_token / (hw.peak_flops * eff)
    return MigrationModel(token_time_s=token_time_s, load_scale=1.0 / max(load_iterations, 1.0),
                          slot_bytes=float(slot_bytes), intra_Bps=cluster.intra.bw_GBps * 1e9,
                          inter_Bps=cluster.inter.bw_GBps * 1e9,
                          slots_per_rank=slots_per_rank, gpus_per_node=cluster.gpus_per_node,
                          interval=max(int(interval), 1), weight=float(weight),
                          min_gain=min_gain)


def gpu_loads_G(phy2log_P: np.ndarray, load_E: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Load per rank, each expert's load split evenly over its replicas (empty slots: 0)."""
    row = np.asarray(phy2log_P)
    load = np.asarray(load_E, dtype=np.float64)
    filled = row >= 0
    cnt = np.bincount(row[filled], minlength=load.shape[0])
    per_copy = load / np.maximum(cnt, 1)
    slot = np.where(filled, per_copy[np.maximum(row, 0)], 0.0)
    return slot.reshape(-1, slots_per_rank).sum(axis=1)


def incoming_slots_G(previous_P: np.ndarray, phy2log_P: np.ndarray, slots_per_rank: int,
                     gpus_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots each rank must receive over the intra- and the inter-node link: ``([G], [G])``.

    A changed slot costs nothing when its rank held that expert before, goes intra-node when a
    previous holder shares its node, else inter-node (the lowering's source choice)."""
    prev, new = np.asarray(previous_P), np.asarray(phy2log_P)
    G = new.shape[0] // slots_per_rank
    E = int(max(prev.max(initial=-1), new.max(initial=-1))) + 1
    intra, inter = np.zeros(G, dtype=np.int64), np.zeros(G, dtype=np.int64)
    changed = np.flatnonzero((new != prev) & (new >= 0))
    if not len(changed) or E == 0:
        return intra, inter
    rank_P = np.arange(len(prev)) // slots_per_rank
    held = prev >= 0
    on_rank = np.zeros((G, E), dtype=bool)
    on_rank[rank_P[held], prev[held]] = True
    N = max(G // gpus_per_node, 1)
    on_node = on_rank.reshape(N, -1, E).any(axis=1)
    r, e = rank_P[changed], new[changed]
    local = ~on_rank[r, e]
    same_node = on_node[r // gpus_per_node, e] & local
    np.add.at(intra, r[same_node], 1)
    np.add.at(inter, r[local & ~same_node], 1)
    return intra, inter


def replan_due(history, previous_info: dict | None, interval: int,
               key: str = "last_replan") -> bool:
    """Whether a periodic re-plan is due at ``history.iteration``.

    Every re-planning policy re-plans as soon as it has history (iteration 0 has none), then
    every ``interval`` iterations counted from that re-plan: due when there is history and
    either no re-plan has happened yet (``previous_info[key]`` missing or None) or ``interval``
    iterations have passed since the last one."""
    if history.past_TLRE.shape[0] == 0:
        return False
    last = (previous_info or {}).get(key)
    return last is None or history.iteration - int(last) >= interval


# --------------------------------------------------------------------------------------------
# relabelling a new plan to keep what already sits in place


def counts_GE(phy2log_P: np.ndarray, slots_per_rank: int, num_experts: int) -> np.ndarray:
    """Copies of each expert on each rank, ``[G, E]``."""
    row = np.asarray(phy2log_P)
    G = row.shape[0] // slots_per_rank
    out = np.zeros((G, num_experts), dtype=np.int64)
    rank = np.arange(row.shape[0]) // slots_per_rank
    filled = row >= 0
    np.add.at(out, (rank[filled], row[filled]), 1)
    return out


def rank_permutation(new_GE: np.ndarray, old_GE: np.ndarray, gpus_per_node: int,
                     keep_nodes: bool) -> np.ndarray:
    """``perm[i]``: the rank that new rank ``i``'s contents move to so that as much as possible
    stays where it is (a linear assignment maximising ``Σ_e new[i, e]·old[perm[i], e]``).

    ``keep_nodes``: ranks stay grouped by node (whole nodes are matched first, then the ranks
    within each matched pair), for plans whose node-level grouping matters (hierarchical EPLB,
    Hecate's owner map); otherwise any rank may take any rank's contents. Relabelling changes
    no GPU's load, only which GPU carries it."""
    from scipy.optimize import linear_sum_assignment

    G = new_GE.shape[0]
    g = min(gpus_per_node, G)
    if not keep_nodes or G // g <= 1:
        blocks = [(np.arange(G), np.arange(G))]
    else:
        N = G // g
        node_new = new_GE.reshape(N, g, -1).sum(axis=1).astype(np.float64)
        node_old = old_GE.reshape(N, g, -1).sum(axis=1).astype(np.float64)
        rows, cols = linear_sum_assignment(-(node_new @ node_old.T))
        blocks = [(np.arange(n * g, (n + 1) * g), np.arange(m * g, (m + 1) * g))
                  for n, m in zip(rows, cols, strict=True)]
    perm = np.empty(G, dtype=np.int64)
    new_f, old_f = new_GE.astype(np.float64), old_GE.astype(np.float64)   # BLAS, not int
    for src, dst in blocks:
        score = new_f[src] @ old_f[dst].T
        r, c = linear_sum_assignment(-score)
        perm[src[r]] = dst[c]
    return perm


def align_slots(new_P: np.ndarray, previous_P: np.ndarray, slots_per_rank: int,
                gpus_per_node: int, keep_nodes: bool) -> np.ndarray:
    """``new_P`` with its ranks relabelled (:func:`rank_permutation`) and, inside each rank,
    every expert the rank held before put back in a slot it held it in: the same per-GPU loads
    with the fewest changed slots this relabelling finds."""
    E = int(max(np.max(new_P, initial=-1), np.max(previous_P, initial=-1))) + 1
    S = slots_per_rank
    perm = rank_permutation(counts_GE(new_P, S, E), counts_GE(previous_P, S, E),
                            gpus_per_node, keep_nodes)
    G = len(perm)
    moved = np.empty((G, S), dtype=np.int64)
    moved[perm] = np.asarray(new_P).reshape(G, S)
    old = np.asarray(previous_P).reshape(G, S)
    out = np.empty_like(moved)
    for r in range(G):
        out[r] = _match_slots(moved[r], old[r])
    return out.ravel()


def _match_slots(new_S: np.ndarray, old_S: np.ndarray) -> np.ndarray:
    """Order ``new_S`` (one rank's experts) so that experts also in ``old_S`` keep old slots."""
    out = np.full(len(new_S), -2, dtype=np.int64)
    rest = []
    free = list(range(len(old_S)))
    for e in new_S.tolist():
        hit = next((j for j in free if old_S[j] == e), None)
        if hit is None:
            rest.append(e)
        else:
            out[hit] = e
            free.remove(hit)
    out[free] = rest
    return out
