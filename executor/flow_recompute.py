"""Activation recomputation in the layout dataflow, with the simulator's scope, op by op.

The lowering (:mod:`moesim.layer_ops`) emits a layer's recomputed forward work as ops labelled
``recompute`` just before the layer's backward; the dataflow runs exactly those ops, so each
is timed where the simulator prices it (``torch.utils.checkpoint`` reruns the forward inside
the backward call, which would fold them into the backward op and lose that timing). What the
forward keeps follows Megatron-Core's recompute granularities (Korthikanti et al. 2022, §5):

- ``full`` (``recompute=full``, its ``recompute_num_layers`` first layers of each chunk): the
  forward keeps only the layer's input ``h``; its attention runs without a graph and its MoE
  part drops the dispatched tokens and the expert activations. The recompute ops (TP
  all-gather, attention, reduce-scatter, router, dispatch, experts, combine) rebuild them,
  dispatch and combine moving the tokens again for real.
- ``moe`` (selective): the MoE part alone is dropped and recomputed (router, dispatch,
  experts, combine), the attention's graph is kept.
- ``core_attn`` (selective): the QKV projection's and the output projection's graphs are
  kept, the score/softmax/value products (the ``5·a·s/h`` term of Korthikanti et al.'s
  activation formula) are not: their forward runs without a graph and the recompute op
  (``4·s·H`` FLOPs per token, as priced) rebuilds it from the kept QKV.

- ``moe_act`` (selective): each expert slot's forward keeps its input and its first GEMMs'
  outputs but drops the activation output (``silu(h1)⊙h3``, or ``gelu(h1)``: ``F`` per row,
  ``F/et`` under expert TP); the recompute op (phase ``expert``) rebuilds it from what was
  kept (:func:`~moesim.executor.replay.ffn_activation`) just before the combine backward.

``layernorm``, ``mlp`` and ``mla_up_proj`` are refused by
:func:`moesim.executor.capabilities.check_layout` (the executor's model has no affine
LayerNorm, no dense MLP layers and no MLA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moesim.executor import dense_block as db
from moesim.executor.replay import ffn_activation
from moesim.ops import Compute


def supported(flow, op: Compute) -> bool:
    """A recompute op the dataflow runs: a full layer's or the core attention's."""
    key = (op.micro_batch, op.layer)
    return op.kind == "attention" and (key in flow.ckpt_full or key in flow.ckpt_core)


def compile_dense(flow, op: Compute) -> Callable[[], None]:
    """The recompute op of an attention: the whole block (full) or its core (core_attn)."""
    key, s = (op.micro_batch, op.layer), flow.model.seq_len

    def full() -> None:
        x = flow.h_in[key] if flow.tp == 1 else flow.gathered.pop(key)
        leaf = x.detach().requires_grad_(True)
        w = flow.weights(op.layer)
        with torch.enable_grad(), flow.counting(key):
            out = db.attention(leaf, w, s)
        flow.graph[key] = (leaf, w, out)
        flow.put_attention(key, out.detach())
        flow.note(key)

    def core() -> None:
        cg = flow.core_graph[key]
        with torch.enable_grad(), flow.counting(key):
            cg["ctx2"] = db.core_attention(cg["qkv"], s)
        flow.note(key)
    return full if key in flow.ckpt_full else core


def is_moe_act(op: Compute) -> bool:
    """The ``moe_act`` recompute op: an expert-phase recompute op that is not an expert FFN."""
    return op.phase == "expert" and op.label == "recompute" and op.kind != "expert_ffn"


def expert_fwd_without_act(flow, op: Compute) -> Callable[[], None]:
    """The expert forward of a ``moe_act`` layer: the slots' FFNs as usual, then each slot's
    activation output dropped from what the backward keeps."""
    key = (op.micro_batch, op.layer)
    inner, lp = flow.ex._compute(op), flow.ex.passes[key]

    def work() -> None:
        inner()
        lp.saved = [(s, (*saved[:-1], None)) for s, saved in lp.saved]
        flow.note(key)
    return work


def compile_moe_act(flow, op: Compute) -> Callable[[], None]:
    """The ``moe_act`` recompute op: every active slot's activation output rebuilt from its
    kept first-GEMM outputs."""
    key = (op.micro_batch, op.layer)
    lp, gated = flow.ex.passes[key], flow.ex.expert_model.gated

    def work() -> None:
        assert all(saved[-1] is None for _, saved in lp.saved), "moe_act recomputed twice"
        lp.saved = [(s, (*saved[:-1], ffn_activation(saved[:-1], gated=gated)))
                    for s, saved in lp.saved]
        flow.note(key)
    return work


def attention_without_core(flow, key: tuple[int, int], leaf: torch.Tensor,
                           w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attention forward of a ``core_attn`` layer: graphs of the projections only."""
    with torch.enable_grad(), flow.counting(key):
        qkv = db.qkv_projection(leaf, w["qkv"])
    with torch.no_grad():
        ctx = db.core_attention(qkv.detach(), flow.model.seq_len)
    ctx_leaf = ctx.requires_grad_(True)
    with torch.enable_grad(), flow.counting(key):
        out = db.out_projection(ctx_leaf, w["out"])
    flow.core_graph[key] = {"leaf": leaf, "w": w, "qkv": qkv, "ctx_leaf": ctx_leaf,
                            "out": out, "ctx2": None}
    return out


def core_grads(flow, key: tuple[int, int], grad_P: torch.Tensor) -> torch.Tensor:
    """Backward of a ``core_attn`` layer's attention through the recomputed core."""
    cg = flow.core_graph.pop(key)
    assert cg["ctx2"] is not None, "core attention backward before its recompute"
    g_ctx, g_out = torch.autograd.grad(cg["out"], [cg["ctx_leaf"], cg["w"]["out"]], grad_P)
    g_leaf, g_qkv = torch.autograd.grad(cg["ctx2"], [cg["leaf"], cg["w"]["qkv"]], g_ctx)
    flow.add_dense_grads(key[1], g_qkv, g_out)
    return g_leaf
