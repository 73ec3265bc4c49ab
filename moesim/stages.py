"""Pipeline stages as data: which world ranks and which layers each stage owns.

:func:`plan_layout` checks a :class:`~moesim.layout.ParallelLayout` against a world, a cluster
shape, a model and the iteration's micro-batch count, and returns a :class:`LayoutPlan`: one
:class:`Stage` per pipeline rank (contiguous world ranks, Megatron-Core's rank order), its layer
chunks, and the groups the lowering emits collectives over. Every bad combination is refused
with one line that names the constraint and the fix.

Layers are numbered as transformer layers ``0..N−1``, the model's dense layers first
(``num_dense_layers``, e.g. DeepSeek-V3's first 3), then its MoE layers; MoE layer ``j`` is
transformer layer ``num_dense_layers + j`` and row ``j`` of the trace and the placement. The
layers are cut into ``pp·vpp`` contiguous chunks as evenly as possible (earlier chunks take the
remainder, as ``numpy.array_split`` does); chunk ``j`` lives on stage ``j mod pp`` as its virtual
chunk ``j // pp`` (Megatron's interleaved assignment).

Shape legend: ``n`` ranks per stage, ``t`` TP, ``c`` CP, ``d`` DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.layout import ParallelLayout
from moesim.specs import Cluster, ModelSpec


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: world ranks ``first_rank .. first_rank + num_ranks − 1`` and its
    virtual chunks' transformer layers (``chunks[v]``, in order)."""

    index: int
    first_rank: int
    num_ranks: int
    chunks: tuple[tuple[int, ...], ...]
    num_dense_layers: int

    @property
    def ranks(self) -> np.ndarray:
        return np.arange(self.first_rank, self.first_rank + self.num_ranks)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for chunk in self.chunks for layer in chunk)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """MoE layer indices (trace / placement rows) this stage owns, in order."""
        return tuple(layer - self.num_dense_layers for layer in self.layers
                     if layer >= self.num_dense_layers)


