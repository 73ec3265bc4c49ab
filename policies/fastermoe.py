"""FasterMoE: dynamic shadowing of hot experts on every GPU.

He et al., "FasterMoE: Modeling and Optimizing Training of Large-Scale Dynamic Pre-Trained
Models" (PPoPP'22). Experts live on their static-EP owner; per layer the hottest experts are
*shadowed*: their weights are broadcast to every GPU, each GPU computes its own tokens for them
locally, and the gradients are reduced back to the owner. Experts are considered hottest first,
and the next one is shadowed while the modelled layer time

    ``cost = 3·comp·B_comp + 4·feature_send·B_comm + Σ_shadowed model_send``

keeps falling (3: forward + 2× backward compute; 4: the four all-to-alls; ``B_comp`` the most
tokens any GPU computes, ``B_comm`` the most tokens any GPU sends or receives; ``comp`` seconds
per token of one expert, ``feature_send`` seconds per token on the wire, ``model_send`` seconds
to broadcast one expert's weights).

**Non-oracle variant.** FasterMoE decides after gating, from the counts of the pass it is about
to run; in moesim's terms that peeks at the current iteration (an oracle). ``fastermoe`` decides
iteration ``t`` from iteration ``t − 1``'s per-(source rank, expert) counts instead; iteration 0
shadows nothing. ``fastermoe_oracle`` is the published timing (current iteration's counts), kept
as an upper bound for the non-oracle variant.

Modelling: ``S = ceil(E/G) + max_shadow`` slots per GPU. The first ``ceil(E/G)`` hold the owners
(static EP: expert ``e`` in slot ``e``), the ``k``-th shadow slot of every GPU holds the ``k``-th
shadowed expert, except on its owner (already local: ``-1``); unused shadow slots are ``-1``.
Routing is ``local_first``, so a GPU's tokens for a shadowed expert stay on it. Bandwidth for
feature and model sends is the inter-node NIC's (intra-node on a single node); compute per
token uses the GEMM efficiency at the mean tokens per expert. Dropless by default (FastMoE).
``info``: ``shadowed_L`` (expert ids per layer), ``owner_E``, ``base_slots``.

Lowering: per layer, one broadcast per shadowed expert from its owner to all GPUs (prefetch
stream, first micro-batch, kept for the backward) and one reduce of its grads back to the owner
after the layer's last backward; owners alone hold optimizer state (GPU Adam), dense is ZeRO-1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import Broadcast, Reduce
from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_capacity_factor,
    check_ints,
    register_policy,
    sum_counts,
)
from moesim.policies.primitives import (
    dense_params_R,
    emit_gpu_optimizer,
    slot_capacity,
    slot_params_R,
)
from moesim.specs import Cluster, ModelSpec


@dataclass(frozen=True)
class ShadowCosts:
    """Seconds per token of expert compute and of feature send; seconds per model send."""

    comp_s: float
    feature_send_s: float
    model_send_s: float


def shadow_costs(model: ModelSpec, cluster: Cluster, tokens_per_expert: float) -> ShadowCosts:
    """FasterMoE's three cost terms for this model on this cluster."""
    hw = cluster.hardware
    eff = float(hw.gemm_efficiency(max(tokens_per_expert, 1.0)))
    bw = (cluster.inter if cluster.num_nodes > 1 else cluster.intra).bw_GBps * 1e9
    return ShadowCosts(comp_s=model.expert_flops_per_token / (hw.peak_flops * eff),
                       feature_send_s=model.token_bytes / bw,
                       model_send_s=model.expert_weight_bytes / bw)


def layer_cost(n_RE: np.ndarray, owner_E: np.ndarray, shadow_E: np.ndarray,
               costs: ShadowCosts) -> float:
    """Modelled time of one layer with the experts flagged in ``shadow_E`` (bool) shadowed."""
    R, E = n_RE.shape
    owned = ~shadow_E
    own_RE = owner_E[None, :] == np.arange(R)[:, None]              # [R, E] rank owns e
    comp_R = (n_RE.sum(0) * owned * own_RE).sum(1) + (n_RE * shadow_E).sum(1)
    remote_RE = n_RE * owned * ~own_RE                              # tokens leaving source
    send_R = remote_RE.sum(1)
    recv_R = np.bincount(owner_E, weights=remote_RE.sum(0), minlength=R)
    b_comm = max(float(send_R.max()), float(recv_R.max()))
    return (3 * costs.comp_s * float(comp_R.max()) + 4 * costs.feature_send_s * b_comm
            + costs.model_send_s * int(shadow_E.sum()))


