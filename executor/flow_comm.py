"""The layout dataflow's communication: TP/SP collectives, pipeline sends, dense gradient and
parameter collectives (data parallel and ZeRO), each moving the real tensors.

- ``tp_all_gather`` / ``tp_reduce_scatter`` (Korthikanti et al. 2022, sequence parallelism):
  forward, the all-gather collects the TP group's sequence shards of ``h`` (``[T, H]`` →
  ``[T·t, H]``) into the attention and the reduce-scatter sums its row-parallel partial outputs
  and scatters them back; backward, their duals: the all-gather collects ``g_mid`` and the
  reduce-scatter sums the column-parallel input gradients.
- ``pp_send`` (Narayanan et al. 2021): ``dist.batch_isend_irecv`` of ``h`` (forward) or ``g``
  (backward) of the op's micro-batch from each sending stage rank to the rank at the same
  position of the receiving stage, in program order. On CPU they are issued asynchronously
  (one stream per stage pair, FIFO) and joined by the ops that depend on them, as the
  program's streams say.
- dense gradient sync over the DP group (ranks with the same TP shard): ``dense_grads``
  all-reduce (plain data parallel, or the policy's own scheme) or reduce-scatter (ZeRO 1–2,
  Rajbhandari et al. 2020, "ZeRO", arXiv 1910.02054: each rank keeps the sum of its ``1/d``
  chunk); ``dense_params`` all-gather of the updated chunks after the optimizer step (over
  the DP group, or, as some policies lower it, over the whole stage: :func:`_param_gather`).
- ZeRO-3 (:mod:`moesim.executor.flow_zero3`): per-layer parameter all-gathers and gradient
  reduce-scatters.

A collective's size must be what the program says (``bytes / bytes_per_element`` elements);
a mismatch refuses the program in one line, never a silent resize.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from moesim.errors import MoesimError
from moesim.executor.interpreter_comm import _all_gather_single as _all_gather
from moesim.executor.interpreter_comm import _reduce_scatter_single as _reduce_scatter
from moesim.executor.timing import Collective
from moesim.ops import AllGather, AllReduce, GroupCollective, ReduceScatter, SendRecv

DENSE_LABELS = ("dense_grads", "dense_params", "zero3_gather", "zero3_grads")


def _my_group(flow, op: GroupCollective) -> tuple[object, int]:
    """``(process group, elements)`` of this rank's group of ``op``."""
    g = next(i for i, grp in enumerate(op.groups) if flow.ex.rank in np.asarray(grp))
    members = tuple(sorted(int(r) for r in np.asarray(op.groups[g])))
    elem = flow.ex._elem_bytes(op.phase)
    return flow.ex.groups.get(members), int(round(float(np.asarray(op.bytes_G)[g]) / elem))


def _check_size(op, want: int, have: int) -> None:
    if want != have:
        raise MoesimError(f"the executor cannot run {type(op).__name__} {op.label!r} under "
                          f"this layout: the program moves {want} elements but the tensor it "
                          f"names has {have}")


