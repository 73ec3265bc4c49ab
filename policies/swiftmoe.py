"""SwiftMoE (a.k.a. SYMI): adaptive per-iteration replication with a static 1/N optimizer.

Skiadopoulos et al., "Accelerating Mixture-of-Experts Training with Adaptive Expert Replication"
(arXiv 2504.19925). Each expert's optimizer state is split evenly over all ``N`` nodes (host
memory, CPU Adam) and never moves; the expert *weights* are re-placed every iteration.

Decision for iteration ``t`` (paper App. A.3), per layer, from the popularity of iteration
``t − 1`` (token assignments summed over its passes and source ranks):

- replica counts by :func:`~moesim.policies.primitives.replica_counts_swiftmoe`
  (goal / floor / diff / decrement-at-argmax / increment-at-argmin);
- slots filled contiguously (``[e]*cnt[e]`` concatenated, slot ``j`` of rank ``r`` at index
  ``r·S + j``), so a rank may hold several replicas of one expert, as in the paper;
- tokens of an expert split evenly over its replicas (routing ``even``);
- per-(source rank, slot) capacity ``ceil(cf · tokens_per_rank · k / (S·G))``: the paper's
  per-slot capacity is ``cf · tokens_per_batch / (S·G)`` with ``tokens_per_batch`` the whole
  pass's ``G · tokens_per_rank · k`` assignments; DeepSpeed's gates drop locally at each source
  before the dispatch, so each of the ``G`` sources gets a ``1/G`` share of a slot's capacity.

Iteration 0 (no history) uses the uniform goal ``G·S / E`` for every expert. ``Decision.info``
carries the optimizer-shard layout its lowering needs: node ``n`` owns elements
``[shard_bounds[n], shard_bounds[n+1])`` of every expert's flattened parameters (and their
Adam state), on the host when ``optimizer_on_host``.

Lowering (per iteration, the paper's §3 pipeline): an all-reduce of the E-length count vector
after each router; the usual 4 all-to-alls; expert grads all-reduced inside each replica group,
then each node's 1/N gradient slice of every expert pulled point-to-point to the GPU that drives
that slice (a replica on that GPU, else on its node, else holders round-robin); PCIe copy down,
CPU Adam on the shards, PCIe copy up; and at the start of the next iteration the updated slices
sent point-to-point to every holder of the *new* placement — that send is the re-layout. Slice
``n`` of expert ``e`` is driven by GPU ``n·g + e mod g`` of node ``n`` (the paper has one GPU
per node; with more, the node's GPUs share its slices). Dense parameters use a GPU ZeRO-1 step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moesim.ops import AllReduce, HostCompute, HostCopy, SendRecv
from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_capacity_factor,
    check_ints,
    check_slots_cover,
    register_policy,
)
from moesim.policies.primitives import (
    contiguous_slots,
    dense_params_R,
    emit_gpu_optimizer,
    moved_count_L,
    replica_counts_swiftmoe,
    slot_capacity,
    slot_params_R,
    window_load_LE,
)
from moesim.specs import Cluster, ModelSpec


def optimizer_shard_bounds(params_per_expert: int, num_nodes: int) -> list[int]:
    """Element offsets ``[N + 1]`` of the 1/N slices: node ``n`` owns ``[b[n], b[n+1])``."""
    return [int(params_per_expert * n // num_nodes) for n in range(num_nodes + 1)]


def shard_gpu_NE(num_experts: int, num_nodes: int, gpus_per_node: int) -> np.ndarray:
    """GPU that drives slice ``n`` of expert ``e`` (its PCIe link and host optimizer thread):
    ``n·g + e mod g`` — node ``n``'s GPUs share the node's slices round-robin. ``[N, E]``."""
    return (np.arange(num_nodes)[:, None] * gpus_per_node
            + (np.arange(num_experts) % gpus_per_node)[None, :])


def holders_RE(phy2log_P: np.ndarray, num_ranks: int, num_experts: int) -> np.ndarray:
    """Bool ``[R, E]``: rank ``r`` holds a replica of expert ``e``."""
    has = np.zeros((num_ranks, num_experts), dtype=bool)
    S = len(phy2log_P) // num_ranks
    filled = phy2log_P >= 0
    has[(np.arange(len(phy2log_P)) // S)[filled], phy2log_P[filled]] = True
    return has


def grad_pulls(has_RE: np.ndarray, shard_NE: np.ndarray, gpus_per_node: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Who sends slice ``n`` of expert ``e``'s gradient to its shard GPU: a replica on that
    GPU (no transfer), else one on the same node, else holders round-robin over ``n``.

    Returns ``(src_K, dst_K, expert_K, node_K)`` of the transfers that cross GPUs."""
    R, E = has_RE.shape
    N = shard_NE.shape[0]
    e_NE = np.broadcast_to(np.arange(E), (N, E))
    n_NE = np.broadcast_to(np.arange(N)[:, None], (N, E))
    on_node_NgE = has_RE.reshape(N, gpus_per_node, E)
    local_NE = n_NE * gpus_per_node + np.argmax(on_node_NgE, axis=1)
    holders_sorted_RE = np.argsort(~has_RE, axis=0, kind="stable")   # holders first
    cnt_E = np.maximum(has_RE.sum(axis=0), 1)
    remote_NE = holders_sorted_RE[n_NE % cnt_E[None, :], e_NE]
    src_NE = np.where(on_node_NgE.any(axis=1), local_NE, remote_NE)
    cross = src_NE != shard_NE
    return src_NE[cross], shard_NE[cross], e_NE[cross], n_NE[cross]


