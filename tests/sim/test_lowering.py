"""Lowering + cost model + engine end to end against closed forms (toy set-up in conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costmodel import CostModel
from moesim.engine import schedule
from moesim.lowering import lower_iteration, lower_iteration_ctx
from moesim.ops import AllGather, AllToAll, GroupCollective, SendRecv
from moesim.policies import make_policy
from moesim.policies.base import History
from moesim.simulate import build_record, phase_times

from .simtoys import EFF, INTER_BW, INTER_LAT, INTRA_BW, LAUNCH, MEM_BW, NCCL_LAT, PEAK

T, H, F, TOKEN_BYTES = 400, 64, 128, 64 * 2
W = 2 * H * F * 2.0          # expert weight bytes (2 matrices, 2 bytes)
FPT = 2 * 2 * H * F          # expert forward FLOPs per token


def _decide(model, cluster, **knobs):
    policy = make_policy("static_ep", knobs)
    hist = History(iteration=0, past_TLRE=np.zeros((0, 1, 4, 4), int), passes_per_iteration=1)
    return policy, policy.decide(hist, model, cluster, np.random.default_rng(0))


def _run(model, cluster, counts_RE, **knobs):
    policy, decision = _decide(model, cluster, **knobs)
    ctx = lower_iteration_ctx(policy, decision, None, counts_RE[None, None], model, cluster)
    sched = schedule(ctx.program.ops, CostModel(cluster).durations(ctx.program), 4)
    return ctx, sched


def _a2a(tokens_per_peer_intra, tokens_per_peer_inter_total):
    """Hand formula of one all-to-all that crosses nodes."""
    return NCCL_LAT + INTER_LAT + max(tokens_per_peer_intra * TOKEN_BYTES / INTRA_BW,
                                      tokens_per_peer_inter_total * TOKEN_BYTES / INTER_BW)


def _gemm(m, passes):
    return max(passes * W / MEM_BW, passes * m * FPT / (PEAK * EFF)) + LAUNCH


def test_balanced_step_time_closed_form(model, cluster):
    """Every rank sends 100 tokens to each of the 4 experts (static EP, one per rank)."""
    ctx, sched = _run(model, cluster, np.full((4, 4), 100))
    act = T * H * 2.0
    dense_f, dense_b = 1e6 * T, 1000 * 2.0 + 2 * act
    route_f, route_b = 2.0 * H * 4 * T, H * 4 * 2.0 + act
    dense = max(dense_b / MEM_BW, dense_f / (PEAK * EFF)) + LAUNCH
    route = max(route_b / MEM_BW, route_f / (PEAK * EFF)) + LAUNCH
    dense_bwd = max(2 * (dense_b + route_b) / MEM_BW,
                    2 * (dense_f + route_f) / (PEAK * EFF)) + LAUNCH
    a2a = _a2a(100, 200)  # 1 intra peer (100 tokens), 2 inter peers (200 tokens) per rank
    forward = dense + route + a2a + _gemm(400, 1) + a2a
    backward = a2a + _gemm(400, 2) + a2a + dense_bwd
    grad_ar = NCCL_LAT + INTER_LAT + 2 * 3 / 4 * 1000 * 2.0 / INTER_BW
    opt_params = 2 * H * F + 1000 / 4
    adam = max(opt_params * (2 * 12 + 2 + 2) / MEM_BW, 10 * opt_params / (PEAK * EFF)) + LAUNCH
    gather = NCCL_LAT + INTER_LAT + 3 / 4 * 1000 * 2.0 / INTER_BW
    want = forward + backward + grad_ar + adam + gather
    assert sched.makespan_s == pytest.approx(want, rel=1e-12)
    rec = build_record(ctx, sched, 0, False, False)
    assert rec.summary["straggler_ratio"] == pytest.approx(1.0)
    assert rec.summary["a2a_time_s"] == pytest.approx(4 * a2a)


def test_hot_expert_straggles_dispatch_and_compute(model, cluster):
    """Expert 0 (rank 0) gets twice the tokens of every other expert: 160 vs 80 per source."""
    ctx, sched = _run(model, cluster, np.tile([160, 80, 80, 80], (4, 1)))
    busy_LFR = phase_times(ctx.program.ops, sched, 1)[0]
    from moesim.ops import PHASES
    dispatch_R = busy_LFR[0, PHASES.index("dispatch")]
    # rank 0 receives 160 from its node peer and 2 × 160 over its NIC: the slowest direction
    np.testing.assert_allclose(dispatch_R, 2 * _a2a(160, 320))
    expert_R = busy_LFR[0, PHASES.index("expert")]
    hot, cold = _gemm(640, 1) + _gemm(640, 2), _gemm(320, 1) + _gemm(320, 2)
    np.testing.assert_allclose(expert_R, [hot, cold, cold, cold])
    rec = build_record(ctx, sched, 0, False, False)
    assert rec.summary["straggler_ratio"] == pytest.approx(hot / ((hot + 3 * cold) / 4))
    # the cold ranks wait for the hot one at the combine: everyone ends together
    ends = sched.end_OR[-1]
    assert np.all(ends == ends[0])


def _sent_received(op, R):
    """Per-rank bytes sent and received by one collective op (naive reference)."""
    sent, recv = np.zeros(R), np.zeros(R)
    if isinstance(op, AllToAll):
        B = np.asarray(op.bytes_RR, float) * (1 - np.eye(len(op.bytes_RR)))
        ranks = np.arange(R) if op.ranks is None else op.ranks
        sent[ranks] += B.sum(1)
        recv[ranks] += B.sum(0)
    elif isinstance(op, SendRecv):
        keep = op.src_N != op.dst_N
        np.add.at(sent, op.src_N[keep], op.bytes_N[keep])
        np.add.at(recv, op.dst_N[keep], op.bytes_N[keep])
    elif isinstance(op, GroupCollective):  # ring: each member sends and receives factor·S
        for g, b in zip(op.groups, op.bytes_G, strict=True):
            n = len(g)
            f = 2 * (n - 1) / n if type(op).__name__ == "AllReduce" else (n - 1) / n
            sent[g] += f * b
            recv[g] += f * b
    return sent, recv


def test_every_collective_conserves_bytes(model, cluster):
    rng = np.random.default_rng(3)
    counts = rng.multinomial(400, [0.4, 0.3, 0.2, 0.1], size=4)
    ctx, _ = _run(model, cluster, counts)
    moved = 0.0
    for op in ctx.program.ops:
        if isinstance(op, (AllToAll, SendRecv, GroupCollective)):
            sent, recv = _sent_received(op, 4)
            assert sent.sum() == pytest.approx(recv.sum())
            moved += sent.sum()
    assert moved > 0
    dispatch = [op for op in ctx.program.ops if op.phase == "dispatch"]
    assert len(dispatch) == 2  # forward and backward
    np.testing.assert_allclose(dispatch[0].bytes_RR.sum(), counts.sum() * TOKEN_BYTES)
    np.testing.assert_array_equal(dispatch[0].bytes_RR, counts * TOKEN_BYTES)


def test_capacity_drops_and_routes(model, cluster):
    counts = np.tile([250, 50, 50, 50], (4, 1))
    ctx, _ = _run(model, cluster, counts, capacity_factor=1.0)  # megatron: ceil(400/4) = 100
    route = ctx.program.routes[(0, 0)]
    np.testing.assert_array_equal(route.kept_RP, np.tile([100, 50, 50, 50], (4, 1)))
    np.testing.assert_array_equal(route.dropped_R, [150] * 4)
    expert = [op for op in ctx.program.ops if op.phase == "expert"][0]
    np.testing.assert_array_equal(expert.gemm_tokens_RS[:, 0], [400, 200, 200, 200])


def test_deepspeed_capacity_doubles_for_top2(model, cluster):
    from moesim.policies.static_ep import expert_capacity
    assert expert_capacity("deepspeed", 1.0, 400, 2, 4) == 200   # ceil(400/4 · 1 · 2)
    assert expert_capacity("deepspeed", 1.0, 400, 1, 4) == 100
    assert expert_capacity("megatron", 1.5, 400, 2, 4) == 300    # ceil(400·2/4 · 1.5)
    assert expert_capacity("megatron", None, 400, 2, 4) is None


def test_edp_replicas_sync_expert_grads(model, cluster):
    """EP=2 on 4 ranks: EDP groups {0,2} and {1,3} all-reduce their experts' grads."""
    policy, decision = _decide(model, cluster, ep_size=2)
    np.testing.assert_array_equal(decision.placement.phy2log_LP[0], [0, 1, 2, 3, 0, 1, 2, 3])
    counts = np.full((4, 4), 100)
    prog = lower_iteration(policy, decision, None, counts[None, None], model, cluster)
    dispatch = next(op for op in prog.ops if op.phase == "dispatch")
    # ep_group routing: ranks 0,1 use replicas on ranks 0,1; ranks 2,3 those on ranks 2,3
    np.testing.assert_array_equal(dispatch.bytes_RR / TOKEN_BYTES,
                                  [[200, 200, 0, 0], [200, 200, 0, 0],
                                   [0, 0, 200, 200], [0, 0, 200, 200]])
    syncs = [op for op in prog.ops if op.phase == "grad_sync" and op.label == "expert_grads"]
    groups = sorted(tuple(g.tolist()) for op in syncs for g in op.groups)
    assert groups == [(0, 2), (0, 2), (1, 3), (1, 3)]


