"""Helpers of the layout tests: lower and schedule one iteration under a layout, and a
uniform set-up whose communication is free (so closed-form pipeline figures apply)."""

from __future__ import annotations

import numpy as np

from moesim import layout_run
from moesim import simulate as sim
from moesim.layout import ParallelLayout
from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec

from .simtoys import make_trace


def lower_one(layout: ParallelLayout, trace, model: ModelSpec, cluster: Cluster,
              policy: str = "static_ep", iteration: int = 0):
    """``(ctx, schedule, durations)`` of one iteration under ``layout``."""
    pol = sim._policy(policy)
    lplan, view, pol = layout_run.prepare(layout, model, cluster, pol,
                                          trace.meta.micro_batches_per_iteration)
    trace, model = sim.fit_inputs(trace, model, view)
    run = sim._Run(trace, model, cluster, pol, 0, True, sim.CostModel(cluster), view=view,
                   layout_plan=lplan)
    mb = trace.meta.micro_batches_per_iteration
    dec, counts = sim.decide_iteration(pol, trace.counts_TLRE, mb, iteration, None, model,
                                       view, 0)
    ctx = sim.lower_iteration_ctx(pol, dec, None, counts, model, view,
                                  plan=sim._plan(run, dec), cache=run.cache, layout_plan=lplan)
    durations = run.cost.durations(ctx.program)
    return ctx, sim.schedule(ctx.program.ops, durations, cluster.world_size), durations


def free_comm_cluster(nodes: int, gpus_per_node: int) -> Cluster:
    """Compute at a constant efficiency, every link (and memory) practically free."""
    fast = LinkLevel(bw_GBps=1e12, latency_s=0.0)
    hw = HardwareProfile(name="uniform", peak_flops=1e12, mem_bw_GBps=1e12, launch_s=0.0,
                         collective_latency_s=0.0, gemm_eff_curve=((1.0, 0.5), (2.0, 0.5)),
                         elementwise_eff=0.5)
    return Cluster(name="uniform", num_nodes=nodes, gpus_per_node=gpus_per_node, intra=fast,
                   inter=fast, host=fast, gpu_memory_GiB=1e6, hardware=hw)


def uniform_trace(ranks: int, layers: int, experts: int, micro_batches: int,
                  tokens: int = 64, top_k: int = 2, iterations: int = 1):
    """Every source sends the same tokens to every expert (perfectly balanced)."""
    per = tokens * top_k // experts
    counts = np.full((iterations * micro_batches, layers, ranks, experts), per, dtype=np.int64)
    return make_trace(counts, top_k, micro_batches)


def uniform_model(layers: int, experts: int, tokens: int = 64, top_k: int = 2,
                  micro_batches: int = 4, **kw) -> ModelSpec:
    return ModelSpec(name="uniform", num_layers=layers, hidden_size=64, ffn_hidden_size=128,
                     num_experts=experts, top_k=top_k, seq_len=tokens, tokens_per_rank=tokens,
                     micro_batches=micro_batches, **kw)


def pipeline_bubble(ctx, sched, durations, stage_rank: int = 0) -> float:
    """``1 − work / span`` of one rank over its forward and backward ops (per-iteration
    ops excluded): the share of the pipeline's time the rank waits."""
    ops = ctx.program.ops
    span = max(np.nanmax(sched.end_OR[i]) for i, op in enumerate(ops) if op.direction != "step")
    work = sum(float(np.nan_to_num(sched.end_OR[i, stage_rank] - sched.start_OR[i, stage_rank]))
               for i, op in enumerate(ops)
               if op.direction != "step" and op.stream == "compute")
    return 1.0 - work / span