def gather(x: torch.Tensor, t: int, group) -> torch.Tensor:
    """All-gather ``x`` ``[T, ...]`` over a TP group of ``t`` ranks → ``[t·T, ...]``."""
    out = x.new_empty((t * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def scatter(x: torch.Tensor, t: int, group) -> torch.Tensor:
    """Reduce-scatter ``x`` ``[t·T, ...]`` over a TP group → this rank's summed ``[T, ...]``."""
    out = x.new_empty((x.shape[0] // t,) + tuple(x.shape[1:]))
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


def tp_collective(flow, op: GroupCollective) -> Callable[[], None]:
    """An SP all-gather / reduce-scatter of the layer's activations or gradients."""
    group, numel = _my_group(flow, op)
    key, t = (op.micro_batch, op.layer), flow.tp
    H = flow.model.hidden_size
    _check_size(op, numel, flow.tokens * t * H)
    fwd, ag = op.direction == "fwd", isinstance(op, AllGather)

    def work() -> None:
        if fwd and ag:
            if key not in flow.fwd_done:  # else a recompute: the kept layer input
                flow.h_in[key] = flow.layer_input(*key)
            flow.gathered[key] = gather(flow.h_in[key], t, group)
        elif fwd:
            flow.attn_out[key] = scatter(flow.partial.pop(key), t, group)
        elif ag:
            flow.gathered[key] = gather(flow.g_mid[key], t, group)
        else:
            flow.finish_layer_grad(key, scatter(flow.grad_partial.pop(key), t, group))
        flow.note(key)
    return work


def pp_send(flow, op: SendRecv) -> Collective:
    """Send / receive the micro-batch's ``h`` (forward) or ``g`` (backward)."""
    me, mb = flow.ex.rank, op.micro_batch
    src, dst = np.asarray(op.src_N).tolist(), np.asarray(op.dst_N).tolist()
    shape = (flow.tokens, flow.model.hidden_size)
    for b in np.asarray(op.bytes_N):
        _check_size(op, int(round(float(b) / flow.model.bytes_activation)), shape[0] * shape[1])
    store = flow.h if op.direction == "fwd" else flow.g
    sends = [d for s, d in zip(src, dst, strict=True) if s == me]
    recvs = [s for s, d in zip(src, dst, strict=True) if d == me]

    def start() -> Callable[[], None]:
        ops, bufs = [], []
        for peer in sends:
            ops.append(dist.P2POp(dist.isend, store[mb].contiguous(), peer))
        for peer in recvs:
            bufs.append(torch.empty(shape, dtype=flow.dtype, device=flow.device))
            ops.append(dist.P2POp(dist.irecv, bufs[-1], peer))
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish() -> None:
            for w in works:
                w.wait()
            if bufs:
                store[mb] = bufs[-1]
        return finish
    return Collective(start)


def is_dense(op: GroupCollective) -> bool:
    """A collective over the dense parameters or gradients (experts ``-1`` or unnamed)."""
    return op.label in DENSE_LABELS and (op.experts_G is None
                                         or (np.asarray(op.experts_G) < 0).all())


def dense_collective(flow, op: GroupCollective) -> Callable[[], None]:
    """Gradient sync and parameter gather of the dense weights (module docstring)."""
    if op.label.startswith("zero3"):
        from moesim.executor import flow_zero3

        return flow_zero3.compile_op(flow, op)
    group, numel = _my_group(flow, op)
    members = sorted(int(r) for r in next(g for g in op.groups if flow.ex.rank in np.asarray(g)))
    if op.label == "dense_params" and isinstance(op, AllGather):
        return _param_gather(flow, op, group, numel, members)
    d = len(members)
    _check_size(op, numel, flow.flat.numel())
    if d < 2:
        return lambda: None
    k = numel // d
    if op.label == "dense_grads" and isinstance(op, AllReduce):
        def work() -> None:
            flow.dense_local = flow.flat_grad.clone()
            dist.all_reduce(flow.flat_grad, group=group)
            flow.dense_synced = ("all", flow.flat_grad, d)
    elif op.label == "dense_grads" and isinstance(op, ReduceScatter):
        def work() -> None:
            flow.dense_local = flow.flat_grad.clone()
            chunk = flow.flat_grad[flow.dp_index * k:(flow.dp_index + 1) * k]
            chunk.copy_(scatter(flow.flat_grad, d, group))
            flow.dense_synced = ("chunk", chunk, d)
    else:
        raise MoesimError(f"the executor has no dataflow for {type(op).__name__} "
                          f"{op.label!r} under this layout")
    return work


def _param_gather(flow, op: AllGather, group, numel: int, members: list[int]
                  ) -> Callable[[], None]:
    """The all-gather of the updated dense chunks. Over the DP group each member sends its
    ``1/d`` chunk and the gathered vector is the rank's dense shard. The lowering gathers over
    the DP group (``LoweringContext.emit_dense_param_allgather``, also behind the GPU-optimizer
    policies' ``policies.primitives.emit_gpu_optimizer``); a group spanning several TP shards
    is run too: each member sends its chunk of its own TP shard and a rank keeps the chunks of
    its DP group (the ranks of its TP shard)."""
    n, d = len(members), flow.n // flow.tp
    if n < 2:
        return lambda: None
    if flow.z3_d > 1:
        raise MoesimError("this program all-gathers the updated dense weights under zero=3, "
                          "which keeps them sharded (a lowering error); simulate it, or use "
                          "zero=1 or 2")
    k = numel // n
    if numel % n or k * d != flow.flat.numel():
        _check_size(op, numel, flow.flat.numel() * n // max(d, 1))
    same = [i for i, m in enumerate(members) if (m - flow.first_rank) % flow.tp == flow.tp_index]

    def work() -> None:
        mine = flow.flat[flow.dp_index * k:(flow.dp_index + 1) * k].clone()
        out = mine.new_empty(n * k)
        _all_gather(out, mine, group=group)
        flow.flat.copy_(torch.cat([out[i * k:(i + 1) * k] for i in same]))
    return work