class _Prefetching:
    """A policy whose expert weights are gathered on the prefetch stream before each layer."""

    def __init__(self):
        self.base = make_policy("static_ep")
        self.oracle = False

    def __getattr__(self, name):
        return getattr(self.base, name)

    def lower_param_gather(self, ctx, micro_batch, layer, direction):
        deps = (ctx.gather_anchor,) if ctx.gather_anchor >= 0 else ()
        return [ctx.add(AllGather(phase="param_gather", direction=direction, stream="prefetch",
                                  layer=layer, micro_batch=micro_batch, deps=deps,
                                  groups=(np.arange(4),), bytes_G=np.array([1e3])))]


def test_param_gather_overlaps_attention(model, cluster):
    policy = _Prefetching()
    _, decision = _decide(model, cluster)
    prog = lower_iteration(policy, decision, None, np.full((1, 1, 4, 4), 100), model, cluster)
    sched = schedule(prog.ops, CostModel(cluster).durations(prog), 4)
    idx = {(op.phase, op.direction): i for i, op in enumerate(prog.ops)}
    gather, dense = idx[("param_gather", "fwd")], idx[("dense", "fwd")]
    expert = idx[("expert", "fwd")]
    assert sched.start_OR[gather, 0] == sched.start_OR[dense, 0] == 0.0  # overlapped
    assert gather in prog.ops[expert].deps
    assert sched.end_OR[gather, 0] < sched.end_OR[dense, 0]