@dataclass(frozen=True)
class LayoutPlan:
    """A layout resolved for one world: its stages and groups."""

    layout: ParallelLayout
    world: int
    gpus_per_node: int
    stages: tuple[Stage, ...]
    num_dense_layers: int
    num_moe_layers: int

    @property
    def stage_ranks(self) -> int:
        """Ranks per stage (``world / pp``): the world a policy places experts over."""
        return self.world // self.layout.pp

    def stage_of_layer(self, layer: int) -> tuple[Stage, int]:
        """``(stage, virtual chunk)`` holding transformer layer ``layer``."""
        for stage in self.stages:
            for v, chunk in enumerate(stage.chunks):
                if layer in chunk:
                    return stage, v
        raise IndexError(layer)

    def tp_groups(self, stage: Stage) -> list[np.ndarray]:
        """TP groups of ``stage`` (consecutive ranks; Megatron's TP-fastest order)."""
        t = self.layout.tp
        return [stage.first_rank + np.arange(g * t, (g + 1) * t)
                for g in range(stage.num_ranks // t)]

    def cp_groups(self, stage: Stage) -> list[np.ndarray]:
        """CP rings of ``stage``: ranks of one (tp index, dp index), stride ``t``."""
        t, c = self.layout.tp, self.layout.cp
        d = stage.num_ranks // (t * c)
        return [stage.first_rank + tp_i + t * (np.arange(c) + c * dp_i)
                for dp_i in range(d) for tp_i in range(t)]

    def dp_groups(self, stage: Stage) -> list[np.ndarray]:
        """Dense-gradient groups of ``stage``: ranks holding the same TP shard (DP × CP, as
        Megatron's gradient reduction and distributed optimizer span both)."""
        t = self.layout.tp
        return [stage.first_rank + np.arange(tp_i, stage.num_ranks, t) for tp_i in range(t)]


def view_cluster(cluster: Cluster, num_ranks: int) -> Cluster:
    """The cluster a policy sees for one stage of ``num_ranks`` contiguous ranks: the cluster
    itself when the stage is the world, else the same hardware reshaped to the stage."""
    if num_ranks == cluster.world_size:
        return cluster
    gpn = cluster.gpus_per_node
    if num_ranks % gpn == 0:
        return cluster.replace(num_nodes=num_ranks // gpn)
    return cluster.replace(num_nodes=1, gpus_per_node=num_ranks)


def plan_layout(layout: ParallelLayout, cluster: Cluster, model: ModelSpec,
                micro_batches: int, policy_spans_stage: bool = True) -> LayoutPlan:
    """Check ``layout`` on ``cluster`` for ``model`` and cut it into stages (module docstring).

    ``policy_spans_stage``: the policy places experts over every rank of a stage (all but
    static EP with a smaller ``ep_size``), which makes EP = ranks per stage / etp."""
    L = layout
    W, gpn = cluster.world_size, cluster.gpus_per_node
    _divides("tp·cp·pp", L.tp * L.cp * L.pp, W, "the world size", f"{W} GPUs")
    n = W // L.pp
    if n % gpn and gpn % n:
        raise MoesimError(f"parallel layout: {n} ranks per pipeline stage (world {W} / pp "
                          f"{L.pp}) must be a multiple or a divisor of {gpn} GPUs per node; "
                          "change pp or the node count")
    _divides("etp", L.etp, n, "the ranks per stage", f"{n}")
    ep = L.ep if L.ep is not None else (n // L.etp if policy_spans_stage else None)
    if ep is not None:
        _divides("ep·etp", ep * L.etp, n, "the ranks per stage", f"{n} (world / pp)")
    for name, size in (("tp", L.tp), ("etp", L.etp)):
        if size > 1 and not L.tp_cross_node and (size > gpn or gpn % size):
            raise MoesimError(f"parallel layout: {name}={size} does not fit in a node of {gpn} "
                              f"GPUs; keep {name} a divisor of {gpn}, or set tp_cross_node=true "
                              "to accept TP over the network")
    if L.tp > 1 and not L.sp and ((ep or 1) > 1 or L.etp > 1):
        raise MoesimError(f"parallel layout: tp={L.tp} with expert parallelism needs sp=true "
                          "(Megatron-Core: MoE with EP or expert TP under TP must use sequence "
                          "parallelism)")
    if L.cp > 1 and model.seq_len % L.cp:
        raise MoesimError(f"parallel layout: cp={L.cp} must divide the sequence length "
                          f"{model.seq_len}")
    if L.pp_schedule == "interleaved" and micro_batches % L.pp:
        raise MoesimError(f"parallel layout: the interleaved schedule needs the micro-batches "
                          f"per iteration ({micro_batches}) to be a multiple of pp={L.pp}")
    dense = model.num_dense_layers if L.whole_model else 0
    total = dense + model.num_layers
    chunks_total = L.pp * L.vpp
    if total < chunks_total:
        raise MoesimError(f"parallel layout: {total} layers cannot fill pp·vpp = "
                          f"{chunks_total} chunks; lower pp or vpp")
    cuts = np.array_split(np.arange(total), chunks_total)
    stages = tuple(Stage(index=s, first_rank=s * n, num_ranks=n, num_dense_layers=dense,
                         chunks=tuple(tuple(int(x) for x in cuts[v * L.pp + s])
                                      for v in range(L.vpp)))
                   for s in range(L.pp))
    if L.recompute_num_layers is not None:
        shortest = min(len(c) for s in stages for c in s.chunks)
        if L.recompute_num_layers > shortest:
            raise MoesimError(f"parallel layout: recompute_num_layers="
                              f"{L.recompute_num_layers} exceeds the {shortest} layers of the "
                              "smallest stage chunk; lower it or leave it unset (all layers)")
    return LayoutPlan(layout=L, world=W, gpus_per_node=gpn, stages=stages,
                      num_dense_layers=dense, num_moe_layers=model.num_layers)


def _divides(what: str, size: int, total: int, of: str, total_text: str) -> None:
    if total % size:
        raise MoesimError(f"parallel layout: {what} = {size} does not divide {of} "
                          f"({total_text}); choose sizes whose product divides it")
