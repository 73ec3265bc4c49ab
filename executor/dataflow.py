"""The real dataflow of a layout program on one rank: the residual stream through every op.

Under a parallel layout (:mod:`moesim.layout`) the executor does not run stand-ins for the dense
ops: each micro-batch's residual stream ``h`` (``[T, H]``, this rank's tokens; under SP its
sequence shard) flows through the program's ops in program order, and the gradients flow back
through the backward ops (the model: :mod:`moesim.executor.dense_block`). Per MoE layer ``l``
and micro-batch ``mb``:

forward   ``[tp_all_gather h]`` attention ``[tp_reduce_scatter]`` route (``h_mid = h + attn``)
          dispatch (``x = h_mid``) expert combine (``h = h_mid + moe``)
backward  combine (``grad_out = g``) expert dispatch (``g_mid = g + grad_x``)
          ``[tp_all_gather g_mid]`` attention ``[tp_reduce_scatter]`` (``g = g_mid + grad_h``)

Backward is segment-wise autograd: the attention Compute keeps its local graph (from a leaf of
its input to its output) and its backward op calls ``torch.autograd.grad`` on it; the
collectives in between are the explicit duals the lowering emits (the forward's all-gather is
the backward's reduce-scatter and vice versa). The MoE part keeps the executor's hand-written
expert backward (:mod:`moesim.executor.moe_layer`) with the real activations as its input and
the real gradient as its upstream gradient; routing stays forced (replay mode).

Pipeline sends (:mod:`moesim.executor.flow_comm`) move ``h`` forward and ``g`` backward in the
program's order. Recomputation (:mod:`moesim.executor.flow_recompute`) is explicit: the
program's recompute ops rebuild what the forward did not keep, op by op, so each one is timed
where the simulator prices it; ``torch.utils.checkpoint`` cannot be used because it reruns the
forward inside the backward call, which would fold the recompute ops into one.

Shape legend: ``T`` tokens of this rank, ``N`` of its TP region (``T·t``), ``H`` hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moesim.errors import MoesimError
from moesim.executor import dense_block as db
from moesim.executor.flow_state import FlowState
from moesim.executor.moe_etp import compile_etp, is_etp_collective
from moesim.layout import ParallelLayout
from moesim.ops import AllToAll, Compute, GroupCollective, Op, Program, SendRecv

TP_LABELS = ("tp_all_gather", "tp_reduce_scatter")
# phases whose dense / unnamed collectives carry the model's state: the dataflow must know them
# (others, e.g. SwiftMoE's route-phase count exchange, move a buffer of their bytes as the
# default layout's executor does: routing is forced, the counts are not needed)
STATE_PHASES = ("dense", "grad_sync", "optimizer", "param_gather")


class LayoutFlow(FlowState):
    """One rank's dataflow under ``layout``; the interpreter asks :meth:`compile` first."""

    def __init__(self, ex, layout: ParallelLayout) -> None:
        super().__init__(ex, layout)

    # -- dispatch by op ----------------------------------------------------------------------
    def compile(self, op: Op) -> Callable[[], None] | None:
        """The work of ``op`` when it belongs to the dataflow, else None (the interpreter's
        own MoE / expert-collective / policy ops)."""
        from moesim.executor import flow_comm, flow_recompute

        if isinstance(op, Compute):
            key = (op.micro_batch, op.layer)
            if flow_recompute.is_moe_act(op):
                return flow_recompute.compile_moe_act(self, op)
            if op.phase == "expert" and op.kind == "expert_ffn" and op.direction == "fwd" \
                    and not op.label and key in self.ckpt_act:
                return flow_recompute.expert_fwd_without_act(self, op)
            if op.phase == "dense" and op.layer >= 0 and op.label == "recompute":
                return flow_recompute.compile_dense(self, op)
            if op.phase == "dense" and op.kind == "attention" and op.layer >= 0:
                return self._attention_fwd(op) if op.direction == "fwd" \
                    else self._attention_bwd(op)
            if op.phase == "route":
                return self._route(op)
            return None
        if isinstance(op, AllToAll) and op.phase in ("dispatch", "combine") and not op.reduce:
            return self._moe_a2a(op)
        if isinstance(op, GroupCollective) and op.label in TP_LABELS:
            return flow_comm.tp_collective(self, op)
        if is_etp_collective(op):
            return compile_etp(self, op)
        if isinstance(op, SendRecv) and op.phase == "pp_send":
            return flow_comm.pp_send(self, op)
        if isinstance(op, GroupCollective) and flow_comm.is_dense(op):
            return flow_comm.dense_collective(self, op)
        return None

    def check_program(self, program: Program) -> None:
        """Refuse, before the timed walk, an op of this rank the dataflow cannot run for real
        (it would otherwise fall back to a buffer of its bytes)."""
        from moesim.executor import flow_comm, flow_recompute

        for op in program.ops:
            if not self.ex._takes_part(op):
                continue
            bad = None
            if isinstance(op, Compute) and op.phase == "dense":
                if op.layer < 0 or (op.kind != "attention" and op.label != "recompute"):
                    bad = "a dense layer / output head"
                elif op.label == "recompute" and not flow_recompute.supported(self, op):
                    bad = "this selective recompute module"
            elif isinstance(op, Compute) and flow_recompute.is_moe_act(op) and \
                    (op.micro_batch, op.layer) not in self.ex.passes:
                bad = "an expert recompute op without its layer-pass"
            elif isinstance(op, GroupCollective) and op.phase in ("dispatch", "combine") and \
                    not is_etp_collective(op):
                bad = "a token collective that is not an ETP all-gather / reduce-scatter"
            elif isinstance(op, GroupCollective) and op.phase in STATE_PHASES and \
                    (op.experts_G is None or (op.experts_G < 0).any()) and \
                    op.label not in TP_LABELS and not flow_comm.is_dense(op):
                bad = f"a dense collective labelled {op.label!r}"
            if bad:
                raise MoesimError(f"the executor cannot run {bad} ({type(op).__name__} "
                                  f"phase={op.phase} label={op.label!r}) under this layout yet")

    # -- forward -----------------------------------------------------------------------------
    def layer_input(self, mb: int, layer: int) -> torch.Tensor:
        """``h`` entering ``layer``: the seeded model input for the first layer, else the
        residual stream the previous layer (or the previous stage's send) left."""
        if layer == self.first_layer:
            return db.stream_input(self.model, self.iteration, mb, self.source,
                                   self.tokens).to(self.device, self.dtype)
        return self.h[mb]

    def _attention_fwd(self, op: Compute) -> Callable[[], None]:
        key = (op.micro_batch, op.layer)

        def work() -> None:
            if self.tp == 1:
                self.h_in[key] = self.layer_input(*key)
                x = self.h_in[key]
            else:
                x = self.gathered.pop(key)
            leaf = x.detach().requires_grad_(True)
            w = self.weights(op.layer)
            if key in self.ckpt_full:  # only the layer input is kept (full recompute)
                with torch.no_grad():
                    out = db.attention(leaf, w, self.model.seq_len)
            elif key in self.ckpt_core:
                from moesim.executor.flow_recompute import attention_without_core

                out = attention_without_core(self, key, leaf, w)
            else:
                with torch.enable_grad(), self.counting(key):
                    out = db.attention(leaf, w, self.model.seq_len)
                self.graph[key] = (leaf, w, out)
            self.done_with_weights(op.layer)
            self.put_attention(key, out.detach())
            self.note(key)
        return work

    def _route(self, op: Compute) -> Callable[[], None]:
        """``h_mid = h_in + attn`` and the router's logits (routing stays forced)."""
        key = (op.micro_batch, op.layer)
        router = self.routers[op.layer]

        recompute_moe = op.label == "recompute" and key not in self.ckpt_full

        def work() -> None:
            if recompute_moe:  # selective "moe": h_mid was kept, only the router reruns
                db.router_logits(self.h_mid[key], router)
                return
            attn = self.attn_out.pop(key)
            h_mid = self.h_in[key] + attn
            db.router_logits(h_mid, router)
            self.h_mid[key] = h_mid
            self.note(key)
        return work

    def _moe_a2a(self, op: AllToAll) -> Callable[[], None]:
        """The interpreter's token all-to-all with the real activations in and out."""
        inner = self.ex._all_to_all(op)
        key = (op.micro_batch, op.layer)
        lp = self.ex.passes[key]
        step = (op.phase, op.direction, op.label == "recompute")

        def work() -> None:
            if step[:2] == ("dispatch", "fwd"):
                lp.inputs.x_NH = self.h_mid[key]
            elif step[:2] == ("combine", "bwd"):
                lp.inputs.grad_out_NH = self.start_grad(*key)
            inner()
            if step == ("combine", "fwd", False):
                self.h[op.micro_batch] = self.h_mid[key] + lp.out_NH
                if op.layer == self.last_layer:
                    self.outputs[op.micro_batch] = self.h[op.micro_batch]
                self.fwd_done.add(key)
                if key in self.ckpt_moe:
                    self.drop_moe(key)
                if key in self.ckpt_full:
                    self.h_mid.pop(key, None)
            elif step[:2] == ("dispatch", "bwd"):
                self.g_mid[key] = lp.inputs.grad_out_NH + lp.grad_x_NH
                lp.recv_MH = lp.grad_recv_MH = lp.grad_x_recv_MH = None
            self.note(key)
        return work

    # -- backward ----------------------------------------------------------------------------
    def start_grad(self, mb: int, layer: int) -> torch.Tensor:
        """``g`` entering ``layer``'s backward: the seeded loss gradient for the last layer,
        else what the layer above (or the next stage's send) left."""
        if layer == self.last_layer:
            return db.stream_grad(self.model, self.iteration, mb, self.source,
                                  self.tokens).to(self.device, self.dtype)
        return self.g[mb]

    def _attention_bwd(self, op: Compute) -> Callable[[], None]:
        key = (op.micro_batch, op.layer)

        def work() -> None:
            grad_P = self.g_mid[key] if self.tp == 1 else self.gathered.pop(key)
            grad_x = self.attention_grads(key, grad_P)
            self.done_with_weights(op.layer)
            if self.tp == 1:
                self.finish_layer_grad(key, grad_x)
            else:
                self.grad_partial[key] = grad_x
        return work

    def attention_grads(self, key: tuple[int, int], grad_P: torch.Tensor) -> torch.Tensor:
        """Backward of the attention segment of ``key`` (autograd on its kept graph): adds
        the weight gradients into this rank's dense gradient, returns the input gradient."""
        from moesim.executor.flow_recompute import core_grads

        if key in self.core_graph:
            return core_grads(self, key, grad_P)
        leaf, w, out = self.graph.pop(key)
        grads = torch.autograd.grad(out, [leaf, w["qkv"], w["out"]], grad_P)
        self.add_dense_grads(key[1], grads[1], grads[2])
        return grads[0]

    def finish_layer_grad(self, key: tuple[int, int], grad_h: torch.Tensor) -> None:
        """``g = g_mid + grad_h`` (the residual's two paths) and release the layer's state."""
        mb = key[0]
        self.g[mb] = self.g_mid.pop(key) + grad_h
        if key[1] == self.first_layer:
            self.input_grads[mb] = self.g[mb]
        self.release(key)
