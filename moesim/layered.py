"""One iteration's program under a parallel layout: stages, their schedules, and what joins them.

:func:`emit_program` turns a routed :class:`~moesim.lowering.LoweringContext` into the whole
iteration: per pipeline stage a context over the stage's ranks and MoE layers
(:func:`stage_context`; the policy's hooks run unchanged on it), the policy's relayout, every
step of the stage's schedule (:mod:`moesim.pipeline`) through the chunk emitters of
:mod:`moesim.layer_ops`, the activation and gradient sends between stages, then each stage's
gradient synchronisation and optimizer step. With one stage (``pp = 1``) the program is exactly
what moesim lowered before layouts existed: relayout, ``F0 B0 F1 B1 …``, grad sync, optimizer.

Stage sends are ``SendRecv`` ops (phase ``pp_send``) from each rank of the sending stage to the
rank with the same position in the receiving stage, ``T·H`` activation elements per rank
(with SP, or with Megatron's scatter-gather of pipeline tensors under TP): one forward per
micro-batch and stage boundary, one backward. Each pair of neighbouring stages has its own
stream (``p2p`` for even boundaries, ``p2p_odd`` for odd ones, ``p2p_wrap`` for the interleaved
schedule's last-to-first hop), so a rank's sends and receives with one neighbour are ordered
among themselves only, as NCCL orders one communicator's operations. Steps are emitted in the
order a unit-cost run of the schedule starts them, which keeps every stream's order the order
in which its ops really start; all timing comes from the event engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.layer_ops import chunk_backward, chunk_forward
from moesim.ops import Compute, Program, SendRecv
from moesim.pipeline import Step, schedule_steps
from moesim.placement import Decision, Placement
from moesim.stages import LayoutPlan, Stage


def emit_program(ctx: Any, plan: LayoutPlan | None) -> None:
    """Every op of the iteration into ``ctx.program`` (module docstring)."""
    if plan is not None and plan.layout.pp > 1:
        ctx.program = Program(num_ranks=plan.world)
    contexts = stage_contexts(ctx, plan)
    layout = contexts[0].layout
    M = ctx.tokens_MLRG.shape[0]
    p, v = layout.pp, layout.vpp
    steps = [schedule_steps(layout.pp_schedule, i, p, M, v, layout.a2a_overlap)
             for i in range(p)]
    carry = [tuple(c.policy.lower_relayout(c)) if c.local_moe else () for c in contexts]
    order = _emission_order(contexts, steps, p, v)
    sends: dict[tuple, int] = {}
    last_b = {(i, c): max(s.mb for s in _parts(steps[i]) if s.kind == "B" and s.chunk == c)
              for i in range(p) for c in range(v)}
    for i, k in order:
        carry[i] = _emit_step(contexts[i], steps[i][k], carry[i], sends, p, v, last_b, i)
    for c in contexts:
        c.backward_done = c.last_op
        if c.local_moe:
            c.grad_sync_ops = list(c.policy.lower_grad_sync(c))
            c.policy.lower_optimizer(c)
        else:  # a stage of dense layers only: its dense gradients and optimizer step
            c.grad_sync_ops = c.emit_dense_grad_allreduce()
            c.emit_dense_optimizer()


def stage_contexts(ctx: Any, plan: LayoutPlan | None) -> list:
    """``ctx.stage_contexts``, set: one context per pipeline stage (``ctx`` itself, with the
    layout's facts, when there is one stage)."""
    if plan is None or plan.layout.pp == 1:
        if plan is not None:
            ctx.layout, ctx.num_dense = plan.layout, plan.num_dense_layers
        contexts = [ctx]
    else:
        contexts = [stage_context(ctx, plan, st) for st in plan.stages]
    ctx.stage_contexts = contexts
    return contexts


def _parts(steps: list[Step]) -> list[Step]:
    """The plain F/B steps, fused ones split."""
    return [x for s in steps for x in ((s.fwd, s.bwd) if s.kind == "FB" else (s,))]


# -- stage contexts -----------------------------------------------------------------------------
def stage_context(g: Any, plan: LayoutPlan, stage: Stage) -> Any:
    """A context over ``stage``'s ranks and MoE layers, sharing ``g``'s program and routed
    tokens (sliced to the stage's layers)."""
    from moesim.lowering import LoweringContext

    moe = np.array(stage.moe_layers, dtype=np.int64)
    model = g.model.replace(num_layers=len(moe)) if len(moe) else g.model
    if len(moe) and np.all(np.diff(moe) == 1):  # contiguous layers: views, not copies
        rows = slice(int(moe[0]), int(moe[-1]) + 1)
    else:
        rows = moe
    cache = g._consts.setdefault(("stage", stage.index), {})
    c = LoweringContext(
        policy=g.policy, decision=_sub_decision(g.decision, moe),
        previous=_sub_decision(g.previous, moe), model=model, cluster=g.cluster,
        counts_MLRE=g.counts_MLRE[:, rows], kept_MLRP=g.kept_MLRP[:, rows],
        dropped_MLRP=g.dropped_MLRP[:, rows],
        tokens_MLRG=None if g.tokens_MLRG is None else g.tokens_MLRG[:, rows],
        program=g.program, rows_MLP=g.rows_MLP[:, rows], dropped_MLR=g.dropped_MLR[:, rows],
        layer_bwd_done=[-1] * len(moe), block=g.block, _consts=cache)
    c.layout, c.stage, c.num_dense = plan.layout, stage, plan.num_dense_layers
    c.rank_offset, c.layer_ids = stage.first_rank, moe
    c.first_stage, c.last_stage = stage.index == 0, stage.index == len(plan.stages) - 1
    return c


def _sub_decision(decision: Decision | None, layers: np.ndarray) -> Decision | None:
    """``decision`` restricted to MoE ``layers``: placement rows and every per-layer entry of
    ``info`` (keys whose shape suffix starts with ``L``, e.g. ``owners_LE``, ``chosen_L``)."""
    if decision is None:
        return None
    p = decision.placement
    L = p.num_layers
    info = {}
    for key, value in decision.info.items():
        suffix = key.rsplit("_", 1)[-1] if "_" in key else ""
        if suffix.startswith("L") and isinstance(value, (list, tuple, np.ndarray)) \
                and len(value) == L:
            value = ([value[i] for i in layers] if isinstance(value, list)
                     else np.asarray(value)[layers])
        info[key] = value
    sub = Placement(p.phy2log_LP[layers], p.num_ranks, p.slots_per_rank, p.num_experts)
    return Decision(placement=sub, routing=decision.routing,
                    slot_capacity=decision.slot_capacity,
                    planner_time_s=decision.planner_time_s, info=info)


# -- the order steps are emitted in -------------------------------------------------------------
def _virtual(stage: int, chunk: int, p: int) -> int:
    return chunk * p + stage


def _inputs(step: Step, stage: int, p: int, v: int) -> list[tuple]:
    """Keys of the sends a step waits for: ``("F", mb, virtual stage)`` activations into a
    forward, ``("B", mb, virtual stage)`` gradients into a backward."""
    out = []
    for s in ((step.fwd, step.bwd) if step.kind == "FB" else (step,)):
        vs = _virtual(stage, s.chunk, p)
        if s.kind == "F" and vs > 0:
            out.append(("F", s.mb, vs))
        if s.kind == "B" and vs < p * v - 1:
            out.append(("B", s.mb, vs))
    return out


def _outputs(step: Step, stage: int, p: int, v: int) -> list[tuple]:
    """Keys of the sends a step produces (the receiving virtual stage's inputs)."""
    out = []
    for s in ((step.fwd, step.bwd) if step.kind == "FB" else (step,)):
        vs = _virtual(stage, s.chunk, p)
        if s.kind == "F" and vs < p * v - 1:
            out.append(("F", s.mb, vs + 1))
        if s.kind == "B" and vs > 0:
            out.append(("B", s.mb, vs - 1))
    return out


def _emission_order(contexts: list, steps: list[list[Step]], p: int, v: int
                    ) -> list[tuple[int, int]]:
    """``(stage, step index)`` sorted by the start time of a unit-cost run of the schedules
    (forward 1 per layer, backward 2; sends free)."""
    done: dict[tuple, float] = {}
    nxt, free = [0] * p, [0.0] * p
    starts = []
    while len(starts) < sum(len(s) for s in steps):
        progressed = False
        for i in range(p):
            while nxt[i] < len(steps[i]):
                step = steps[i][nxt[i]]
                need = _inputs(step, i, p, v)
                if any(key not in done for key in need):
                    break
                start = max([free[i], *(done[key] for key in need)])
                free[i] = start + _unit_cost(contexts[i], step)
                for key in _outputs(step, i, p, v):
                    done[key] = free[i]
                starts.append((start, i, nxt[i]))
                nxt[i] += 1
                progressed = True
        assert progressed, "pipeline schedule deadlocks"
    return [(i, k) for _, i, k in sorted(starts)]


def _unit_cost(ctx: Any, step: Step) -> float:
    parts = (step.fwd, step.bwd) if step.kind == "FB" else (step,)
    return sum(len(ctx.stage_chunks[s.chunk]) * (1 if s.kind == "F" else 2) for s in parts)


# -- emitting one step --------------------------------------------------------------------------
_STREAMS = ("p2p", "p2p_odd")


def _emit_step(ctx: Any, step: Step, carry: tuple[int, ...], sends: dict, p: int, v: int,
               last_b: dict, stage: int) -> tuple[int, ...]:
    """Emit one step's ops (fused steps interleaved segment by segment) and its sends; returns
    the stage's new carry."""
    recv = {key: sends[key] for key in _inputs(step, stage, p, v)}
    gens = []
    for s in ((step.fwd, step.bwd) if step.kind == "FB" else (step,)):
        vs = _virtual(stage, s.chunk, p)
        deps = carry + ((recv[(s.kind, s.mb, vs)],) if (s.kind, s.mb, vs) in recv else ())
        layers = ctx.stage_chunks[s.chunk]
        if s.kind == "F":
            gens.append(_forward_with_head(ctx, s, layers, deps, vs == p * v - 1))
        else:
            gens.append(_backward_with_head(ctx, s, layers, deps, vs == p * v - 1,
                                            last_b[(stage, s.chunk)] == s.mb))
    outs = _drive(gens)
    for s, out in zip((step.fwd, step.bwd) if step.kind == "FB" else (step,), outs,
                      strict=True):
        for key in _outputs(Step(s.kind, s.mb, s.chunk), stage, p, v):
            sends[key] = _send(ctx, s, key, out, p)
    return tuple(x for out in outs for x in out)


def _drive(gens: list) -> list[tuple[int, ...]]:
    """Run the generators, alternating one segment each while more than one is left."""
    outs: list[Any] = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        for i in list(live):
            try:
                next(gens[i])
            except StopIteration as stop:
                outs[i] = stop.value
                live.remove(i)
    return outs


def _forward_with_head(ctx: Any, s: Step, layers: tuple[int, ...], deps: tuple[int, ...],
                       last_virtual: bool):
    out = yield from chunk_forward(ctx, s.mb, layers, deps)
    if last_virtual and ctx.model.vocab_size and ctx.layout.whole_model:
        out = (ctx.add(Compute(phase="dense", micro_batch=s.mb, deps=out, **ctx.head_kw())),)
    return out


def _backward_with_head(ctx: Any, s: Step, layers: tuple[int, ...], deps: tuple[int, ...],
                        last_virtual: bool, last: bool):
    if last_virtual and ctx.model.vocab_size and ctx.layout.whole_model:
        deps = (ctx.add(Compute(phase="dense", direction="bwd", micro_batch=s.mb, deps=deps,
                                **ctx.head_kw(backward=True))),)
    return (yield from chunk_backward(ctx, s.mb, layers, deps, last))


def _send(ctx: Any, s: Step, key: tuple, deps: tuple[int, ...], p: int) -> int:
    """The activation (forward) or gradient (backward) send of step ``s`` to the stage that
    runs virtual stage ``key[2]``."""
    src_stage = ctx.stage.index
    dst_stage = key[2] % p
    n = ctx.world
    src = np.arange(n) + ctx.rank_offset
    dst = np.arange(n) + dst_stage * n
    crosses = key[2] // p != s.chunk  # the interleaved hop between last and first stage
    stream = "p2p_wrap" if crosses else _STREAMS[min(src_stage, dst_stage) % 2]
    m = ctx.model
    nbytes = m.tokens_per_rank * m.hidden_size * m.bytes_activation
    return ctx.program.add(SendRecv(phase="pp_send", direction="fwd" if s.kind == "F" else "bwd",
                                    stream=stream, micro_batch=s.mb, deps=deps, src_N=src,
                                    dst_N=dst, bytes_N=np.full(n, float(nbytes)),
                                    label="pp_activation" if s.kind == "F" else "pp_grad"))


# -- memory -------------------------------------------------------------------------------------
def attach_layout_memory(g: Any, plan: LayoutPlan) -> None:
    """``Program.memory_bytes`` over world ranks, stage by stage
    (:func:`moesim.memory_stage.stage_memory`), and ``g.stage_memory`` (one
    :class:`~moesim.memory_stage.StageMemory` per stage, for the per-stage table).

    The experts' state comes from the policy's own footprint on the stage, less the dense part
    every policy counts (:func:`~moesim.memory_stage.expert_state_from_footprint`); with an
    explicit ``zero`` a policy of the static-EP family (one with an ``ep_size`` knob) shards its
    experts' state over EDP instead (:func:`~moesim.memory_stage.expert_state_zero`); the
    replicating and sharding policies keep their own expert scheme, and ``zero`` acts on the
    dense parameters only. With ``etp > 1`` (static EP only) each rank holds ``1/et`` of its
    experts, their state sharded over EDP by ``zero`` (None: ZeRO-1, static EP's own scheme),
    and its expert activations are the ETP group's gathered rows."""
    from moesim import memory_stage as ms
    from moesim.memory import slots_filled_R

    W, lay = plan.world, plan.layout
    M = g.rows_MLP.shape[0]
    gpu: dict[str, np.ndarray] = {}
    host: dict[str, np.ndarray] = {}
    g.stage_memory = []
    for c in g.stage_contexts:
        stage = c.stage or Stage(index=0, first_rank=0, num_ranks=c.world,
                                 chunks=c.stage_chunks, num_dense_layers=c.num_dense)
        experts: dict[str, np.ndarray] = {}
        host_R: dict[str, np.ndarray] = {}
        if c.local_moe:
            if "footprint" not in c._consts:
                c._consts["footprint"] = c.policy.memory_footprint(c.decision, c.model,
                                                                   c.cluster)
            fp_gpu, host_R = c._consts["footprint"]
            experts = ms.expert_state_from_footprint(fp_gpu, c.model, c.world)
            if lay.etp > 1:  # each rank holds 1/et of its experts; ZeRO over the EDP group
                P = c.model.params_per_expert / lay.etp
                ep = int(c.decision.info["ep_size"])
                experts = ms.expert_state_zero(
                    c.to_stage_order(slots_filled_R(c.placement) * P), c.model,
                    1 if lay.zero is None else lay.zero, c.world // (ep * lay.etp))
            elif lay.zero is not None and hasattr(c.policy.config, "ep_size"):
                P = c.model.params_per_expert
                edp = max(1, c.world // int(c.decision.info.get("ep_size") or c.world))
                experts.update(ms.expert_state_zero(slots_filled_R(c.placement) * float(P),
                                                    c.model, lay.zero, edp))
        rows = c.expert_rows_MLR()  # with ETP: the group's gathered rows, in stage order
        mem_model = c.model if lay.whole_model else c.model.replace(vocab_size=0)
        sm = ms.stage_memory(model=mem_model, layout=lay, stage=stage, num_stages=lay.pp,
                             micro_batches=M,
                             tokens=c.model.tokens_per_rank * lay.tp * lay.cp,
                             expert_state_R=experts, rows_MLR=rows,
                             dropped_MLR=c.to_stage_order(c.dropped_MLR), host_R=host_R)
        g.stage_memory.append(sm)
        lo = c.rank_offset
        for out, part in ((gpu, sm.gpu), (host, sm.host)):
            for name, arr in part.items():
                out.setdefault(name, np.zeros(W))[lo:lo + c.world] = arr
    g.program.memory_bytes, g.program.host_memory_bytes = gpu, host
