"""The distributed MoE layer's four steps on one rank, driven by forced routing.

One :class:`LayerPass` holds one (micro-batch, layer) pass of one rank: its tokens
(:func:`~moesim.executor.replay.layer_inputs`), the dispatch layout and the saved activations.
The interpreter calls, in program order,

- ``dispatch_fwd``  permute kept assignments by destination slot, all-to-all them to the slots;
- ``expert_fwd``    run each local slot's FFN on exactly the rows routed to it;
- ``combine_fwd``   all-to-all the results back, weight them by the gates, sum per token;
- ``combine_bwd``   gate-weighted upstream gradients all-to-all to the slots;
- ``expert_bwd``    dgrad + wgrad per slot (hand-written backward of the saved activations,
                    :func:`~moesim.executor.replay.ffn_backward`), wgrad summed into the slot's
                    gradient;
- ``dispatch_bwd``  input gradients all-to-all back and summed per token.

Shape legend: ``N`` tokens of this rank, ``K`` kept assignments this rank sends, ``M`` rows this
rank's slots receive, ``S`` local slots, ``W`` ranks in the all-to-all, ``H`` hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_etp
from moesim.executor.groups import SELF
from moesim.executor.replay import LayerInputs, ffn_backward, ffn_forward
from moesim.ops import LayerRoute
from moesim.specs import ModelSpec


@dataclass
class LayerPass:
    """State of one (micro-batch, layer) pass on one rank; see the module docstring."""

    inputs: LayerInputs
    tok_K: torch.Tensor            # token of each kept assignment, dispatch (slot-sorted) order
    gate_K: torch.Tensor           # its gate weight
    send_split_W: list[int]        # rows to each all-to-all member
    recv_split_W: list[int]        # rows from each member
    slot_rows: list[torch.Tensor]  # per local slot: positions in the [M] receive buffer
    recv_MH: torch.Tensor | None = None
    saved: list[tuple] = field(default_factory=list)  # per active slot: (slot, ffn saved)
    y_recv_MH: torch.Tensor | None = None
    out_NH: torch.Tensor | None = None
    grad_recv_MH: torch.Tensor | None = None
    grad_x_recv_MH: torch.Tensor | None = None
    grad_x_NH: torch.Tensor | None = None
    etp_rows_G: list[int] = field(default_factory=list)  # expert TP: rows of each member
    etp_index: int = 0                                   # this rank's place in its ETP group


def plan_pass(inputs: LayerInputs, route: LayerRoute, rank: int, members: list[int],
              device: torch.device, etp_group: list[int] | None = None) -> LayerPass:
    """Split sizes and receive layout of ``rank``'s pass over all-to-all ``members``.

    ``rank`` and ``members`` are route rows (positions, :func:`moe_etp.route_row`), the
    members in the all-to-all group's rank order. Under expert TP ``etp_group`` lists the rows
    of this rank's ETP group (member order, each with the same all-to-all members): the slots
    then run over the group's gathered rows (:func:`moe_etp.gathered_slot_rows`)."""
    S = route.slots_per_rank
    kept_RP = np.asarray(route.kept_RP, dtype=np.int64)
    per_rank = kept_RP.reshape(kept_RP.shape[0], -1, S)            # [R, G, S]
    send = per_rank[rank].sum(axis=1)
    assert send.sum() == send[members].sum(), "tokens routed outside the all-to-all's ranks"
    recv_RS = per_rank[members, rank, :]                           # [W, S]
    # receive buffer holds, per source, its rows slot by slot: position of slot s's rows
    recv_GRS = [per_rank[members, g, :] for g in etp_group] if etp_group else [recv_RS]
    rows = moe_etp.gathered_slot_rows(recv_GRS, S)
    slot_rows = [torch.from_numpy(r).to(device) for r in rows]
    order = inputs.kept_order
    tok = torch.from_numpy(inputs.token_A[order]).to(device)
    gate = inputs.gate_A[torch.from_numpy(order).to(inputs.gate_A.device)].to(device)
    return LayerPass(inputs=inputs, tok_K=tok, gate_K=gate, send_split_W=send[members].tolist(),
                     recv_split_W=recv_RS.sum(axis=1).tolist(), slot_rows=slot_rows,
                     etp_rows_G=[int(r.sum()) for r in recv_GRS] if etp_group else [],
                     etp_index=etp_group.index(rank) if etp_group else 0)