def choose_shadows(n_RE: np.ndarray, owner_E: np.ndarray, costs: ShadowCosts,
                   max_shadow: int) -> list[int]:
    """Hottest first, shadow the next expert while the modelled cost falls."""
    E = n_RE.shape[1]
    shadow = np.zeros(E, dtype=bool)
    best = layer_cost(n_RE, owner_E, shadow, costs)
    chosen: list[int] = []
    for e in np.argsort(-n_RE.sum(0), kind="stable")[:max_shadow]:
        if n_RE[:, e].sum() == 0:
            break
        shadow[e] = True
        cost = layer_cost(n_RE, owner_E, shadow, costs)
        if not cost < best:
            shadow[e] = False
            break
        best = cost
        chosen.append(int(e))
    return chosen


def shadow_layout(num_experts: int, num_ranks: int, base_slots: int, max_shadow: int,
                  shadowed: list[int]) -> np.ndarray:
    """``phy2log_P`` with owners in the base slots and shadows in the rest (see module doc)."""
    S = base_slots + max_shadow
    table_GS = np.full((num_ranks, S), -1, dtype=np.int64)
    base = np.arange(num_ranks * base_slots)
    table_GS[:, :base_slots] = np.where(base < num_experts, base, -1).reshape(num_ranks,
                                                                              base_slots)
    for k, e in enumerate(shadowed):
        table_GS[:, base_slots + k] = e
        table_GS[e // base_slots, base_slots + k] = -1
    return table_GS.reshape(-1)


@register_policy("fastermoe")
class FasterMoE(Policy):
    """Shadow hot experts on every GPU, decided from the previous iteration's counts."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``max_shadow``: shadow slots per GPU (the most experts shadowed per layer).
        ``capacity_factor``: ``None`` = dropless."""

        max_shadow: int = 4
        capacity_factor: float | None = None

        def __post_init__(self) -> None:
            check_ints("fastermoe", self, {"max_shadow": 0})
            check_capacity_factor("fastermoe", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Placement ``[L, G·(ceil(E/G) + max_shadow)]``."""
        start = time.perf_counter()
        G, E, L = cluster.world_size, model.num_experts, model.num_layers
        base, K = -(-E // G), self.config.max_shadow
        owner_E = np.arange(E) // base
        mb = history.passes_per_iteration
        last_TLRE = self._counts_seen(history)
        shadowed_L: list[list[int]] = []
        for l in range(L):
            if last_TLRE is None or K == 0:
                shadowed_L.append([])
                continue
            n_RE = sum_counts(last_TLRE[:, l], 0).astype(np.float64)
            if n_RE.shape[0] != G:
                raise MoesimError(f"fastermoe: trace has {n_RE.shape[0]} source ranks, the "
                                  f"cluster {G}; spread the trace over the cluster's ranks")
            costs = shadow_costs(model, cluster, n_RE.sum() / (mb * E))
            shadowed_L.append(choose_shadows(n_RE, owner_E, costs, K))
        phy2log_LP = np.stack([shadow_layout(E, G, base, K, s) for s in shadowed_L])
        info = {"shadowed_L": shadowed_L, "owner_E": owner_E.tolist(), "base_slots": base}
        # capacity shares the owners' slots (FastMoE's expert capacity), not the shadow slots
        cap = slot_capacity(self.config.capacity_factor, model.tokens_per_rank, model.top_k,
                            G * base)
        return Decision(Placement(phy2log_LP, G, base + K, E), routing="local_first",
                        slot_capacity=cap, planner_time_s=time.perf_counter() - start, info=info)

    def _counts_seen(self, history: History) -> np.ndarray | None:
        """The passes the shadowing rule looks at: the previous iteration's (None at start)."""
        mb = history.passes_per_iteration
        return history.past_TLRE[-mb:] if history.past_TLRE.shape[0] >= mb else None

    # -- lowering hooks ---------------------------------------------------------------------
    def _shadows(self, ctx, layer: int) -> list[int]:
        return list(ctx.decision.info.get("shadowed_L", [[]] * (layer + 1))[layer])

    def lower_relayout(self, ctx) -> list[int]:
        """Owners never move; shadow slots are filled by this iteration's broadcasts."""
        return []

    def lower_param_gather(self, ctx, micro_batch: int, layer: int, direction: str) -> list[int]:
        """Broadcast each shadowed expert's weights from its owner to every GPU, once per
        iteration (first forward micro-batch; the copies stay for the backward), on the
        prefetch stream so they overlap the preceding work."""
        if direction != "fwd" or micro_batch != 0 or ctx.world < 2:
            return []
        owner_E = ctx.decision.info["owner_E"]
        out = []
        for e in self._shadows(ctx, layer):
            out.append(ctx.add(Broadcast(
                phase="param_gather", direction="fwd", stream="prefetch", layer=layer,
                micro_batch=0, groups=(np.arange(ctx.world),), roots_G=np.array([owner_E[e]]),
                bytes_G=np.array([ctx.model.expert_weight_bytes]), experts_G=np.array([e]),
                label="shadow_weights")))
        return out

    def lower_layer_grads(self, ctx, layer: int) -> list[int]:
        """Reduce each shadowed expert's gradients from every GPU back to its owner."""
        if ctx.world < 2:
            return []
        owner_E = ctx.decision.info["owner_E"]
        out = []
        for e in self._shadows(ctx, layer):
            out.append(ctx.add(Reduce(
                phase="grad_sync", direction="bwd", layer=layer,
                deps=(ctx.layer_bwd_done[layer],), groups=(np.arange(ctx.world),),
                roots_G=np.array([owner_E[e]]), bytes_G=np.array([ctx.model.params_per_expert
                                                                  * ctx.model.bytes_grad]),
                experts_G=np.array([e]), label="shadow_grads")))
        return out

    def lower_grad_sync(self, ctx) -> list[int]:
        """Owners hold the only optimizer copy (shadow grads were reduced per layer), so only
        the dense grads are all-reduced; it waits for the shadow reduces."""
        reduces = tuple(i for i, op in enumerate(ctx.program.ops) if op.label == "shadow_grads")
        return ctx.emit_dense_grad_allreduce() + list(reduces)

    def lower_optimizer(self, ctx) -> list[int]:
        """GPU Adam over each owner's experts (shadows are dropped) plus the dense shard."""
        # optimizer_deps: the dense all-reduce and the shadow reduces (the grad-sync ops)
        return emit_gpu_optimizer(ctx, self._owned_params_R(ctx.decision, ctx.model),
                                  ctx.optimizer_deps())

    def _owned_params_R(self, decision: Decision, model: ModelSpec) -> np.ndarray:
        """Expert parameters each rank owns (base slots, all layers): ``[R]``."""
        pl = decision.placement
        base = int(decision.info["base_slots"])
        owned = (pl.phy2log_LP.reshape(pl.num_layers, pl.num_ranks, -1)[:, :, :base] >= 0)
        return owned.sum(axis=(0, 2)) * float(model.params_per_expert)

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Weights and grads of owned and shadow slots; optimizer state of owned experts
        only; dense ZeRO-1."""
        slots_R = slot_params_R(decision.placement, model.params_per_expert)
        dense = model.num_layers * model.dense_params
        owned_R = self._owned_params_R(decision, model)
        gpu = {"weights": (slots_R + dense) * model.bytes_weight,
               "grads": (slots_R + dense) * model.bytes_grad,
               "optimizer": (owned_R + dense_params_R(model, cluster.world_size))
               * model.bytes_optim}
        return gpu, {}


@register_policy("fastermoe_oracle")
class FasterMoEOracle(FasterMoE):
    """FasterMoE as published: shadows chosen after gating from the current iteration's counts
    (an oracle in moesim's terms: it sees the passes it is about to run)."""

    oracle = True

    def _counts_seen(self, history: History) -> np.ndarray | None:
        return history.current_TLRE
