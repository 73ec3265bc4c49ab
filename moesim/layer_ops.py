"""The ops of one stage chunk's forward or backward under a parallel layout.

:func:`chunk_forward` and :func:`chunk_backward` emit, through a stage's
:class:`~moesim.lowering.LoweringContext`, the ops of one micro-batch over one chunk of
transformer layers, and *yield* after each segment of every layer, so that the all-to-all
overlap (:mod:`moesim.pipeline` fused steps) can interleave one micro-batch's forward with
another's backward segment by segment — each one's all-to-all then runs on the comm stream
beside the other's compute (Megatron-Core's combined 1F1B). Without overlap the caller simply
runs a generator to its end. All ranks, groups and layer numbers here are the stage's own
(``0..n−1``; MoE layers by their index inside the stage); the context translates them.

Per MoE layer, forward: ``[param_gather] [ZeRO-3 gather] [TP all-gather (SP)] attention (dense)
[CP ring] [TP reduce-scatter (SP) | all-reduce (no SP)] route [after_route] dispatch
[ETP all-gather] expert [ETP reduce-scatter] combine`` (ETP: :mod:`moesim.expert_tp`);
backward mirrors it, with recomputed forward work first where the layout says so.
Dense transformer layers (``num_dense_layers``) run an attention block and an FFN block, each
inside its TP region. Communication sizes (Megatron: Shoeybi et al. 2019, Korthikanti et al.
2022): each TP collective moves the block's activation ``(s/c)·b·h`` elements = ``T·t·h``
(``T`` tokens per rank); a CP ring step passes K and V, ``2·T·t·h_kv`` elements per rank
forward and twice that backward.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from moesim.ops import AllGather, AllReduce, AllToAll, Compute, ReduceScatter, SendRecv

Carry = tuple[int, ...]


# -- sizes ------------------------------------------------------------------------------------
def attention_flops(model: Any) -> float:
    """Forward FLOPs per token of a layer's attention, shared experts excluded."""
    return model.attention_flops_per_token \
        - model.num_shared_experts * model.expert_flops_per_token


def dense_ffn_params(model: Any) -> float:
    """Weights of a dense layer's FFN (:attr:`ModelSpec.dense_ffn_size`, gated like the
    experts); its forward FLOPs per token are twice that."""
    return float((3 if model.gated else 2) * model.hidden_size * model.dense_ffn_size)


def kv_elements(model: Any) -> int:
    """K plus V elements per token that ring attention passes: ``2·g·d`` under GQA (``g``
    query groups of width ``d``), ``a·(qk_nope + qk_rope + v)`` under MLA (the up-projected
    keys and values), ``2·H`` when the heads are unknown."""
    if model.is_mla:
        return model.num_attention_heads * (model.qk_nope_head_dim + model.qk_rope_head_dim
                                            + model.v_head_dim)
    if model.num_attention_heads:
        return 2 * model.num_query_groups * model.attention_head_dim
    return 2 * model.hidden_size


def layer_dense_params(model: Any, layer: int, num_dense_layers: int) -> float:
    """Non-expert parameters of transformer layer ``layer`` (dense layers:
    :attr:`ModelSpec.dense_layer_params`; MoE layers: ``dense_params``)."""
    if layer < num_dense_layers:
        return float(model.dense_layer_params)
    return float(model.dense_params)


# -- the TP / CP / ZeRO-3 pieces --------------------------------------------------------------
def _tp_in(ctx, mb: int, layer: int, direction: str, deps: Carry) -> Carry:
    """SP's all-gather at the start of a TP region (forward: activations; backward: the
    reduce-scatter's gradient)."""
    t = ctx.layout.tp
    if t == 1 or not ctx.layout.sp:
        return deps
    return (ctx.add(AllGather(phase="dense", direction=direction, layer=layer,
                              micro_batch=mb, deps=deps, groups=ctx.tp_groups,
                              bytes_G=np.full(len(ctx.tp_groups), ctx.tp_bytes),
                              label="tp_all_gather")),)


