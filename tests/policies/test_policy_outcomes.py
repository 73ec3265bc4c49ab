"""Regression tests of policy outcomes found while benchmarking the policies (tiny shapes).

- FlexMoE's and FasterMoE's optimizer step started right after the backward, in parallel with
  the gradient sync it consumes (``step_deps`` instead of ``optimizer_deps``), which hid the
  replicas' gradient all-reduce behind the optimizer and under-predicted their step time.
- static EP's ``optimizer_on_host`` (DeepSpeed ZeRO-1 + CPU offload, SwiftMoE's baseline) moves
  the ZeRO-1 shard to the host and costs PCIe copies plus a CPU Adam.
- EPLB's and FlexMoE's ``routing`` knob reaches the decision (``node_first`` keeps the
  all-to-all on-node).

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts.
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costmodel import CostModel
from moesim.engine import schedule
from moesim.lowering import lower_iteration_ctx
from moesim.ops import HostCompute, HostCopy
from moesim.policies import History, make_policy
from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec


def _model(E: int = 8, L: int = 2, tokens: int = 256, k: int = 2) -> ModelSpec:
    return ModelSpec(name="tiny", num_layers=L, hidden_size=256, ffn_hidden_size=512,
                     num_experts=E, top_k=k, tokens_per_rank=tokens, seq_len=tokens)


def _cluster(nodes: int = 2, gpn: int = 2) -> Cluster:
    hw = HardwareProfile(name="hw", peak_flops=312e12, mem_bw_GBps=2000.0,
                         host_optimizer_GBps=5.0)
    return Cluster(name="c", num_nodes=nodes, gpus_per_node=gpn,
                   intra=LinkLevel(bw_GBps=200.0, latency_s=5e-6),
                   inter=LinkLevel(bw_GBps=0.5, latency_s=1e-5),   # slow: grad sync is long
                   host=LinkLevel(bw_GBps=25.0, latency_s=1e-5), gpu_memory_GiB=80.0,
                   hardware=hw)


def _counts_TLRE(model: ModelSpec, R: int, passes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((passes, model.num_layers, R, model.num_experts), dtype=np.int64)
    for t in range(passes):
        for l in range(model.num_layers):
            p = rng.dirichlet(np.full(model.num_experts, 0.4))
            out[t, l] = rng.multinomial(model.tokens_per_rank * model.top_k, p, size=R)
    return out


def _lower(name: str, knobs: dict, model: ModelSpec, cluster: Cluster, iteration: int = 0):
    """Decide and lower one iteration (iteration 0: no history)."""
    counts = _counts_TLRE(model, cluster.world_size, iteration + 1)
    policy = make_policy(name, knobs)
    hist = History(iteration=iteration, past_TLRE=counts[:iteration], passes_per_iteration=1)
    decision = policy.decide(hist, model, cluster, np.random.default_rng(0))
    ctx = lower_iteration_ctx(policy, decision, None, counts[iteration:iteration + 1], model,
                              cluster)
    sched = schedule(ctx.program.ops, CostModel(cluster).durations(ctx.program),
                     cluster.world_size)
    return ctx, sched


def _ends(ctx, sched, phase: str, label: str | None = None) -> np.ndarray:
    idx = [i for i, op in enumerate(ctx.program.ops)
           if op.phase == phase and (label is None or op.label == label)]
    return np.nanmax(sched.end_OR[idx], axis=0)


@pytest.mark.parametrize("name", ["flexmoe", "fastermoe"])
def test_optimizer_waits_for_grad_sync(name: str) -> None:
    """Adam consumes the synced grads: it starts after every grad-sync op ends (regression:
    flexmoe/fastermoe used ``step_deps`` and ran Adam beside the replicas' all-reduce)."""
    model, cluster = _model(), _cluster()
    ctx, sched = _lower(name, {}, model, cluster, iteration=1)
    assert any(op.phase == "grad_sync" for op in ctx.program.ops)
    adam = [i for i, op in enumerate(ctx.program.ops)
            if op.phase == "optimizer" and type(op).__name__ == "Compute"]
    assert adam
    sync_end_R = _ends(ctx, sched, "grad_sync")
    start_R = np.nanmin(sched.start_OR[adam], axis=0)
    assert np.all(start_R >= sync_end_R - 1e-12)


def test_static_ep_optimizer_on_host_moves_state_to_host() -> None:
    """Offloaded ZeRO-1: the optimizer component moves from GPU to host memory, the step is
    PCIe down + CPU Adam + PCIe up, and routing/drops are unchanged."""
    model, cluster = _model(), _cluster()
    gpu_ctx, gpu_s = _lower("static_ep", {"capacity_factor": 1.0}, model, cluster)
    host_ctx, host_s = _lower("static_ep", {"capacity_factor": 1.0,
                                            "optimizer_on_host": True}, model, cluster)
    assert "optimizer" in gpu_ctx.program.memory_bytes
    assert "optimizer" not in host_ctx.program.memory_bytes
    np.testing.assert_allclose(host_ctx.program.host_memory_bytes["optimizer"],
                               gpu_ctx.program.memory_bytes["optimizer"])
    kinds = {type(op) for op in host_ctx.program.ops if op.phase == "optimizer"}
    assert HostCopy in kinds and HostCompute in kinds
    assert int(host_ctx.dropped_MLR.sum()) == int(gpu_ctx.dropped_MLR.sum())
    assert host_s.makespan_s > gpu_s.makespan_s   # 5 GB/s CPU Adam is slower than HBM


@pytest.mark.parametrize("name", ["eplb", "flexmoe"])
def test_routing_knob_reaches_decision(name: str) -> None:
    model, cluster = _model(), _cluster()
    ctx, _ = _lower(name, {"routing": "node_first"}, model, cluster, iteration=1)
    assert ctx.decision.routing == "node_first"
    with pytest.raises(Exception, match="routing"):
        make_policy(name, {"routing": "nope"})


def test_eplb_node_first_keeps_tokens_on_node() -> None:
    """With a replica of every expert on every node, node_first sends nothing cross-node."""
    model, cluster = _model(E=4), _cluster()
    ctx, _ = _lower("eplb", {"routing": "node_first", "slots_per_rank": 2}, model, cluster,
                    iteration=1)
    holders_LEG = ctx.holders_LEG()
    node_LEN = holders_LEG.reshape(*holders_LEG.shape[:2], cluster.num_nodes, -1).any(axis=3)
    tok_RG = ctx.tokens_MLRG.sum(axis=(0, 1))
    node_R = np.arange(cluster.world_size) // cluster.gpus_per_node
    cross = tok_RG[node_R[:, None] != node_R[None, :]].sum()
    if node_LEN.all():
        assert cross == 0
    even_ctx, _ = _lower("eplb", {"slots_per_rank": 2}, model, cluster, iteration=1)
    even_tok = even_ctx.tokens_MLRG.sum(axis=(0, 1))
    assert cross <= even_tok[node_R[:, None] != node_R[None, :]].sum()
