"""Static EP's per-iteration ops, which policies reuse from their lowering hooks (a mixin of
:class:`~moesim.lowering.LoweringContext`): expert and dense gradient synchronisation, the
ZeRO-1 optimizer step and its all-gathers, and the relayout transfers.

Expert collectives run over the groups of ranks holding replicas of one expert
(:meth:`~moesim.lowering.LoweringContext.replica_rounds`); under expert tensor parallelism
each expert's ``1/et`` shard is synchronised over its EDP group instead
(:meth:`~moesim.expert_tp.ExpertTPView.expert_sync_rounds`), moving ``1/et`` of the bytes.
"""

from __future__ import annotations

import numpy as np

from moesim import memory as memory_model
from moesim.ops import AllGather, AllReduce, Compute, ReduceScatter, SendRecv


class StaticEPOps:
    """The ``emit_*`` helpers (module docstring); they read the context's placement, model,
    layout and groups and append through :meth:`~moesim.stage_context.StageView.add`."""

    def emit_expert_grad_allreduce(self) -> list[int]:
        """All-reduce each expert's grads among the ranks holding it (with ``zero`` ≥ 1 a
        reduce-scatter: each replica keeps its optimizer shard's slice): per layer, rounds of
        disjoint groups (one expert per group, so the executor knows which tensor moves)."""
        m, out = self.model, []
        grad_bytes = m.params_per_expert * m.bytes_grad / self.layout.etp
        cls = ReduceScatter if self.layout.zero in (1, 2, 3) else AllReduce
        for l in range(self.placement.num_layers):
            for groups, experts in self.expert_sync_rounds(l):
                out.append(self.add(cls(
                    phase="grad_sync", direction="step", layer=l, deps=self.step_deps(),
                    groups=tuple(groups), bytes_G=np.full(len(groups), grad_bytes),
                    experts_G=np.array(experts, dtype=np.int64), label="expert_grads")))
        return out

    def emit_dense_grad_allreduce(self) -> list[int]:
        """Synchronise the stage's dense (non-expert) grads over data parallelism: one group
        per TP shard (all ranks without TP); an all-reduce, or with ``zero`` 1–2 a
        reduce-scatter (ZeRO-3 already reduce-scattered them layer by layer)."""
        m, zero = self.model, self.layout.zero
        nbytes = self.stage_dense_params() / self.layout.tp * m.bytes_grad
        if self.dp_size < 2 or nbytes <= 0 or zero == 3:
            return []
        cls = ReduceScatter if zero in (1, 2) else AllReduce
        groups = self.dp_groups
        return [self.add(cls(
            phase="grad_sync", direction="step", deps=self.step_deps(), groups=groups,
            bytes_G=np.full(len(groups), nbytes) if len(groups) > 1 else np.array([nbytes]),
            experts_G=np.full(len(groups), -1), label="dense_grads"))]

    def emit_zero1_optimizer(self, deps: tuple[int, ...] | None = None) -> list[int]:
        """ZeRO-1: Adam on each rank's shard (1/DP of dense, 1/replicas of each local expert;
        memory-bound: reads and writes master/m/v, reads the grad, writes the weight), then an
        all-gather of updated dense weights and of each replicated expert's weights."""
        m = self.model
        deps = self.optimizer_deps() if deps is None else deps
        if "optimizer_params" not in self._consts:
            self._consts["optimizer_params"] = self.expert_shard_params_R() \
                + self.dense_shard_params_R()
        params_R = self._consts["optimizer_params"]
        per_param = 2 * m.bytes_optim + m.bytes_grad + m.bytes_weight
        step = self.add(Compute(phase="optimizer", direction="step", kind="other", deps=deps,
                                flops_R=params_R * 10.0, bytes_R=params_R * per_param,
                                label="adam"))
        return [step] + self.emit_param_allgather((step,))

    def emit_param_allgather(self, deps: tuple[int, ...]) -> list[int]:
        """ZeRO-1's second half: all-gather the updated dense weights over all ranks and each
        replicated expert's weights over its holders (phase ``optimizer``)."""
        m, out = self.model, self.emit_dense_param_allgather(deps)
        if self.layout.zero in (0, 3):  # every replica updated its own copy / kept sharded
            return out
        for l in range(self.placement.num_layers):
            for groups, experts in self.expert_sync_rounds(l):
                out.append(self.add(AllGather(
                    phase="optimizer", direction="step", layer=l, deps=deps,
                    groups=tuple(groups),
                    bytes_G=np.full(len(groups), m.expert_weight_bytes / self.layout.etp),
                    experts_G=np.array(experts, dtype=np.int64), label="expert_params")))
        return out

    def emit_dense_param_allgather(self, deps: tuple[int, ...]) -> list[int]:
        """All-gather the updated dense weights over data parallelism (one group per TP
        shard); none without a sharded optimizer (``zero=0``) or with ZeRO-3 (parameters
        stay sharded and are gathered layer by layer)."""
        m = self.model
        dense_bytes = self.stage_dense_params() / self.layout.tp * m.bytes_weight
        if self.dp_size < 2 or dense_bytes <= 0 or self.layout.zero in (0, 3):
            return []
        groups = self.dp_groups
        return [self.add(AllGather(
            phase="optimizer", direction="step", deps=deps, groups=groups,
            bytes_G=np.full(len(groups), dense_bytes) if len(groups) > 1
            else np.array([dense_bytes]), experts_G=np.full(len(groups), -1),
            label="dense_params"))]

    def expert_shard_params_R(self) -> np.ndarray:
        """Expert parameters whose optimizer state each rank updates: each expert's state
        split over its replicas (``zero=0``: every replica updates its own full copy)."""
        p, P = self.placement, self.model.params_per_expert
        if self.layout.zero == 0:
            return self.to_stage_order(memory_model.slots_filled_R(p) * (P / self.layout.etp
                                                                        if self.layout.etp > 1
                                                                        else float(P)))
        # under ETP a replica's 1/et shard over its EDP group = P / (et·edp) = P / replicas
        return self.to_stage_order(memory_model.expert_optimizer_params_R(p, P))

    def emit_relayout_sendrecv(self, extra_bytes_per_expert: float = 0.0) -> list[int]:
        """Per layer, a ``SendRecv`` of every changed slot's weights (plus
        ``extra_bytes_per_expert``, e.g. optimizer state) from a previous holder."""
        if self.previous is None:
            return []
        prev = self.previous.placement
        if prev.phy2log_LP.shape != self.placement.phy2log_LP.shape or prev is self.placement \
                or np.array_equal(prev.phy2log_LP, self.placement.phy2log_LP):
            return []
        nbytes = self.model.expert_weight_bytes + extra_bytes_per_expert
        out = []
        for l in range(self.placement.num_layers):
            src, dst, exp = _moves(prev.layer(l), self.placement.layer(l),
                                   self.placement.slots_per_rank, self.cluster.gpus_per_node)
            if len(src):
                out.append(self.add(SendRecv(
                    phase="relayout", direction="step", layer=l, src_N=src, dst_N=dst,
                    bytes_N=np.full(len(src), nbytes), experts_N=exp, label="relayout")))
        return out


def _moves(prev_P: np.ndarray, new_P: np.ndarray, slots_per_rank: int, gpus_per_node: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transfers that fill changed slots: ``(src_N, dst_N, experts_N)``; the source is a
    previous holder on the same rank (no transfer), else the same node, else round-robin."""
    src, dst, exp = [], [], []
    prev_rank = np.arange(len(prev_P)) // slots_per_rank
    for p in np.flatnonzero((new_P != prev_P) & (new_P >= 0)):
        e, r = int(new_P[p]), int(p // slots_per_rank)
        holders = np.unique(prev_rank[prev_P == e])
        if len(holders) == 0 or r in holders:
            continue
        local = holders[holders // gpus_per_node == r // gpus_per_node]
        pool = local if len(local) else holders
        src.append(int(pool[len(src) % len(pool)]))
        dst.append(r)
        exp.append(e)
    return (np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64),
            np.array(exp, dtype=np.int64))


