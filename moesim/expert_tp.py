"""Expert tensor parallelism (``etp > 1``): each expert's FFN split over an ETP group of ranks.

A mixin of :class:`~moesim.stage_context.StageView`: what a stage's lowering context knows and
emits for ETP. With ``etp = 1`` every method returns what the plain lowering had (no ops, the
stage's own order), so programs without ETP are unchanged.

Rank order (Megatron-Core ``parallel_state.initialize_model_parallel``: the expert
``RankGenerator(tp=expert_tensor_parallel_size, ep=expert_model_parallel_size,
dp=expert_data_parallel_size, pp=…, cp=1, order="tp-cp-ep-dp-pp")``): inside a stage of ``n``
ranks, rank ``r = i + et·(j + ep·k)`` is ETP index ``i`` (fastest: an ETP group is ``et``
consecutive ranks), EP index ``j`` and EDP index ``k``. EP groups are therefore strided by
``et``.

*Expert order.* The policy (static EP with ``ep_size = ep``) places and routes over the stage's
``n`` positions as if EP groups were consecutive blocks of ``ep`` (its ``n / ep = et·edp``
blocks are EP replicas): position ``v`` is EP index ``j = v mod ep`` of block
``b = v // ep = i + et·k``, i.e. stage rank ``σ(v) = i + et·(j + ep·k)``. The lowering routes
the trace's sources in that order (source position ``v`` carries stage rank ``σ(v)``'s tokens,
:meth:`ExpertTPView.to_expert_order`), so the routed arrays of the context (``kept_MLRP``,
``tokens_MLRG``, ``rows_MLP``, ``dropped_MLR``) and its placement are indexed by position; ops
name stage ranks through ``σ`` (the dispatch and combine all-to-alls' ``ranks``), and per-rank
figures are put back in stage order (:meth:`ExpertTPView.to_stage_order`).

Per MoE layer (Megatron-Core ``MoEAlltoAllTokenDispatcher`` with
``expert_tensor_parallel_size > 1``, ``token_dispatcher.py``): the EP all-to-all moves each
rank's routed tokens to the ranks of its EP group; ``dispatch_postprocess`` then all-gathers
them over the ETP group (``gather_from_sequence_parallel_region`` with the per-rank split
sizes), the expert FFN runs its ``1/et`` column/row shard on every gathered token, and
``combine_preprocess`` reduce-scatters the partial outputs back over the ETP group
(``reduce_scatter_to_sequence_parallel_region``) before the combine all-to-all. Backward
mirrors it: an all-gather of the output gradients and a reduce-scatter of the input
gradients. Each ETP collective moves the group's received tokens, ``Σ_{r∈group} recv_r · h``
elements (nccl-tests' size: the gathered output, the scattered input). Per rank the expert
GEMMs see every gathered row with ``1/et`` of the weights and FLOPs; expert weights, grads
and optimizer state are ``1/et`` per rank, and expert gradients are synchronised over the
EDP group (same ``i`` and ``j``, every ``k``: ``world / (et·ep·pp)`` ranks).
"""

from __future__ import annotations

import numpy as np

from moesim.ops import AllGather, Compute, ReduceScatter