def _a2a(send: torch.Tensor, out_rows: int, send_split: list[int], recv_split: list[int],
         group: object | None) -> torch.Tensor:
    """Uneven all-to-all of rows (``dist.all_to_all_single`` with split sizes)."""
    if group == SELF:  # one rank: what it sends to itself is what it receives
        return send.clone()
    out = send.new_empty((out_rows,) + tuple(send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), output_split_sizes=recv_split,
                           input_split_sizes=send_split, group=group)
    return out


def dispatch_fwd(lp: LayerPass, group: object | None) -> None:
    """Permute kept assignments' tokens by slot and send them: fills ``recv_MH``."""
    send = lp.inputs.x_NH.index_select(0, lp.tok_K)
    lp.recv_MH = _a2a(send, sum(lp.recv_split_W), lp.send_split_W, lp.recv_split_W, group)


def expert_fwd(lp: LayerPass, slot_params: list[torch.Tensor], model: ModelSpec) -> None:
    """Each local slot's FFN on its rows; keeps the activations for the backward."""
    assert lp.recv_MH is not None, "expert forward before dispatch"
    y = torch.empty_like(lp.recv_MH)
    lp.saved = []
    for s, rows in enumerate(lp.slot_rows):
        if len(rows) == 0:
            continue
        y_s, saved = ffn_forward(lp.recv_MH.index_select(0, rows), slot_params[s], model)
        y.index_copy_(0, rows, y_s)
        lp.saved.append((s, saved))
    lp.y_recv_MH = y


def combine_fwd(lp: LayerPass, group: object | None) -> None:
    """Send slot outputs back; ``out_NH = Σ gate · y`` per token (dropped contribute 0)."""
    assert lp.y_recv_MH is not None, "combine before expert forward"
    back = _a2a(lp.y_recv_MH, sum(lp.send_split_W), lp.recv_split_W, lp.send_split_W, group)
    lp.out_NH = torch.zeros_like(lp.inputs.x_NH).index_add_(0, lp.tok_K,
                                                             back * lp.gate_K[:, None])


def combine_bwd(lp: LayerPass, group: object | None) -> None:
    """Gate-weighted upstream gradients to the slots: fills ``grad_recv_MH``."""
    send = lp.inputs.grad_out_NH.index_select(0, lp.tok_K) * lp.gate_K[:, None]
    lp.grad_recv_MH = _a2a(send, sum(lp.recv_split_W), lp.send_split_W, lp.recv_split_W, group)


def expert_bwd(lp: LayerPass, slot_params: list[torch.Tensor], slot_grads: list[torch.Tensor],
               model: ModelSpec) -> None:
    """dgrad and wgrad of each slot (hand-written backward); wgrad adds into
    ``slot_grads[s]``. A rank whose slots received nothing still produces its (empty) input
    gradients for the dispatch backward."""
    assert lp.grad_recv_MH is not None and lp.recv_MH is not None, "expert backward too early"
    gx = torch.zeros_like(lp.recv_MH)
    for s, saved in lp.saved:
        rows = lp.slot_rows[s]
        dx = ffn_backward(lp.grad_recv_MH.index_select(0, rows), saved, slot_params[s],
                          slot_grads[s], model)
        gx.index_copy_(0, rows, dx)
    lp.saved = []
    lp.grad_x_recv_MH = gx


def dispatch_bwd(lp: LayerPass, group: object | None) -> None:
    """Input gradients back to their sources, summed per token: fills ``grad_x_NH``."""
    assert lp.grad_x_recv_MH is not None, "dispatch backward before expert backward"
    back = _a2a(lp.grad_x_recv_MH, sum(lp.send_split_W), lp.recv_split_W, lp.send_split_W,
                group)
    lp.grad_x_NH = torch.zeros_like(lp.inputs.x_NH).index_add_(0, lp.tok_K, back)