def _tp_out(ctx, mb: int, layer: int, direction: str, deps: Carry) -> Carry:
    """End of a TP region: SP's reduce-scatter, or without SP an all-reduce (forward: the
    row-parallel output; backward: the column-parallel input gradient)."""
    t = ctx.layout.tp
    if t == 1:
        return deps
    cls, label = ((ReduceScatter, "tp_reduce_scatter") if ctx.layout.sp
                  else (AllReduce, "tp_all_reduce"))
    return (ctx.add(cls(phase="dense", direction=direction, layer=layer, micro_batch=mb,
                        deps=deps, groups=ctx.tp_groups,
                        bytes_G=np.full(len(ctx.tp_groups), ctx.tp_bytes), label=label)),)


def _cp_ring(ctx, mb: int, layer: int, direction: str, deps: Carry) -> Carry:
    """Ring attention's ``c − 1`` K/V exchange steps on the comm stream, beside the attention
    compute; returns the last step (what the attention's consumer waits for)."""
    c = ctx.layout.cp
    if c == 1:
        return ()
    src, dst = ctx.cp_ring_pairs
    nbytes = ctx.cp_bytes * (2 if direction == "bwd" else 1)
    last: Carry = deps
    for step in range(c - 1):
        last = (ctx.add(SendRecv(phase="dense", direction=direction, layer=layer,
                                 micro_batch=mb, deps=last, src_N=src, dst_N=dst,
                                 bytes_N=np.full(len(src), nbytes),
                                 label=f"cp_ring_{step}")),)
    return last


def _zero3_gather(ctx, mb: int, layer: int, tlayer: int, direction: str) -> Carry:
    """ZeRO-3 / FSDP: all-gather the layer's (TP-sharded) dense parameters over DP on the
    prefetch stream, in the forward and again in the backward of every micro-batch."""
    if ctx.layout.zero != 3 or ctx.dp_size < 2:
        return ()
    nbytes = layer_dense_params(ctx.model, tlayer, ctx.num_dense) / ctx.layout.tp \
        * ctx.model.bytes_weight
    return (ctx.add(AllGather(phase="param_gather", direction=direction, stream="prefetch",
                              layer=layer, micro_batch=mb, groups=ctx.dp_groups,
                              bytes_G=np.full(len(ctx.dp_groups), nbytes),
                              label="zero3_gather")),)


def _block(ctx, mb: int, layer: int, direction: str, deps: Carry, kw: dict,
           gather: Carry = (), label: str = "") -> Carry:
    """One TP region: ``[all-gather] compute [CP ring] [reduce-scatter | all-reduce]``."""
    pre = _tp_in(ctx, mb, layer, direction, deps)
    ring = _cp_ring(ctx, mb, layer, direction, pre) if kw.get("kind") == "attention" else ()
    op = ctx.add(Compute(phase="dense", direction=direction, layer=layer, micro_batch=mb,
                         deps=pre + gather, label=label, **kw))
    return _tp_out(ctx, mb, layer, direction, (op, *ring))


# -- forward ----------------------------------------------------------------------------------
def chunk_forward(ctx, mb: int, layers: tuple[int, ...], carry: Carry,
                  label: str = "") -> Generator[None, None, Carry]:
    """Forward of micro-batch ``mb`` over transformer ``layers``; yields after each segment
    (attention+route, dispatch, expert, combine for MoE layers; attention, FFN for dense
    ones) and returns the carry (the ops the next chunk waits for)."""
    ctx.gather_anchor = -1
    for tl in layers:
        if tl < ctx.num_dense:
            carry = yield from _dense_layer_forward(ctx, mb, tl, carry, label)
            continue
        l = ctx.local_moe[tl]
        gdeps = tuple(ctx.policy.lower_param_gather(ctx, mb, l, "fwd"))
        z3 = _zero3_gather(ctx, mb, l, tl, "fwd")
        carry = yield from _moe_forward(ctx, mb, l, carry, gdeps, z3, label)
    return carry


def _dense_layer_forward(ctx, mb: int, tl: int, carry: Carry, label: str):
    attn_kw, ffn_kw = ctx.dense_layer_kw()
    z3 = _zero3_gather(ctx, mb, -1, tl, "fwd")
    carry = _block(ctx, mb, -1, "fwd", carry, attn_kw, z3, label)
    yield
    carry = _block(ctx, mb, -1, "fwd", carry, ffn_kw, (), label)
    yield
    return carry


