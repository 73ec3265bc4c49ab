"""Simulator speed: DeepSeek-V3-shaped static EP on 256 H100s, and a curve from 8 to 1024 GPUs.

Run on one core::

    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py                 # 256 GPUs × 100 iterations
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --curve         # plus 8 … 1024 GPUs
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --layout        # DeepSeek-V3's own layout

``--layout``: DeepSeek-V3 (3 dense + 58 MoE layers) on ``h800-256x8`` (2048 GPUs) under the
``deepseek-v3`` layout preset (PP 16, EP 64, ZeRO-1, all-to-all overlap), 10 iterations of
``--micro-batches`` (default 16 = pp) micro-batches of one 4096-token sequence per rank; the trace
has the 128 token sources of one stage. It prints the time and the per-stage memory table of
the last iteration (target: under 60 s on one core).

Model ``deepseek-v3`` (58 MoE layers, 256 experts, top-8, 4096 tokens per rank, 1 micro-batch)
on ``h100-32x8`` resized to ``G/8`` nodes; policy ``static_ep``. The synthetic trace comes from
``moesim.traces.synth.synthesize`` when present (else a Dirichlet-multinomial stand-in) and its
generation is timed separately. Throughput is ``rank·layer·passes`` per wall second of
``simulate`` (decide + route + lower + cost + schedule + records; no output directory);
``cpu s`` is the process CPU time of the same call (the honest figure on a shared machine).
Plans that do not fit in 80 GB (small GPU counts) are simulated with ``allow_oom``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from moesim.simulate import simulate  # noqa: E402
from moesim.specs import load_cluster, load_model  # noqa: E402
from moesim.traces.format import RoutingTrace, TraceMeta  # noqa: E402

CURVE_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def make_trace(model, num_ranks: int, iterations: int, generator: str, seed: int = 0
               ) -> RoutingTrace:
    """A synthetic trace ``[iterations, L, G, E]`` (one pass per iteration)."""
    if generator == "synth":
        try:
            from moesim.traces.synth import SynthConfig, synthesize
        except ImportError:
            generator = "dirichlet"
        else:
            cfg = SynthConfig(num_layers=model.num_layers, num_ranks=num_ranks,
                              num_experts=model.num_experts, top_k=model.top_k,
                              tokens_per_rank=model.tokens_per_rank,
                              micro_batches_per_iteration=1, num_iterations=iterations)
            return synthesize(cfg, rng=seed)
    return dirichlet_trace(model, num_ranks, iterations, seed)


def dirichlet_trace(model, num_ranks: int, iterations: int, seed: int,
                    micro_batches: int = 1) -> RoutingTrace:
    """Stand-in: per layer a Dirichlet(1) popularity, per (pass, rank) a multinomial draw of
    ``tokens · k`` assignments (top-k without replacement is not enforced); ``iterations``
    counts passes, ``micro_batches`` of them per iteration (int32 counts)."""
    rng = np.random.default_rng(seed)
    L, E, k, T = model.num_layers, model.num_experts, model.top_k, model.tokens_per_rank
    counts = np.empty((iterations, L, num_ranks, E), dtype=np.int32)
    for l in range(L):
        counts[:, l] = rng.multinomial(T * k, rng.dirichlet(np.ones(E)), size=(iterations,
                                                                              num_ranks))
    meta = TraceMeta(num_layers=L, num_ranks=num_ranks, num_experts=E, top_k=k,
                     tokens_per_rank=T, micro_batches_per_iteration=micro_batches,
                     model=model.name,
                     source="benchmarks/sim_speed.py dirichlet stand-in")
    return RoutingTrace(counts, meta)


def measure(gpus: int, iterations: int, generator: str) -> dict:
    """Generate, then simulate; returns one table row."""
    model, base = load_model("deepseek-v3"), load_cluster("h100-32x8")
    cluster = base.with_shape(max(gpus // 8, 1), min(gpus, 8))
    t0 = time.perf_counter()
    trace = make_trace(model, gpus, iterations, generator)
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    summary = simulate(trace, model, cluster, "static_ep", progress=False, allow_oom=True)
    sim_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    work = gpus * model.num_layers * trace.num_passes
    return {"gpus": gpus, "iterations": iterations, "gen_s": gen_s, "sim_s": sim_s,
            "cpu_s": cpu_s, "ms_per_it": 1e3 * sim_s / iterations, "rlp_per_s": work / sim_s,
            "step_ms": 1e3 * summary.mean("step_time_s"), "oom": int(summary.column("oom").max())}


def measure_layout(iterations: int, micro_batches: int) -> dict:
    """DeepSeek-V3's layout on 2048 H800: one table row plus the per-stage memory table."""
    from moesim.layout import load_layout
    from moesim.layout_run import prepare

    model, cluster = load_model("deepseek-v3"), load_cluster("h800-256x8")
    layout = load_layout("deepseek-v3")
    model = model.replace(micro_batches=micro_batches)
    plan, _, _ = prepare(layout, model, cluster, _policy("static_ep"), micro_batches)
    t0 = time.perf_counter()
    trace = dirichlet_trace(model, plan.stage_ranks, iterations * micro_batches, 0,
                            micro_batches=micro_batches)
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    summary = simulate(trace, model, cluster, "static_ep", progress=False, layout=layout)
    sim_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    work = cluster.world_size * model.num_layers * trace.num_passes
    return {"gpus": cluster.world_size, "iterations": iterations, "gen_s": gen_s,
            "sim_s": sim_s, "cpu_s": cpu_s, "ms_per_it": 1e3 * sim_s / iterations,
            "rlp_per_s": work / sim_s, "step_ms": 1e3 * summary.mean("step_time_s"),
            "oom": int(summary.column("oom").max()), "memory": summary.stage_table}


def _policy(name: str):
    from moesim.policies.base import make_policy

    return make_policy(name)


def print_table(rows: list[dict]) -> None:
    print(f"{'GPUs':>5} {'iters':>6} {'gen s':>8} {'sim s':>8} {'cpu s':>8} {'ms/iter':>8} "
          f"{'rank·layer·pass/s':>18} {'pred step ms':>12} {'oom':>4}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['iterations']:>6} {r['gen_s']:>8.2f} {r['sim_s']:>8.2f} "
              f"{r['cpu_s']:>8.2f} {r['ms_per_it']:>8.1f} {r['rlp_per_s']:>18,.0f} "
              f"{r['step_ms']:>12.1f} {r['oom']:>4}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--curve", action="store_true", help="also 8 … 1024 GPUs")
    p.add_argument("--curve-iterations", type=int, default=10)
    p.add_argument("--generator", choices=("synth", "dirichlet"), default="synth")
    p.add_argument("--layout", action="store_true",
                   help="only DeepSeek-V3's own layout on 2048 GPUs (PP 16, EP 64, ZeRO-1)")
    p.add_argument("--micro-batches", type=int, default=16,
                   help="with --layout: micro-batches per iteration (16 = pp)")
    args = p.parse_args()
    if args.layout:
        row = measure_layout(10, args.micro_batches)
        print_table([row])
        print()
        print(row["memory"])
        return
    rows = [measure(args.gpus, args.iterations, args.generator)]
    print_table(rows)
    if args.curve:
        curve = [measure(g, args.curve_iterations, args.generator) for g in CURVE_GPUS]
        print()
        print_table(curve)


if __name__ == "__main__":
    main()
