"""ZeRO-3 / FSDP for the dense parameters in the layout dataflow.

Rajbhandari et al. 2020 ("ZeRO", arXiv 1910.02054, stage 3 = P_os+g+p): each rank of a DP group
(the ranks holding the same TP shard) keeps only its ``1/d`` chunk of every layer's parameters,
its Adam state, and, after the backward, its chunk of the summed gradient. The program says
when (:func:`moesim.layer_ops._zero3_gather`, :meth:`moesim.stage_context.StageView.
zero3_grad_scatter`):

- ``zero3_gather`` (prefetch stream, forward and again backward, per layer and micro-batch):
  all-gathers the chunks into the layer's unsharded buffer;
- the attention op uses the buffer (its autograd graph keeps views of it) and frees it after
  use — its storage is resized to zero as PyTorch FSDP does, so a gathered layer costs memory
  only between its gather and its use; the backward's gather refills the same storage before
  the backward uses the views again. A buffer is freed only when no gather of it is pending;
- ``zero3_grads`` (after the layer's last backward): reduce-scatters the layer's accumulated
  gradient over the DP group into this rank's chunk; the optimizer step updates the chunks.

Layout on a rank: :attr:`FlowState.flat` holds the chunks of every held layer (in layer order)
and ``z3_grad`` their reduced gradients; ``flat_grad`` stays the unsharded local accumulator.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moesim.executor.interpreter_comm import _all_gather_single as _all_gather
from moesim.executor.interpreter_comm import _reduce_scatter_single as _reduce_scatter
from moesim.executor.timing import Collective
from moesim.ops import AllGather, GroupCollective


def shard(flow, d: int) -> None:
    """Keep only this rank's ``1/d`` chunk of each held layer (called at install)."""
    flow.z3_d = d
    flow.z3_bufs, flow.z3_chunks, flow.z3_pending = {}, {}, {}
    chunks, pos = [], 0
    for layer, (a, _, c) in flow.offsets.items():
        k = (c - a) // d
        chunks.append(flow.flat[a + flow.dp_index * k:a + (flow.dp_index + 1) * k].clone())
        flow.z3_chunks[layer] = (pos, pos + k)
        pos += k
        buf = torch.empty(c - a, dtype=flow.dtype, device=flow.device)
        buf.untyped_storage().resize_(0)
        flow.z3_bufs[layer] = buf
        flow.z3_pending[layer] = 0
    flow.flat = torch.cat(chunks) if chunks else flow.flat[:0].clone()


def weights(flow, layer: int) -> dict[str, torch.Tensor]:
    """Leaves viewing the gathered buffer of ``layer`` (it must be gathered)."""
    buf = flow.z3_bufs[layer]
    assert buf.untyped_storage().size() > 0, f"ZeRO-3 layer {layer} used before its gather"
    a, b, c = flow.offsets[layer]
    return {"qkv": buf[:b - a].view(flow.shapes["qkv"]).detach().requires_grad_(True),
            "out": buf[b - a:].view(flow.shapes["out"]).detach().requires_grad_(True)}


def used(flow, layer: int) -> None:
    """The attention op of ``layer`` is done with the buffer: free it unless a gather is
    pending (which will use it)."""
    flow.z3_pending[layer] -= 1
    if flow.z3_pending[layer] == 0:
        flow.z3_bufs[layer].untyped_storage().resize_(0)


def compile_op(flow, op: GroupCollective) -> Callable[[], None] | Collective:
    """A ``zero3_gather`` (all-gather into the buffer) or ``zero3_grads`` (reduce-scatter)."""
    from moesim.executor.flow_comm import _check_size, _my_group

    group, numel = _my_group(flow, op)
    a, _, c = flow.offsets[op.layer]
    _check_size(op, numel, c - a)
    lo, hi = flow.z3_chunks[op.layer]
    if isinstance(op, AllGather):
        buf = flow.z3_bufs[op.layer]

        def start() -> Callable[[], None]:
            flow.z3_pending[op.layer] += 1
            if buf.untyped_storage().size() == 0:
                buf.untyped_storage().resize_(buf.numel() * buf.element_size())
            w = _all_gather(buf, flow.flat[lo:hi], group=group, async_op=True)
            return w.wait
        return Collective(start)

    def scatter() -> None:
        out = flow.z3_grad[lo:hi]
        _reduce_scatter(out, flow.flat_grad[a:c].contiguous(), group=group)
    return scatter


def reference_chunks(want_layers: list[torch.Tensor], dp_index: int, d: int) -> torch.Tensor:
    """The reference of ``z3_grad``: each layer's flat gradient's ``dp_index``-th ``1/d``."""
    parts = [w[dp_index * (w.numel() // d):(dp_index + 1) * (w.numel() // d)]
             for w in want_layers]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def dp_size(flow, program) -> int:
    """The DP group size of this rank's ``zero3_*`` ops (1: none in the program)."""
    for op in program.ops:
        if op.label.startswith("zero3") and isinstance(op, GroupCollective):
            for g in op.groups:
                if flow.ex.rank in np.asarray(g):
                    return len(g)
    return 1