def _moe_forward(ctx, mb: int, l: int, carry: Carry, gdeps: Carry, z3: Carry, label: str):
    """One MoE layer's forward (also its recompute, with ``label="recompute"``)."""
    dense_kw, route_kw = ctx.layer_kw()
    if ctx.plain:  # no TP/CP: the ops exactly as moesim lowered before layouts
        post = (ctx.add(Compute(phase="dense", layer=l, micro_batch=mb, deps=carry + z3,
                                label=label, **dense_kw)),)
    else:
        post = _block(ctx, mb, l, "fwd", carry, dense_kw, z3, label)
    route = ctx.add(Compute(phase="route", layer=l, micro_batch=mb, deps=post, label=label,
                            **route_kw))
    after = tuple(ctx.policy.lower_after_route(ctx, mb, l)) if not label else ()
    yield
    disp = ctx.add(AllToAll(phase="dispatch", layer=l, micro_batch=mb, deps=(route, *after),
                            bytes_RR=ctx.bytes_MLRG(mb, l), ranks=ctx.a2a_ranks, label=label))
    gathered = ctx.etp_collective(True, mb, l, "fwd", (disp,), label)
    yield
    exp = ctx.add(ctx.expert_op(mb, l, "fwd", (*gathered, *gdeps), label))
    yield
    scattered = ctx.etp_collective(False, mb, l, "fwd", (exp,), label)
    out = (ctx.add(AllToAll(phase="combine", layer=l, micro_batch=mb, deps=scattered,
                            bytes_RR=ctx.bytes_MLRG(mb, l).T, ranks=ctx.a2a_ranks,
                            label=label)),)
    ctx.gather_anchor = exp
    yield
    return out


# -- backward ---------------------------------------------------------------------------------
def chunk_backward(ctx, mb: int, layers: tuple[int, ...], carry: Carry,
                   last: bool) -> Generator[None, None, Carry]:
    """Backward of ``mb`` over ``layers`` (in reverse); ``last``: this is the iteration's
    last backward of the chunk (per-layer gradient hooks and ZeRO-3 reduce-scatters run)."""
    moe = [tl for tl in layers if tl >= ctx.num_dense]
    gdeps = (tuple(ctx.policy.lower_param_gather(ctx, mb, ctx.local_moe[moe[-1]], "bwd"))
             if moe else ())  # gather_anchor: still the forward's last expert op
    for tl in reversed(layers):
        rc = ctx.recomputes(tl)
        if tl < ctx.num_dense:
            carry = yield from _dense_layer_backward(ctx, mb, tl, carry, rc, last)
            continue
        l = ctx.local_moe[tl]
        below = [x for x in moe if x < tl]
        carry, gdeps = yield from _moe_backward(ctx, mb, l, tl, carry, gdeps, rc, last,
                                                ctx.local_moe[below[-1]] if below else None)
    return carry


def _recompute(ctx, mb: int, l: int, tl: int, carry: Carry, gdeps: Carry,
               modules: frozenset, z3: Carry = ()) -> Carry:
    """Recomputed forward work of one MoE layer before its backward (``full`` or ``moe``:
    the whole forward, dispatch and combine included; ``core_attn``: the score/value
    products; ``moe_act`` / ``layernorm``: their elementwise work); returns the new deps.
    ``z3``: the backward's ZeRO-3 gather of the layer's parameters, which the first
    recomputed op waits for."""
    if "full" in modules or "moe" in modules:
        gen = _moe_forward(ctx, mb, l, carry, gdeps, z3, "recompute") if "full" in modules \
            else None
        if gen is None:  # "moe" alone: the MoE part, after the (not recomputed) attention
            route_kw = ctx.layer_kw()[1]
            carry = (ctx.add(Compute(phase="route", layer=l, micro_batch=mb,
                                     deps=carry + z3, label="recompute", **route_kw)),)
            disp = ctx.add(AllToAll(phase="dispatch", layer=l, micro_batch=mb, deps=carry,
                                    bytes_RR=ctx.bytes_MLRG(mb, l), ranks=ctx.a2a_ranks,
                                    label="recompute"))
            gathered = ctx.etp_collective(True, mb, l, "fwd", (disp,), "recompute")
            exp = ctx.add(ctx.expert_op(mb, l, "fwd", (*gathered, *gdeps), "recompute"))
            scattered = ctx.etp_collective(False, mb, l, "fwd", (exp,), "recompute")
            return (ctx.add(AllToAll(phase="combine", layer=l, micro_batch=mb, deps=scattered,
                                     bytes_RR=ctx.bytes_MLRG(mb, l).T, ranks=ctx.a2a_ranks,
                                     label="recompute")),)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value
    for name, kw in ctx.selective_kw(mb, l, tl, modules):
        carry = (ctx.add(Compute(phase="dense" if name != "moe_act" else "expert",
                                 layer=l, micro_batch=mb, deps=carry + z3, label="recompute",
                                 **kw)),)
        z3 = ()
    return carry


