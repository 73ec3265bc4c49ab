"""Expert tensor parallelism (``etp > 1``) in the executor: sharded experts and the ETP
collectives around them, with the real tensors.

The simulator's lowering (:mod:`moesim.expert_tp`) lays a route's rows and slot blocks out in
the policy's *position* order; ``LayerRoute.ranks_R[v]`` is the stage rank at position ``v``
(:func:`route_row` maps back). An ETP group is ``et`` consecutive stage ranks holding the same
experts; rank ``i`` of it keeps the ``i``-th ``1/et`` shard of each (Megatron-Core's expert TP,
Shoeybi et al. 2019's column/row split): ``W1``/``W3``'s columns ``[i·f, (i+1)·f)`` and ``W2``'s
rows ``[i·f, (i+1)·f)`` with ``f = F / et`` (:func:`shard_expert`), so the FFN on a shard is
the model's FFN with ``ffn_hidden_size = f`` (:func:`shard_model`) and the shards' outputs sum
to the whole expert's.

Per layer-pass (:mod:`moesim.executor.moe_layer`): after the dispatch all-to-all a rank holds
``M_i`` rows; the ETP all-gather concatenates the group's rows (member order), every member
runs its shard on all ``Σ M`` rows (:func:`gathered_slot_rows`), and the reduce-scatter sums
the partial outputs and hands each member back its own ``M_i`` rows. Backward: the all-gather
of the output gradients and the reduce-scatter of the input gradients. The members' ``M_i``
differ, and ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` need equal chunks, so each
member's chunk is padded to ``max M`` rows (zeros); the program's size (``Σ M · H``) is
checked before the walk.

Under pipeline stages the groups are the stage's own ranks (``ranks_R`` names stage ranks).
A recomputed forward (``recompute=full`` or selective ``moe``) runs its own all-gather and
reduce-scatter, labelled ``recompute`` like the rest of it (:func:`is_etp_collective`), on
the tokens its dispatch brings again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from moesim.errors import MoesimError
from moesim.executor.replay import split_weights
from moesim.model_spec import ModelSpec
from moesim.ops import AllGather, GroupCollective, LayerRoute, ReduceScatter

ETP_LABELS = ("etp_all_gather", "etp_reduce_scatter")
# as interpreter_comm names them (not imported from there: moe_layer imports this module)
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def is_etp_collective(op) -> bool:
    """An ETP all-gather / reduce-scatter of one layer-pass: named by its label, or, in a
    recomputed forward (:func:`moesim.layer_ops._recompute`), labelled ``recompute`` like the
    rest of that forward — the dispatch-phase all-gather and the combine-phase
    reduce-scatter around the recomputed experts."""
    if not isinstance(op, (AllGather, ReduceScatter)) or op.layer < 0 or op.micro_batch < 0:
        return False
    if op.label in ETP_LABELS:
        return True
    return op.label == "recompute" and op.direction == "fwd" and (
        (op.phase == "dispatch" and isinstance(op, AllGather))
        or (op.phase == "combine" and isinstance(op, ReduceScatter)))


def route_row(route: LayerRoute, stage_rank: int) -> int:
    """The route row (position) carrying ``stage_rank``'s tokens and slots."""
    if route.ranks_R is None:
        return stage_rank
    hits = np.flatnonzero(np.asarray(route.ranks_R) == stage_rank)
    if len(hits) != 1:
        raise MoesimError(f"route ranks_R {np.asarray(route.ranks_R).tolist()} does not name "
                          f"stage rank {stage_rank} exactly once (a lowering error)")
    return int(hits[0])


