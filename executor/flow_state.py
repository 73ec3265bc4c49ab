"""What the layout dataflow (:mod:`moesim.executor.dataflow`) keeps on one rank.

- the rank's place in the layout: its pipeline stage's first world rank, its index in the
  stage (its *token source*: row of the routes, and the seed of its data), its TP index
  (heads ``[i·a/t, (i+1)·a/t)``) and its DP index (which ``1/d`` of the dense shard its
  optimizer updates);
- the dense parameters of the MoE layers its stage holds, one flat vector
  ``[qkv_l | out_l]`` per held layer in layer order (this rank's TP shard,
  :func:`~moesim.executor.dense_block.tp_shard`), and their gradient of the same layout, so the
  program's dense gradient and parameter collectives move the real tensors;
- per micro-batch the residual stream ``h`` / its gradient ``g``, and per (micro-batch, layer)
  what the backward needs (layer input, ``h_mid``, the attention's kept graph);
- under ZeRO-3 (:mod:`moesim.executor.flow_zero3`) only this rank's chunks of them;
- ``saved_peak_bytes``: the most bytes of activations held for the backward at any point of
  the walk (the attention graphs' saved tensors, weights excluded, counted with
  ``torch.autograd.graph.saved_tensors_hooks``, plus the stream tensors and the MoE layer's
  kept activations), which is how the tests see recomputation shrink memory.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from moesim.executor import dense_block as db
from moesim.executor import flow_zero3
from moesim.layout import ParallelLayout
from moesim.ops import Compute, Program


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class FlowState:
    """State of :class:`~moesim.executor.dataflow.LayoutFlow` (module docstring)."""

    def __init__(self, ex, layout: ParallelLayout) -> None:
        self.ex, self.layout, self.model = ex, layout, ex.model
        self.device, self.dtype = ex.device, ex.dtype
        self.n = ex.world // layout.pp
        self.first_rank = ex.rank // self.n * self.n
        self.source = ex.rank - self.first_rank
        self.tp = layout.tp
        self.tp_index, self.dp_index = self.source % self.tp, self.source // self.tp
        self.tokens = self.model.tokens_per_rank
        self.offsets: dict[int, tuple[int, int, int]] = {}   # layer → (start, qkv end, end)
        self.flat = self.flat_grad = torch.zeros(0)
        self.routers: dict[int, torch.Tensor] = {}
        self.z3_d: int | None = None   # ZeRO-3 DP size once installed (1: not sharded)
        self.saved_peak_bytes = 0

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self, program: Program, iteration: int, held: list[int]) -> None:
        """Install the dense shards of the ``held`` MoE layers (once), zero the gradients
        and the per-iteration state."""
        db.check_model(self.model, self.tp, self.tokens * self.tp)
        self.iteration = iteration
        layers = sorted({k[1] for k in program.routes})
        self.first_layer, self.last_layer = layers[0], layers[-1]
        if sorted(self.offsets) != sorted(held) or self.z3_d is None:
            self._install(held)
            d = flow_zero3.dp_size(self, program) if self.layout.zero == 3 else 1
            if d > 1:
                flow_zero3.shard(self, d)
            self.z3_d = d
        full = max((c for _, _, c in self.offsets.values()), default=0)
        self.flat_grad = torch.zeros(full, dtype=self.dtype, device=self.device)
        self.dense_local: torch.Tensor | None = None
        self.dense_synced: tuple | None = None   # (kind "all" | "chunk" | "layers", tensor, d)
        if self.z3_d > 1:
            self.z3_grad = torch.zeros_like(self.flat)
            self.dense_synced = ("layers", self.z3_grad, self.z3_d)
        self.h: dict[int, torch.Tensor] = {}
        self.g: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.input_grads: dict[int, torch.Tensor] = {}
        self.h_in: dict = {}
        self.h_mid: dict = {}
        self.g_mid: dict = {}
        self.gathered: dict = {}
        self.partial: dict = {}
        self.attn_out: dict = {}
        self.grad_partial: dict = {}
        self.graph: dict = {}
        self.core_graph: dict = {}
        self.graph_bytes: dict = {}
        self.held_bytes: dict = {}
        self.fwd_done: set = set()
        self.saved_peak_bytes = 0
        self._recompute_sets(program)

    def _install(self, held: list[int]) -> None:
        parts, pos = [], 0
        self.offsets = {}
        for layer in held:
            w = db.tp_shard(db.dense_weights(self.model, layer), self.tp_index, self.tp)
            q, o = w["qkv"].reshape(-1), w["out"].reshape(-1)
            self.offsets[layer] = (pos, pos + q.numel(), pos + q.numel() + o.numel())
            pos += q.numel() + o.numel()
            parts += [q, o]
            self.routers[layer] = w["router"].to(self.device, self.dtype)
        self.flat = (torch.cat(parts) if parts else torch.zeros(0)).to(self.device, self.dtype)
        self.shapes = {"qkv": w["qkv"].shape, "out": w["out"].shape} if held else {}

    def _recompute_sets(self, program: Program) -> None:
        """Which (micro-batch, layer) keys the program recomputes, and how: ``full`` (a
        recomputed attention with a recomputed router: the whole layer), ``moe`` (router and
        MoE part only), ``core`` (the score/value products only), ``act`` (the experts'
        activation outputs only: an expert-phase recompute op that is not an expert FFN)."""
        kinds: dict[tuple[int, int], set] = {}
        for op in program.ops:
            if op.label == "recompute" and isinstance(op, Compute) and self.ex._takes_part(op):
                kinds.setdefault((op.micro_batch, op.layer), set()).add((op.phase, op.kind))
        self.ckpt_full = {k for k, v in kinds.items()
                          if ("route", "router") in v and ("dense", "attention") in v}
        self.ckpt_moe = {k for k, v in kinds.items() if ("route", "router") in v}
        self.ckpt_core = {k for k, v in kinds.items()
                          if ("dense", "attention") in v and k not in self.ckpt_full}
        self.ckpt_act = {k for k, v in kinds.items()
                         if any(p == "expert" and kd != "expert_ffn" for p, kd in v)}

    # -- parameters ----------------------------------------------------------------------------
    def weights(self, layer: int) -> dict[str, torch.Tensor]:
        """Leaves (sharing the flat vector's storage, or under ZeRO-3 the gathered buffer's)
        of ``layer``'s QKV and output shards."""
        if self.z3_d > 1:
            return flow_zero3.weights(self, layer)
        a, b, c = self.offsets[layer]
        return {"qkv": self.flat[a:b].view(self.shapes["qkv"]).detach().requires_grad_(True),
                "out": self.flat[b:c].view(self.shapes["out"]).detach().requires_grad_(True)}

    def done_with_weights(self, layer: int) -> None:
        """An attention op finished with ``layer``'s weights (ZeRO-3 frees its buffer)."""
        if self.z3_d > 1:
            flow_zero3.used(self, layer)

    def add_dense_grads(self, layer: int, g_qkv: torch.Tensor, g_out: torch.Tensor) -> None:
        a, b, c = self.offsets[layer]
        self.flat_grad[a:b] += g_qkv.reshape(-1)
        self.flat_grad[b:c] += g_out.reshape(-1)

    def dense_chunk(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's DP share (``numel`` elements) of the flat dense parameters and grads
        (under ZeRO-3: its chunks and their reduced gradients)."""
        if self.z3_d > 1:
            return self.flat[:numel], self.z3_grad[:numel]
        k = min(numel, self.flat.numel())
        start = self.dp_index * k if (self.dp_index + 1) * k <= self.flat.numel() else 0
        return self.flat[start:start + k], self.flat_grad[start:start + k]

    def put_attention(self, key: tuple[int, int], out: torch.Tensor) -> None:
        """The attention's output: the TP reduce-scatter's input, or (no TP) the route's."""
        (self.partial if self.tp > 1 else self.attn_out)[key] = out

    # -- activation accounting -----------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, key: tuple[int, int]):
        """Count the bytes autograd saves for the backward inside the block."""
        params = {self.flat.untyped_storage().data_ptr()} | {
            b.untyped_storage().data_ptr() for b in getattr(self, "z3_bufs", {}).values()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:  # weights are not activations
                self.graph_bytes[key] = self.graph_bytes.get(key, 0) + _nbytes(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def note(self, key: tuple[int, int]) -> None:
        """Re-count what ``key`` holds for the backward and update the peak."""
        b = self.graph_bytes.get(key, 0)
        for store in (self.h_in, self.h_mid):
            b += _nbytes(store.get(key))
        if key in self.graph:
            b += _nbytes(self.graph[key][2])
        if key in self.core_graph:
            b += _nbytes(self.core_graph[key]["out"])
        lp = self.ex.passes.get(key)
        if lp is not None:
            b += sum(_nbytes(x) for _, saved in lp.saved for x in saved) + _nbytes(lp.recv_MH)
        self.held_bytes[key] = b
        self.saved_peak_bytes = max(self.saved_peak_bytes, sum(self.held_bytes.values()))

    def drop_moe(self, key: tuple[int, int]) -> None:
        """Free the MoE part's kept activations (it is recomputed before the backward)."""
        lp = self.ex.passes[key]
        lp.saved, lp.recv_MH, lp.y_recv_MH = [], None, None

    def release(self, key: tuple[int, int]) -> None:
        """The layer's backward is done: drop everything it kept."""
        for store in (self.h_in, self.h_mid, self.graph_bytes, self.held_bytes):
            store.pop(key, None)


def held_layers(program: Program, rank: int) -> list[int]:
    """MoE layers whose dispatch this rank takes part in (its stage's layers)."""
    from moesim.ops import AllToAll

    out = set()
    for op in program.ops:
        if isinstance(op, AllToAll) and op.phase == "dispatch" and op.layer >= 0:
            if op.ranks is None or rank in np.asarray(op.ranks):
                out.add(op.layer)
    return sorted(out)