def _moe_backward(ctx, mb: int, l: int, tl: int, carry: Carry, gdeps: Carry,
                  rc: frozenset, last: bool, below: int | None):
    # ZeRO-3 / FSDP gathers a layer's parameters when its backward begins; a recomputed
    # forward runs then and needs them, so with recomputation the gather comes first
    z3 = _zero3_gather(ctx, mb, l, tl, "bwd") if rc else None
    if rc:
        carry = _recompute(ctx, mb, l, tl, carry, gdeps, rc, z3)
    cb = ctx.add(AllToAll(phase="combine", direction="bwd", layer=l, micro_batch=mb,
                          deps=carry, bytes_RR=ctx.bytes_MLRG(mb, l), ranks=ctx.a2a_ranks))
    grads_in = ctx.etp_collective(True, mb, l, "bwd", (cb,))  # the output gradients
    yield
    eb = ctx.add(ctx.expert_op(mb, l, "bwd", (*grads_in, *gdeps)))
    ctx.gather_anchor = eb
    if below is not None:
        gdeps = tuple(ctx.policy.lower_param_gather(ctx, mb, below, "bwd"))
    yield
    grads_out = ctx.etp_collective(False, mb, l, "bwd", (eb,))  # the input gradients
    db = ctx.add(AllToAll(phase="dispatch", direction="bwd", layer=l, micro_batch=mb,
                          deps=grads_out, bytes_RR=ctx.bytes_MLRG(mb, l).T,
                          ranks=ctx.a2a_ranks))
    yield
    bwd_kw = ctx.backward_kw()
    if z3 is None:
        z3 = _zero3_gather(ctx, mb, l, tl, "bwd")
    if ctx.plain:
        out = (ctx.add(Compute(phase="dense", direction="bwd", layer=l, micro_batch=mb,
                               deps=(db, *z3), **bwd_kw)),)
    else:
        out = _block(ctx, mb, l, "bwd", (db,), bwd_kw, z3)
    if last:
        ctx.layer_bwd_done[l] = eb
        ctx.layer_grad_ops.extend(ctx.policy.lower_layer_grads(ctx, l))
        ctx.layer_grad_ops.extend(ctx.zero3_grad_scatter(l, tl, out))
    yield
    return out, gdeps


def _dense_layer_backward(ctx, mb: int, tl: int, carry: Carry, rc: frozenset, last: bool):
    attn_kw, ffn_kw = ctx.dense_layer_kw(backward=True)
    z3 = _zero3_gather(ctx, mb, -1, tl, "bwd")  # before any recompute: see _moe_backward
    if rc:
        fwd_attn, fwd_ffn = ctx.dense_layer_kw()
        wait = z3
        if "full" in rc:
            carry = _block(ctx, mb, -1, "fwd", carry, fwd_attn, z3, "recompute")
            carry = _block(ctx, mb, -1, "fwd", carry, fwd_ffn, (), "recompute")
            wait = ()
        elif "mlp" in rc:
            carry = _block(ctx, mb, -1, "fwd", carry, fwd_ffn, z3, "recompute")
            wait = ()
        for _name, kw in ctx.selective_kw(mb, -1, tl, rc - {"mlp"}):
            carry = (ctx.add(Compute(phase="dense", micro_batch=mb, deps=carry + wait,
                                     label="recompute", **kw)),)
            wait = ()
    carry = _block(ctx, mb, -1, "bwd", carry, ffn_kw, z3)
    yield
    carry = _block(ctx, mb, -1, "bwd", carry, attn_kw)
    if last:
        ctx.layer_grad_ops.extend(ctx.zero3_grad_scatter(-1, tl, carry))
    yield
    return carry