def expert_order(n: int, ep: int, etp: int) -> np.ndarray:
    """``σ[v]``: the stage rank at expert-order position ``v`` (module docstring)."""
    v = np.arange(n, dtype=np.int64)
    j, i, k = v % ep, (v // ep) % etp, v // (ep * etp)
    return i + etp * (j + ep * k)


def split_by_etp_index(ranks: np.ndarray, etp: int) -> list[np.ndarray]:
    """Stage ``ranks`` holding replicas of one expert, split into its ``etp`` shards' EDP
    groups (ranks with the same ETP index ``r mod etp``), each sorted; groups of one rank
    (nothing to synchronise) are left out."""
    ranks = np.sort(np.asarray(ranks, dtype=np.int64))
    out = [ranks[ranks % etp == i] for i in range(etp)]
    return [g for g in out if len(g) > 1]


class ExpertTPView:
    """ETP facts and ops of one stage's lowering context (module docstring)."""

    @property
    def etp(self) -> int:
        return self.layout.etp

    @property
    def expert_ranks(self) -> np.ndarray | None:
        """``σ`` (position → stage rank, read-only), None without ETP."""
        if self.layout.etp == 1:
            return None
        if "etp_sigma" not in self._consts:
            ep = int(self.decision.info.get("ep_size") or self.world // self.layout.etp)
            sigma = expert_order(self.world, ep, self.layout.etp)
            sigma.setflags(write=False)
            self._consts["etp_sigma"] = sigma
        return self._consts["etp_sigma"]

    @property
    def a2a_ranks(self) -> np.ndarray | None:
        """The ``ranks`` of the dispatch / combine all-to-alls (None: the stage in order)."""
        return self.expert_ranks

    def to_stage_order(self, arr_R: np.ndarray, axis: int = -1) -> np.ndarray:
        """A per-position array (expert order) along ``axis`` in stage-rank order."""
        sigma = self.expert_ranks
        if sigma is None:
            return arr_R
        arr = np.asarray(arr_R)
        out = np.empty_like(arr)
        index = [slice(None)] * arr.ndim
        index[axis] = sigma
        out[tuple(index)] = arr
        return out

    def expert_rows_RS(self, mb: int, layer: int) -> np.ndarray:
        """Rows each stage rank's expert GEMMs compute per slot, ``[n, S]`` in stage order:
        its received tokens, or with ETP its whole group's (the all-gathered rows)."""
        S = self.placement.slots_per_rank
        rows_RS = self.rows_MLP[mb, layer].reshape(-1, S)
        if self.layout.etp == 1:
            return rows_RS
        return _group_sums(self.to_stage_order(rows_RS, axis=0), self.layout.etp, axis=0)

    def expert_rows_MLR(self) -> np.ndarray:
        """Rows each stage rank's experts compute, ``[M, L, n]`` in stage order (with ETP the
        ETP group's gathered rows: what the rank's expert activations hold)."""
        S = self.placement.slots_per_rank
        rows = self.rows_MLP.reshape(*self.rows_MLP.shape[:2], -1, S).sum(axis=3)
        if self.layout.etp == 1:
            return rows
        return _group_sums(self.to_stage_order(rows, axis=2), self.layout.etp, axis=2)

    def etp_expert_op(self, mb: int, layer: int, direction: str, deps: tuple[int, ...],
                      label: str = "") -> Compute:
        """The expert FFN of one layer-pass under ETP: every gathered row through ``1/et``
        of each local expert's weights and FLOPs."""
        m, et = self.model, self.layout.etp
        rows_RS = self.expert_rows_RS(mb, layer)
        passes = 1 if direction == "fwd" else 2
        w, f = m.expert_weight_bytes / et, m.expert_flops_per_token / et
        return Compute(phase="expert", direction=direction, layer=layer, micro_batch=mb,
                       deps=deps, kind="expert_ffn", gemm_tokens_RS=rows_RS,
                       gemm_passes=passes, label=label,
                       flops_R=rows_RS.sum(axis=1) * (f * passes),
                       bytes_R=(rows_RS > 0).sum(axis=1) * (w * passes),
                       weight_bytes=w, flops_per_token=f)

    @property
    def etp_groups(self) -> tuple[np.ndarray, ...]:
        """The stage's ETP groups: ``et`` consecutive ranks each."""
        et = self.layout.etp
        return self._groups("etp_groups", lambda: (np.arange(g * et, (g + 1) * et)
                                                   for g in range(self.world // et)))

    def etp_bytes_G(self, mb: int, layer: int) -> np.ndarray:
        """Bytes of one ETP collective per group: the tokens its ranks received from the
        dispatch, times the token bytes (the gathered output / the scattered input)."""
        key = ("etp_bytes", mb, layer)
        if key not in self._iter:
            S = self.placement.slots_per_rank
            recv_R = self.to_stage_order(self.rows_MLP[mb, layer].reshape(-1, S).sum(axis=1))
            self._iter[key] = recv_R.reshape(-1, self.layout.etp).sum(axis=1) \
                * float(self.model.token_bytes)
        return self._iter[key]

    def etp_collective(self, gather: bool, mb: int, layer: int, direction: str,
                       deps: tuple[int, ...], label: str = "") -> tuple[int, ...]:
        """The ETP all-gather (``gather``) or reduce-scatter of one layer-pass, on the comm
        stream after ``deps``; returns the op (or ``deps`` unchanged without ETP). Forward:
        gather the dispatched tokens before the experts, reduce-scatter their partial outputs
        after; backward: gather the output gradients, reduce-scatter the input gradients."""
        if self.layout.etp == 1:
            return deps
        cls, phase, name = ((AllGather, "dispatch", "etp_all_gather") if gather
                            else (ReduceScatter, "combine", "etp_reduce_scatter"))
        return (self.add(cls(phase=phase, direction=direction, stream="comm", layer=layer,
                             micro_batch=mb, deps=deps, groups=self.etp_groups,
                             bytes_G=self.etp_bytes_G(mb, layer),
                             label=label or name)),)

    def expert_sync_rounds(self, layer: int) -> list[tuple[list[np.ndarray], list[int]]]:
        """Rounds of disjoint groups synchronising one expert's gradients or weights each
        (stage ranks): the replica groups of :meth:`replica_rounds`, under ETP mapped through
        ``σ`` and split by ETP index into each shard's EDP group."""
        rounds = self.replica_rounds(layer)
        sigma = self.expert_ranks
        if sigma is None:
            return rounds
        out = []
        for groups, experts in rounds:
            g_out, e_out = [], []
            for g, e in zip(groups, experts, strict=True):
                for sub in split_by_etp_index(sigma[np.asarray(g)], self.layout.etp):
                    g_out.append(sub)
                    e_out.append(e)
            if g_out:
                out.append((g_out, e_out))
        return out


def _group_sums(arr: np.ndarray, et: int, axis: int) -> np.ndarray:
    """Each run of ``et`` consecutive entries along ``axis`` replaced by its sum."""
    arr = np.moveaxis(np.asarray(arr), axis, 0)
    n = arr.shape[0]
    sums = arr.reshape(n // et, et, *arr.shape[1:]).sum(axis=1)
    return np.moveaxis(np.repeat(sums, et, axis=0), 0, axis)
