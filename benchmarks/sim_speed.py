"""Simulator speed and memory: DeepSeek-V3 shape from 8 to 4096 GPUs (issue 16's targets).

Run on one core (each case in its own process, so its peak RSS is its own ``ru_maxrss``)::

    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py              # the three targets
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --curve      # plus 8 … 4096 GPUs
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --phases     # plus time per phase
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --case ep --gpus 1024 --iterations 10
    OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --layout --micro-batches 32

Targets (CPU seconds of ``simulate`` on one core; peak RSS of the whole process, the trace
included):

- ``ep 256 × 100`` — static EP on 256 H100s (``h100-32x8``), 100 iterations: ≤ 1.0 s;
- ``ep 2048 × 10`` — static EP on 2048 H100s (EP 256 × DP 8): ≤ 5 s and ≤ 6 GB;
- ``layout 2048 × 10`` — DeepSeek-V3 (3 dense + 58 MoE layers) on ``h800-256x8`` under the
  ``deepseek-v3`` layout preset (PP 16, EP 64, ZeRO-1, recompute, all-to-all overlap),
  ``--micro-batches`` (16 = pp) micro-batches of one 4096-token sequence per rank per
  iteration, the trace holding one stage's 128 token sources: ≤ 5 s and ≤ 6 GB.

Model ``deepseek-v3`` (58 MoE layers, 256 experts, top-8, 4096 tokens per rank); policy
``static_ep``. Traces: ``synth`` (:func:`moesim.traces.synth.synthesize`, the 256 × 100 row's
default, as before) or ``dirichlet`` (per layer a Dirichlet(1) popularity, per pass and rank a
multinomial draw: fast, int32; every other row). Trace generation is timed separately
(``gen s``); ``cpu s`` is the process CPU time of the ``simulate`` call (decide, route, lower,
cost, schedule, records and metrics; no output directory) — the honest figure on a shared
machine. Plans that do not fit in 80 GB (small GPU counts) are simulated with ``allow_oom``.
``--phases`` splits ``cpu s`` by phase (:mod:`sim_phases`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from moesim.simulate import simulate  # noqa: E402
from moesim.specs import load_cluster, load_model  # noqa: E402
from moesim.traces.format import RoutingTrace, TraceMeta  # noqa: E402

CURVE_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TARGETS = (("ep", 256, 100, "synth"), ("ep", 2048, 10, "dirichlet"),
           ("layout", 2048, 10, "dirichlet"))


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


def setup(case: str, gpus: int, iterations: int, generator: str, micro_batches: int
          ) -> tuple[dict, float]:
    """``(simulate keyword arguments, trace generation seconds)`` of one case."""
    model = load_model("deepseek-v3")
    t0 = time.perf_counter()
    if case == "layout":
        from moesim.layout import load_layout
        from moesim.layout_run import prepare
        from moesim.policies.base import make_policy

        cluster, layout = load_cluster("h800-256x8"), load_layout("deepseek-v3")
        model = model.replace(micro_batches=micro_batches)
        plan, _, _ = prepare(layout, model, cluster, make_policy("static_ep"), micro_batches)
        trace = dirichlet_trace(model, plan.stage_ranks, iterations * micro_batches, 0,
                                micro_batches=micro_batches)
        kw = {"layout": layout}
    else:
        cluster = load_cluster("h100-32x8").with_shape(max(gpus // 8, 1), min(gpus, 8))
        trace = make_trace(model, gpus, iterations, generator)
        kw = {"allow_oom": True}
    return dict(trace=trace, model=model, cluster=cluster, policy="static_ep",
                progress=False, **kw), time.perf_counter() - t0


def measure(case: str, gpus: int, iterations: int, generator: str, micro_batches: int = 16,
            phases: bool = False) -> dict:
    """Generate, then simulate (optionally under the phase profiler); one table row."""
    kw, gen_s = setup(case, gpus, iterations, generator, micro_batches)
    prof = None
    if phases:
        from sim_phases import PhaseTimer

        prof = PhaseTimer()
    t0, c0 = time.perf_counter(), time.process_time()
    if prof is None:
        summary = simulate(**kw)
    else:
        with prof:
            summary = simulate(**kw)
    sim_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    world = kw["cluster"].world_size
    row = {"case": case, "gpus": world, "iterations": iterations, "gen_s": gen_s,
           "sim_s": sim_s, "cpu_s": cpu_s, "ms_per_it": 1e3 * cpu_s / iterations,
           "rlp_per_s": world * kw["model"].num_layers * kw["trace"].num_passes / cpu_s,
           "step_ms": 1e3 * summary.mean("step_time_s"),
           "oom": int(summary.column("oom").max()),
           "rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
           "generator": "dirichlet" if case == "layout" else generator}
    if prof is not None:
        row["phases"] = prof.cpu_s
    if case == "layout":
        row["stage_table"] = summary.stage_table
    return row


def command(case: str, gpus: int, iterations: int, generator: str, micro_batches: int) -> str:
    """The command that measures one row on its own."""
    extra = f" --micro-batches {micro_batches}" if case == "layout" else \
        f" --gpus {gpus} --generator {generator}"
    return (f"OMP_NUM_THREADS=1 python benchmarks/sim_speed.py --case {case} "
            f"--iterations {iterations}{extra}")


def run_child(case: str, gpus: int, iterations: int, generator: str, micro_batches: int,
              phases: bool) -> dict:
    """One case in a fresh process (its own peak RSS)."""
    argv = [sys.executable, __file__, "--case", case, "--gpus", str(gpus), "--iterations",
            str(iterations), "--generator", generator, "--micro-batches", str(micro_batches),
            "--json"] + (["--phases"] if phases else [])
    out = subprocess.run(argv, capture_output=True, text=True, check=False,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise SystemExit(f"{case} at {gpus} GPUs failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["command"] = command(case, gpus, iterations, generator, micro_batches)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<7} {'GPUs':>5} {'iters':>6} {'trace':>9} {'gen s':>7} {'cpu s':>7} "
          f"{'wall s':>7} {'ms/iter':>8} {'rank·layer·pass/s':>18} {'step ms':>9} "
          f"{'RSS GB':>7} {'oom':>4}")
    for r in rows:
        print(f"{r['case']:<7} {r['gpus']:>5} {r['iterations']:>6} {r['generator']:>9} "
              f"{r['gen_s']:>7.2f} {r['cpu_s']:>7.2f} {r['sim_s']:>7.2f} "
              f"{r['ms_per_it']:>8.1f} {r['rlp_per_s']:>18,.0f} {r['step_ms']:>9.1f} "
              f"{r['rss_GB']:>7.2f} {r['oom']:>4}", flush=True)


def print_commands(rows: list[dict]) -> None:
    for r in rows:
        print(f"  {r['case']} {r['gpus']} × {r['iterations']}: {r['command']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("ep", "layout"), help="measure one case in this process")
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--iterations", type=int, default=None,
                   help="with --case: iterations (default 100 for ep, 10 for layout)")
    p.add_argument("--layout", action="store_true",
                   help="only the layout case (--case layout)")
    p.add_argument("--generator", choices=("synth", "dirichlet"), default="synth")
    p.add_argument("--micro-batches", type=int, default=16,
                   help="layout case: micro-batches per iteration (16 = pp)")
    p.add_argument("--curve", action="store_true", help="also 8 … 4096 GPUs")
    p.add_argument("--curve-iterations", type=int, default=10)
    p.add_argument("--phases", action="store_true", help="CPU seconds per simulator phase")
    p.add_argument("--json", action="store_true", help="with --case: one JSON line")
    args = p.parse_args()
    if args.layout:
        args.case = "layout"
    if args.iterations is None:
        args.iterations = 10 if args.case == "layout" else 100
    if args.case:
        row = measure(args.case, args.gpus, args.iterations, args.generator,
                      args.micro_batches, args.phases)
        if args.json:
            print(json.dumps(row))
            return
        row["command"] = command(args.case, args.gpus, args.iterations, args.generator,
                                 args.micro_batches)
        rows = [row]
        if row.get("stage_table"):
            print(row["stage_table"] + "\n")
    else:
        rows = [run_child(c, g, i, gen, args.micro_batches, args.phases)
                for c, g, i, gen in TARGETS]
        if args.curve:
            rows += [run_child("ep", g, args.curve_iterations, "dirichlet", 1, args.phases)
                     for g in CURVE_GPUS]
    print_table(rows)
    print("\ncommands:")
    print_commands(rows)
    if args.phases:
        from sim_phases import print_phases

        print()
        print_phases(rows)
    print(f"\none core (OMP_NUM_THREADS=1), static_ep, DeepSeek-V3 shape; {time.ctime()}")


if __name__ == "__main__":
    main()