def weight_sends(has_RE: np.ndarray, shard_NE: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every holder of expert ``e`` receives slice ``n`` from its shard GPU (once per rank,
    however many replicas it holds). Returns ``(src_K, dst_K, expert_K, node_K)``."""
    ranks, experts = np.nonzero(has_RE)
    N = shard_NE.shape[0]
    src_NK = shard_NE[:, experts]
    dst_NK = np.broadcast_to(ranks, src_NK.shape)
    cross = src_NK != dst_NK
    return (src_NK[cross], dst_NK[cross], np.broadcast_to(experts, src_NK.shape)[cross],
            np.broadcast_to(np.arange(N)[:, None], src_NK.shape)[cross])


def handled_params_R(model: ModelSpec, cluster: Cluster) -> np.ndarray:
    """Expert parameters (all layers) whose 1/N slices each GPU drives: ``[R]``."""
    N, g = cluster.num_nodes, cluster.gpus_per_node
    shard_NE = shard_gpu_NE(model.num_experts, N, g)
    slice_N = np.diff(optimizer_shard_bounds(model.params_per_expert, N)).astype(np.float64)
    per_layer_R = np.bincount(shard_NE.ravel(), weights=np.repeat(slice_N, model.num_experts),
                              minlength=cluster.world_size)
    return per_layer_R * model.num_layers


@register_policy("swiftmoe")
class SwiftMoE(Policy):
    """Per-iteration replica counts from last iteration's popularity; contiguous slots."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank``: expert slots per GPU (paper: 4). ``capacity_factor``: per-slot
        capacity factor; ``None`` = dropless, the default of every policy here (the paper runs
        1.0: pass ``capacity_factor=1.0`` for its set-up). ``optimizer_on_host``: keep the 1/N
        optimizer shards in host memory with a CPU optimizer (paper) instead of on the GPU."""

        slots_per_rank: int = 4
        capacity_factor: float | None = None
        optimizer_on_host: bool = True

        def __post_init__(self) -> None:
            check_ints("swiftmoe", self, {"slots_per_rank": 1})  # the paper uses 4
            check_capacity_factor("swiftmoe", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Placement ``[L, G·S]`` for ``history.iteration`` from the previous iteration's load."""
        start = time.perf_counter()
        S, G, E, L = self.config.slots_per_rank, cluster.world_size, model.num_experts, \
            model.num_layers
        check_slots_cover("swiftmoe", S, G, E)
        pop_LE = window_load_LE(history, 1, L, E)
        phy2log_LP = np.stack([contiguous_slots(replica_counts_swiftmoe(pop_LE[l], S * G), S * G)
                               for l in range(L)])
        placement = Placement(phy2log_LP, G, S, E)
        prev = history.previous.placement.phy2log_LP if history.previous else None
        info = {
            "optimizer_on_host": self.config.optimizer_on_host,
            "optimizer_shard_nodes": cluster.num_nodes,
            "optimizer_shard_bounds": optimizer_shard_bounds(model.params_per_expert,
                                                             cluster.num_nodes),
            "moved_slots_L": moved_count_L(phy2log_LP, prev).tolist(),
        }
        cap = slot_capacity(self.config.capacity_factor, model.tokens_per_rank, model.top_k,
                            S * G)
        return Decision(placement, routing="even", slot_capacity=cap,
                        planner_time_s=time.perf_counter() - start, info=info)

    # -- lowering hooks ---------------------------------------------------------------------
    def _slices(self, ctx) -> tuple[np.ndarray, np.ndarray]:
        """``(shard_NE, slice_params_N)`` of this cluster."""
        N, g = ctx.cluster.num_nodes, ctx.cluster.gpus_per_node
        bounds = optimizer_shard_bounds(ctx.model.params_per_expert, N)
        return shard_gpu_NE(ctx.model.num_experts, N, g), np.diff(bounds).astype(np.float64)

    def lower_relayout(self, ctx) -> list[int]:
        """The optimizer's updated 1/N weight slices go point-to-point to every rank that holds
        the expert in *this* iteration's placement; that send is SwiftMoE's re-layout (none
        before the first iteration: the initial weights are loaded with the model)."""
        if ctx.previous is None:
            return []
        shard_NE, slice_N = self._slices(ctx)
        out = []
        for l in range(ctx.placement.num_layers):
            has = holders_RE(ctx.placement.layer(l), ctx.world, ctx.model.num_experts)
            src, dst, exp, node = weight_sends(has, shard_NE)
            if len(src):
                out.append(ctx.add(SendRecv(
                    phase="relayout", direction="step", layer=l, src_N=src, dst_N=dst,
                    bytes_N=slice_N[node] * ctx.model.bytes_weight, experts_N=exp,
                    label="weight_slices")))
        return out

    def lower_after_route(self, ctx, micro_batch: int, layer: int) -> list[int]:
        """All-reduce of the E-length expert count vector (int64) after the router."""
        if ctx.world < 2:
            return []
        route = len(ctx.program.ops) - 1
        return [ctx.add(AllReduce(
            phase="route", layer=layer, micro_batch=micro_batch, deps=(route,),
            groups=(np.arange(ctx.world),), bytes_G=np.array([8.0 * ctx.model.num_experts]),
            experts_G=np.array([-1]), label="expert_counts"))]

    def lower_grad_sync(self, ctx) -> list[int]:
        """Replica-group all-reduce of expert grads, dense all-reduce, then every node pulls
        its 1/N slice of each expert's gradient to the GPU that drives that slice."""
        synced = ctx.emit_expert_grad_allreduce() + ctx.emit_dense_grad_allreduce()
        deps = tuple(synced) or ctx.step_deps()
        shard_NE, slice_N = self._slices(ctx)
        out = list(synced)
        for l in range(ctx.placement.num_layers):
            has = holders_RE(ctx.placement.layer(l), ctx.world, ctx.model.num_experts)
            src, dst, exp, node = grad_pulls(has, shard_NE, ctx.cluster.gpus_per_node)
            if len(src):
                out.append(ctx.add(SendRecv(
                    phase="grad_sync", direction="step", layer=l, deps=deps, src_N=src,
                    dst_N=dst, bytes_N=slice_N[node] * ctx.model.bytes_grad, experts_N=exp,
                    label="grad_slices")))
        return out

    def lower_optimizer(self, ctx) -> list[int]:
        """Optimizer on the 1/N shards: with ``optimizer_on_host``, copy the grad slices to
        the host, CPU Adam, copy the updated weight slices back (they are sent to the next
        placement by the next iteration's re-layout); else a GPU Adam on the shards. The dense
        part is a ZeRO-1 GPU step either way."""
        m = ctx.model
        sync = tuple(i for i, op in enumerate(ctx.program.ops) if op.phase == "grad_sync")
        deps = sync or ctx.step_deps()
        handled_R = handled_params_R(m, ctx.cluster)
        if not self.config.optimizer_on_host:
            return emit_gpu_optimizer(ctx, handled_R, deps, label="adam_shards")
        down = ctx.add(HostCopy(phase="optimizer", direction="step", deps=deps,
                                bytes_R=handled_R * m.bytes_grad, to_host=True,
                                label="grad_slices_d2h"))
        step = ctx.add(HostCompute(phase="optimizer", direction="step", deps=(down,),
                                   bytes_R=handled_R * m.bytes_optim, label="cpu_adam"))
        up = ctx.add(HostCopy(phase="optimizer", direction="step", deps=(step,),
                              bytes_R=handled_R * m.bytes_weight, to_host=False,
                              label="weight_slices_h2d"))
        return [down, step, up] + emit_gpu_optimizer(ctx, np.zeros(ctx.world), deps,
                                                     label="adam_dense")

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """GPU: every slot's weights and grads, the dense ZeRO-1 shard (and the expert
        shards when the optimizer stays on the GPU). Host: the expert optimizer shards."""
        R = cluster.world_size
        experts_R = slot_params_R(decision.placement, model.params_per_expert)
        dense = model.num_layers * model.dense_params
        shards_R = handled_params_R(model, cluster) * model.bytes_optim
        on_host = self.config.optimizer_on_host
        gpu = {"weights": (experts_R + dense) * model.bytes_weight,
               "grads": (experts_R + dense) * model.bytes_grad,
               "optimizer": dense_params_R(model, R) * model.bytes_optim
               + (0.0 if on_host else shards_R)}
        host = {"optimizer": shards_R} if on_host else {}
        return gpu, host