def shard_model(model: ModelSpec, et: int) -> ModelSpec:
    """The model whose expert FFN is one ``1/et`` shard (``ffn_hidden_size / et``)."""
    if et == 1:
        return model
    if model.ffn_hidden_size % et:
        raise MoesimError(f"etp={et} must divide the expert FFN size "
                          f"{model.ffn_hidden_size}; choose an etp that divides it")
    return model.replace(ffn_hidden_size=model.ffn_hidden_size // et)


def shard_expert(flat: torch.Tensor, model: ModelSpec, index: int, et: int) -> torch.Tensor:
    """Shard ``index`` of ``et`` of one expert's flat parameters (or gradient), laid out as
    :func:`~moesim.executor.replay.split_weights` lays out the shard model's expert."""
    if et == 1:
        return flat
    f = model.ffn_hidden_size // et
    cols = slice(index * f, (index + 1) * f)
    mats = split_weights(flat, model)
    parts = [m[:, cols] for m in mats[:-1]] + [mats[-1][cols, :]]
    return torch.cat([p.reshape(-1) for p in parts])


def gathered_slot_rows(recv_GRS: list[np.ndarray], S: int) -> list[np.ndarray]:
    """Per local slot, its rows in the ETP group's gathered buffer: member ``g``'s receive
    buffer (per source, slot by slot; ``recv_GRS[g]`` is its ``[W, S]`` counts) follows the
    ``Σ_{h<g} M_h`` rows of the members before it."""
    out: list[list[np.ndarray]] = [[] for _ in range(S)]
    offset = 0
    for recv_RS in recv_GRS:
        slot_of_row = np.concatenate([np.repeat(np.arange(S), c) for c in recv_RS]) \
            if recv_RS.size else np.zeros(0, dtype=np.int64)
        for s in range(S):
            out[s].append(offset + np.flatnonzero(slot_of_row == s))
        offset += int(recv_RS.sum())
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in out]


def etp_group_of(stage_rank: int, et: int) -> list[int]:
    """The ETP group (stage ranks) of ``stage_rank``: ``et`` consecutive ranks."""
    g0 = stage_rank // et * et
    return list(range(g0, g0 + et))


def check_same_experts(route: LayerRoute, group: list[int]) -> None:
    """An ETP group's members must hold the same experts in the same slots."""
    S, phy = route.slots_per_rank, np.asarray(route.phy2log_P)
    blocks = [phy[route_row(route, r) * S:(route_row(route, r) + 1) * S] for r in group]
    if any((b != blocks[0]).any() for b in blocks[1:]):
        raise MoesimError(f"ETP group {group} holds different experts per slot "
                          f"({[b.tolist() for b in blocks]}); expert TP needs the group's ranks "
                          "to hold the same experts (static EP places them so)")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows,) + tuple(x.shape[1:]))
    out[:x.shape[0]] = x
    return out


def etp_gather(x_MH: torch.Tensor, rows_G: list[int], me: int, group) -> torch.Tensor:
    """All-gather the group's uneven row blocks (member order) → ``[Σ M, H]``."""
    m = max(rows_G)
    out = x_MH.new_empty((m * len(rows_G),) + tuple(x_MH.shape[1:]))
    _all_gather_single(out, _pad_rows(x_MH, m), group=group)
    return torch.cat([out[g * m:g * m + r] for g, r in enumerate(rows_G)])


def etp_scatter(x_GH: torch.Tensor, rows_G: list[int], me: int, group) -> torch.Tensor:
    """Reduce-scatter ``[Σ M, H]`` partial sums: member ``me``'s summed ``[M_me, H]`` rows."""
    m = max(rows_G)
    padded = x_GH.new_zeros((m * len(rows_G),) + tuple(x_GH.shape[1:]))
    offset = 0
    for g, r in enumerate(rows_G):
        padded[g * m:g * m + r] = x_GH[offset:offset + r]
        offset += r
    out = x_GH.new_empty((m,) + tuple(x_GH.shape[1:]))
    _reduce_scatter_single(out, padded, group=group)
    return out[:rows_G[me]]


def compile_etp(flow, op: GroupCollective) -> Callable[[], None]:
    """The ETP all-gather / reduce-scatter of one layer-pass (module docstring)."""
    from moesim.executor.flow_comm import _check_size, _my_group

    group, numel = _my_group(flow, op)
    key = (op.micro_batch, op.layer)
    lp = flow.ex.passes[key]
    rows_G, me = lp.etp_rows_G, lp.etp_index
    _check_size(op, numel, sum(rows_G) * flow.model.hidden_size)
    fwd, ag = op.direction == "fwd", isinstance(op, AllGather)

    def work() -> None:
        if fwd and ag:
            lp.recv_MH = etp_gather(lp.recv_MH, rows_G, me, group)
        elif fwd:
            lp.y_recv_MH = etp_scatter(lp.y_recv_MH, rows_G, me, group)
        elif ag:
            lp.grad_recv_MH = etp_gather(lp.grad_recv_MH, rows_G, me, group)
        else:
            lp.grad_x_recv_MH = etp_scatter(lp.grad_x_recv_MH, rows_G, me, group)
        flow.note(key)
    return work
