"""A single-process reference of the whole layer stack under a layout, for checking the dataflow.

:func:`reference_stack` runs, in float64 with autograd, every micro-batch of one iteration
through every MoE layer of the model for every token source of a pipeline stage (the ``n =
world / pp`` stage ranks; under PP the ranks at the same position of every stage carry the same
tokens), exactly as :mod:`moesim.executor.dense_block` defines the model: whole attention
weights (all heads) over each TP group's concatenated sequence shards, the MoE layer of
:func:`moesim.executor.reference.moe_outputs` with the program's forced routes (source
``i``'s route row under expert TP: :func:`~moesim.executor.moe_etp.route_row`), residual
adds, and ``loss = Σ_mb Σ_i Σ h_out ⊙ grad`` with the seeded upstream gradient. No parallelism at
all: no shards, no collectives, no stages, no recompute — what every layout must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moesim.executor import dense_block as db
from moesim.executor.moe_etp import route_row
from moesim.executor.reference import moe_outputs
from moesim.executor.replay import expert_weights, layer_inputs
from moesim.ops import Program
from moesim.specs import ModelSpec


@dataclass
class StackReference:
    """Outputs and input gradients per (micro-batch, source); full dense weight gradients per
    layer (``{"qkv": [H, 3, a, d], "out": [a, d, H]}``); expert gradients per (layer, expert)."""

    outputs: dict[int, list[torch.Tensor]]
    input_grads: dict[int, list[torch.Tensor]]
    dense_grads: dict[int, dict[str, torch.Tensor]]
    expert_grads: dict[tuple[int, int], torch.Tensor]


def reference_stack(program: Program, model: ModelSpec, sources: int, tp: int,
                    iteration: int) -> StackReference:
    """The whole stack on ``sources`` token sources in TP groups of ``tp`` (module docstring)."""
    T, s = model.tokens_per_rank, model.seq_len
    mbs = sorted({mb for mb, _ in program.routes})
    layers = sorted({l for _, l in program.routes})
    dense = {l: {k: v.double().requires_grad_(True)
                 for k, v in db.dense_weights(model, l).items() if k != "router"}
             for l in layers}
    experts = {(l, e): expert_weights(model, l, e).double().requires_grad_(True)
               for l in layers for e in range(model.num_experts)}
    inputs, outputs, loss = {}, {}, torch.zeros((), dtype=torch.float64)
    for mb in mbs:
        inputs[mb] = [db.stream_input(model, iteration, mb, i, T).double().requires_grad_(True)
                      for i in range(sources)]
        h = list(inputs[mb])
        for l in layers:
            h_mid = []
            for g0 in range(0, sources, tp):
                P = db.attention(torch.cat(h[g0:g0 + tp]), dense[l], s)
                h_mid += [h[g0 + j] + P[j * T:(j + 1) * T] for j in range(tp)]
            route = program.routes[(mb, l)]
            lis = [layer_inputs(route, route_row(route, i), model, iteration, mb, l)
                   for i in range(sources)]
            ws = {e: experts[(l, e)] for e in range(model.num_experts)}
            moe = moe_outputs(route, lis, h_mid, ws, model)
            h = [a + b for a, b in zip(h_mid, moe, strict=True)]
        outputs[mb] = [x.detach() for x in h]
        for i, x in enumerate(h):
            loss = loss + (x * db.stream_grad(model, iteration, mb, i, T).double()).sum()
    leaves = [x for mb in mbs for x in inputs[mb]]
    dense_leaves = [dense[l][k] for l in layers for k in ("qkv", "out")]
    exp_keys = sorted(experts)
    grads = torch.autograd.grad(loss, leaves + dense_leaves + [experts[k] for k in exp_keys],
                                allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(x)
             for g, x in zip(grads, leaves + dense_leaves + [experts[k] for k in exp_keys],
                             strict=True)]
    it = iter(grads)
    input_grads = {mb: [next(it) for _ in range(sources)] for mb in mbs}
    dense_grads = {l: {k: next(it) for k in ("qkv", "out")} for l in layers}
    expert_grads = {k: next(it) for k in exp_keys}
    return StackReference(outputs, input_grads, dense_grads, expert_grads)


def reference_flat(ref: StackReference, layers: list[int], tp_index: int, tp: int
                   ) -> torch.Tensor:
    """The reference dense gradient laid out as a rank's flat vector (its TP shard of each
    held layer, ``[qkv | out]`` per layer, in layer order)."""
    parts = []
    for l in layers:
        sh = db.tp_shard(ref.dense_grads[l] | {"router": torch.zeros(0)}, tp_index, tp)
        parts += [sh["qkv"].reshape(-1), sh["out"].reshape(-1)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def held_experts(program: Program) -> set[tuple[int, int]]:
    """(layer, expert) pairs some slot holds in the program's routes."""
    return {(l, int(e)) for (_, l), r in program.routes.items()
            for e in np.asarray(r.phy2log_P) if e >= 0}
