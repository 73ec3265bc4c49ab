"""Static expert parallelism (DeepSpeed-MoE / Megatron-Core): the baseline every paper beats.

Shape legend: ``L`` layers, ``E`` experts, ``G`` ranks, ``S = E / EP`` slots per rank,
``P = G·S`` slots.

- Placement (never changes): EP ranks hold the experts contiguously, expert ``e`` on EP-rank
  ``e // (E/EP)``; with ``G > EP`` the ``G/EP`` EP groups are expert-data-parallel (EDP)
  replicas of each other (rank ``r`` is EP-rank ``r % EP`` of EP group ``r // EP``), so
  ``phy2log[p] = p mod E``. Routing rule ``ep_group``: a source uses its own EP group's replica.
- Capacity per (source rank, expert), tokens over it are dropped before the dispatch:
  Megatron-Core ``ceil(T·k/E·cf)`` (``get_capacity(num_tokens=T·k, num_experts, cf)`` in
  ``megatron/core/transformer/moe/moe_utils.py``; dropless when ``cf`` is None, its default);
  DeepSpeed ``ceil(T/E·cf)``, with ``cf`` doubled by ``top2gating`` for top-2 and multiplied by
  ``k`` by ``topkgating`` for k > 2 (``deepspeed/moe/sharded_moe.py``).
- Per iteration (the :class:`~moesim.policies.base.Policy` default hooks): expert-grad
  all-reduce in each EDP group, dense-grad all-reduce over all ranks, ZeRO-1 optimizer.
- ``optimizer_on_host``: DeepSpeed ZeRO-1 with CPU offload (SwiftMoE's baseline): each rank's
  ZeRO-1 shard of Adam state lives in host memory; the step copies the shard's grads down over
  PCIe, runs CPU Adam, copies the updated weights up, then all-gathers as ZeRO-1 does.

This file is the worked example of the policy interface: a frozen ``Config`` validated in
``__post_init__``, a pure ``decide``, and no lowering overrides because static EP *is* the
default lowering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim import memory as memory_model
from moesim.errors import MoesimError
from moesim.ops import HostCompute, HostCopy
from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_capacity_factor,
    check_choice,
    check_ints,
    register_policy,
)
from moesim.specs import Cluster, ModelSpec

CAPACITY_RULES = ("megatron", "deepspeed")


def ep_size_for(requested: int | None, world: int, num_experts: int) -> int:
    """The EP degree: ``requested``, or ``min(world, E)``; it must divide both ``world`` and
    ``E``."""
    ep = min(world, num_experts) if requested is None else requested
    if ep <= 0 or world % ep or num_experts % ep:
        raise MoesimError(f"static_ep: ep_size={ep} must divide both the world size {world} "
                          f"and the expert count {num_experts}; pass --knob ep_size=N with such "
                          "an N")
    return ep


def expert_capacity(rule: str, capacity_factor: float | None, tokens_per_rank: int,
                    top_k: int, num_experts: int) -> int | None:
    """Tokens one source rank may send one expert per pass (see the module docstring)."""
    if capacity_factor is None:
        return None
    if rule == "megatron":
        return int(math.ceil(tokens_per_rank * top_k / num_experts * capacity_factor))
    cf = capacity_factor * (2 if top_k == 2 else top_k)
    return int(math.ceil(tokens_per_rank / num_experts * cf))


@register_policy("static_ep")
class StaticEP(Policy):
    """Contiguous expert parallelism with EDP replicas; the same decision every iteration."""

    repeats_structure = True  # its hooks emit nothing that depends on the counts

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``ep_size`` None → ``min(world, E)``; ``capacity_factor`` None → dropless;
        ``optimizer_on_host``: ZeRO-1 with CPU offload (DeepSpeed ``offload_optimizer``)."""

        ep_size: int | None = None
        capacity_factor: float | None = None
        capacity_rule: str = "megatron"
        optimizer_on_host: bool = False

        def __post_init__(self) -> None:
            check_ints("static_ep", self, {"ep_size": 1}, optional=("ep_size",))
            check_capacity_factor("static_ep", self.capacity_factor)
            check_choice("static_ep", "capacity_rule", self.capacity_rule, CAPACITY_RULES)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """The contiguous placement ``phy2log[l, p] = p mod E`` (the previous one if any)."""
        if history.previous is not None:
            return history.previous
        world, E = cluster.world_size, model.num_experts
        ep = ep_size_for(self.config.ep_size, world, E)
        S = E // ep
        row_P = np.arange(world * S, dtype=np.int64) % E
        placement = Placement(np.tile(row_P, (model.num_layers, 1)), world, S, E)
        cap = expert_capacity(self.config.capacity_rule, self.config.capacity_factor,
                              model.tokens_per_rank, model.top_k, E)
        return Decision(placement=placement, routing="ep_group", slot_capacity=cap,
                        info={"ep_size": ep})

    # -- lowering hooks (only the offloaded optimizer differs from the defaults) ------------
    def lower_optimizer(self, ctx) -> list[int]:
        """ZeRO-1 on the GPU (default), or with ``optimizer_on_host``: grads of the rank's
        shard down over PCIe, CPU Adam, updated weights up, then ZeRO-1's all-gathers."""
        if not self.config.optimizer_on_host:
            return ctx.emit_zero1_optimizer()
        m = ctx.model
        params_R = memory_model.optimizer_params_R(ctx.placement, m, ctx.world)
        down = ctx.add(HostCopy(phase="optimizer", direction="step", deps=ctx.optimizer_deps(),
                                bytes_R=params_R * m.bytes_grad, to_host=True,
                                label="grad_shard_d2h"))
        step = ctx.add(HostCompute(phase="optimizer", direction="step", deps=(down,),
                                   bytes_R=params_R * m.bytes_optim, label="cpu_adam"))
        up = ctx.add(HostCopy(phase="optimizer", direction="step", deps=(step,),
                              bytes_R=params_R * m.bytes_weight, to_host=False,
                              label="weight_shard_h2d"))
        return [down, step, up] + ctx.emit_param_allgather((up,))

    def memory_footprint(self, decision: Decision, model: ModelSpec, cluster: Cluster
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Static EP's footprint; with ``optimizer_on_host`` the ZeRO-1 shard is host memory."""
        gpu, host = memory_model.default_footprint(decision, model, cluster)
        if self.config.optimizer_on_host:
            host = {"optimizer": gpu.pop("optimizer")}
        return gpu, host
