"""Hecate's FSSDP execution: the ops and memory a Hecate decision implies.

Qing et al., "Hecate: Unlocking Efficient Sparse Model Training via Fully Sharded Sparse Data
Parallelism" (arXiv 2502.02581). :class:`FSSDPLowering` is mixed into the policy,
:class:`moesim.policies.hecate.Hecate`, which decides the placement (owners and this iteration's
materialised replicas; the per-layer algorithms are in :mod:`moesim.policies.hecate_plan`). The
hooks read only the decision: its slot rows, where slots ``[0, O)`` of a device hold the experts
it owns and slots ``[O, S)`` the materialised ones, and ``info["owners_LE"]``,
``info["owned_slots"]`` (``O``) and ``info["rematerialize"]``.

Per layer, grouped ``Broadcast``s from owners to the devices materialising each expert (the
SparseAllGather: phase ``param_gather``, prefetch stream, issued before the layer's attention so
they overlap it) once per iteration — per micro-batch forward and backward with
``rematerialize`` — and grouped ``Reduce``s of those replicas' gradients back to the owners after
the layer's last backward (the SparseReduceScatter); each grouped op is one round of pairwise
disjoint rank groups. Owners run the optimizer for the experts they own (dense part ZeRO-1); a
re-shard moves weights + optimizer state of experts whose owner changed. Memory: owned experts
hold weights, grads and optimizer state; the materialised replicas weights and grads, of every
layer, or with ``rematerialize`` of the largest layer only (the paper: −90% extra memory).

Shape legend: ``L`` layers, ``E`` experts, ``G`` / ``R`` devices, ``N`` moved experts, ``O``
owned slots per device, ``S`` slots per device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moesim.ops import Broadcast, Reduce, SendRecv
from moesim.placement import Decision
from moesim.policies.primitives import dense_params_R, emit_gpu_optimizer
from moesim.specs import Cluster, ModelSpec

if TYPE_CHECKING:  # the lowering imports nothing from policies; hooks only receive its context
    from moesim.lowering import LoweringContext


class FSSDPLowering:
    """The :class:`~moesim.policies.base.Policy` lowering hooks and memory footprint of FSSDP
    (mixed in before ``Policy``); they use the decision's ``info`` only, no config."""

    def lower_relayout(self, ctx: LoweringContext) -> list[int]:
        """At a re-shard, each expert whose owner changed moves its weights and optimizer
        state, ``P·(b_w + b_o)``, from the old owner to the new one (``SendRecv`` per layer).
        Materialised replicas need no re-layout: they are broadcast afresh every iteration."""
        prev = ctx.previous.info.get("owners_LE") if ctx.previous is not None else None
        if prev is None or np.shape(prev) != np.shape(ctx.decision.info["owners_LE"]):
            return []
        new, old = np.asarray(ctx.decision.info["owners_LE"]), np.asarray(prev)
        m, out = ctx.model, []
        for l in range(new.shape[0]):
            moved = np.flatnonzero(new[l] != old[l])
            if len(moved):
                out.append(ctx.add(SendRecv(
                    phase="relayout", direction="step", layer=l, src_N=old[l, moved],
                    dst_N=new[l, moved], bytes_N=np.full(len(moved), m.params_per_expert
                                                         * (m.bytes_weight + m.bytes_optim)),
                    experts_N=moved, label="reshard")))
        return out

    def lower_param_gather(self, ctx: LoweringContext, micro_batch: int, layer: int,
                           direction: str) -> list[int]:
        """SparseAllGather: grouped ``Broadcast``s from each materialised expert's owner to
        the devices materialising it, on the prefetch stream (overlapping the attention).
        Once per iteration in the first forward (replicas live until their grads are
        reduced); with ``rematerialize``, in every micro-batch's forward and backward."""
        remat = ctx.decision.info.get("rematerialize", False)
        if ctx.world < 2 or not (remat or (direction == "fwd" and micro_batch == 0)):
            return []
        groups = materialised_groups(ctx.decision, layer)
        return [ctx.add(Broadcast(
            phase="param_gather", direction=direction, stream="prefetch", layer=layer,
            micro_batch=micro_batch, groups=tuple(g), roots_G=np.array(r),
            bytes_G=np.full(len(g), ctx.model.expert_weight_bytes), experts_G=np.array(e),
            label="sparse_allgather")) for g, r, e in _disjoint_rounds(groups)]

    def lower_layer_grads(self, ctx: LoweringContext, layer: int) -> list[int]:
        """SparseReduceScatter: grouped ``Reduce``s of the materialised replicas' gradients to
        their owners after the layer's last backward."""
        if ctx.world < 2:
            return []
        groups = materialised_groups(ctx.decision, layer)
        grad_bytes = ctx.model.params_per_expert * ctx.model.bytes_grad
        return [ctx.add(Reduce(
            phase="grad_sync", direction="bwd", layer=layer, deps=(ctx.layer_bwd_done[layer],),
            groups=tuple(g), roots_G=np.array(r), bytes_G=np.full(len(g), grad_bytes),
            experts_G=np.array(e), label="sparse_reduce_scatter"))
            for g, r, e in _disjoint_rounds(groups)]

    def lower_grad_sync(self, ctx: LoweringContext) -> list[int]:
        """Owners hold each expert's only optimizer copy (replica grads were reduced per
        layer), so only the dense grads are all-reduced."""
        return ctx.emit_dense_grad_allreduce() + list(ctx.layer_grad_ops)

    def lower_optimizer(self, ctx: LoweringContext) -> list[int]:
        """GPU Adam over each owner's experts plus its ZeRO-1 dense shard."""
        return emit_gpu_optimizer(ctx, _owned_params_R(ctx.decision, ctx.model),
                                  ctx.optimizer_deps(), label="adam_owners")

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Owned experts: weights, grads, optimizer state. Materialised replicas: weights and
        grads of every layer's extra slots (``buffers`` / ``grads``), or, with
        ``rematerialize``, of the largest layer only (freed after use); dense as ZeRO-1."""
        G, pl = cluster.world_size, decision.placement
        P = float(model.params_per_expert)
        owned_R = _owned_params_R(decision, model)
        O = int(decision.info["owned_slots"])
        extra_LR = (pl.phy2log_LP.reshape(pl.num_layers, G, -1)[:, :, O:] >= 0).sum(2)
        extra_R = (extra_LR.max(0) if decision.info.get("rematerialize") else extra_LR.sum(0))
        dense = model.num_layers * model.dense_params
        gpu = {"weights": (owned_R + dense) * model.bytes_weight,
               "grads": (owned_R + dense + extra_R * P) * model.bytes_grad,
               "optimizer": owned_R * model.bytes_optim
               + dense_params_R(model, G) * model.bytes_optim,
               "buffers": extra_R * P * model.bytes_weight}
        return gpu, {}


def materialised_groups(decision: Decision, layer: int) -> list[tuple[np.ndarray, int, int]]:
    """``[(ranks, owner, expert)]`` for every expert of ``layer`` materialised off its owner:
    the owner plus the devices holding an extra copy (owner first)."""
    pl = decision.placement
    O = int(decision.info["owned_slots"])
    owners = np.asarray(decision.info["owners_LE"])[layer]
    extra = pl.layer(layer).reshape(pl.num_ranks, -1)[:, O:]
    out = []
    for e in np.unique(extra[extra >= 0]):
        holders = np.flatnonzero((extra == e).any(1))
        out.append((np.concatenate(([owners[e]], holders[holders != owners[e]])),
                    int(owners[e]), int(e)))
    return out


def _disjoint_rounds(groups: list[tuple[np.ndarray, int, int]]
                     ) -> list[tuple[list[np.ndarray], list[int], list[int]]]:
    """Pack ``(ranks, root, expert)`` groups first-fit into rounds of pairwise disjoint groups
    (one grouped collective op per round): ``[(groups, roots, experts)]``."""
    rounds: list[tuple[list, list, list, set]] = []
    for ranks, root, e in groups:
        members = set(ranks.tolist())
        for gs, rs, es, used in rounds:
            if not used & members:
                gs.append(ranks)
                rs.append(root)
                es.append(e)
                used |= members
                break
        else:
            rounds.append(([ranks], [root], [e], members))
    return [(gs, rs, es) for gs, rs, es, _ in rounds]


def _owned_params_R(decision: Decision, model: ModelSpec) -> np.ndarray:
    """Expert parameters each device owns, all layers: ``[R]``."""
    pl = decision.placement
    owners = np.asarray(decision.info["owners_LE"]).ravel()
    return np.bincount(owners, minlength=pl.num_ranks) * float(model.params_per_expert)
