"""Which policy for which kind of skew: every policy on the eight isolating workloads.

    python benchmarks/policies.py --workloads          # 8 workloads x every policy (~minutes)
    python benchmarks/policies.py --workloads --quick  # 4 iterations, 2 layers

Each workload of :mod:`moesim.traces.workloads` (Megatron-LM PR 7488's W0-W7) is synthesized at
one shape — 16 ranks (2 nodes x 8 A100, ``a100-4x8-ib800@2``), 32 experts, top-2, 2048 tokens
per rank, 2 micro-batches, seed 0 — and replayed through every registered policy (dropless;
EPLB, FlexMoE and SmartMoE re-plan every iteration so that the short runs exercise them, as
``benchmarks/policies.py`` does; the others keep their defaults). Per
workload the table names the policy with the lowest mean step time over the iterations after
the warm-up (with every policy within 0.5 % of it: a tie), its margin over the fastest policy
outside the tie and its speed-up over static EP, with the winner's overload factor; a second
table gives every policy's mean step time. Both are printed and written (markdown) to
``benchmarks/results/workloads.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from moesim.policies import available_policies, make_policy
from moesim.simulate import simulate
from moesim.specs import load_cluster, load_model
from moesim.traces.workloads import WORKLOADS, WorkloadConfig, synthesize_workload

RESULTS = Path(__file__).resolve().parent / "results" / "workloads.md"
WARMUP = 2
KNOBS = {  # dropless everywhere; re-plan every iteration
    "eplb": {"interval": 1, "window": 1}, "flexmoe": {"check_interval": 1, "window": 1},
    "smartmoe": {"freq": 1}, "swiftmoe": {"capacity_factor": "none"},
    "oracle_ilp": {"time_limit_s": 1.0},
}
TIE = 0.005  # policies within 0.5 % of the best step time share the win


def workload_trace(name: str, iterations: int, layers: int):
    """The benchmark's trace of one workload (module docstring)."""
    cfg = WorkloadConfig(workload=name, num_layers=layers, num_ranks=16, num_experts=32,
                         top_k=2, tokens_per_rank=2048, micro_batches_per_iteration=2,
                         num_iterations=iterations, store_topk=False)
    return synthesize_workload(cfg, seed=0)


def _policies() -> list[str]:
    out = []
    for name in available_policies():
        if make_policy(name).oracle and name == "oracle_ilp":
            try:
                import pulp

                if not pulp.listSolvers(onlyAvailable=True):
                    continue
            except ImportError:
                continue
        out.append(name)
    return out


def run_matrix(quick: bool) -> tuple[dict, list[str]]:
    """``{workload: {policy: mean row}}`` and the policies run."""
    iters, layers = (4, 2) if quick else (8, 4)
    cluster = load_cluster("a100-4x8-ib800").with_shape(2)
    base = load_model("smartmoe-gpt").replace(num_layers=layers, num_experts=32, top_k=2)
    names = _policies()
    out: dict = {}
    for workload in WORKLOADS:
        trace = workload_trace(workload, iters, layers)
        out[workload] = {}
        for name in names:
            t0 = time.perf_counter()
            summ = simulate(trace, base, cluster, make_policy(name, KNOBS.get(name, {})),
                            progress=False, allow_oom=True)
            rows = summ.rows[WARMUP:] or summ.rows
            out[workload][name] = {k: float(np.mean([r[k] for r in rows]))
                                   for k in ("step_time_s", "overload_mean", "imbalance")}
            print(f"  {workload:20s} {name:17s} {out[workload][name]['step_time_s'] * 1e3:9.1f}"
                  f" ms  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return out, names


def winners(res: dict) -> tuple[list[str], str | None]:
    """The policies within :data:`TIE` of the best step time (best first), and the fastest
    policy outside them (None when all tie)."""
    ranked = sorted(res, key=lambda n: (res[n]["step_time_s"], n))
    best = res[ranked[0]]["step_time_s"]
    tied = [n for n in ranked if res[n]["step_time_s"] <= best * (1 + TIE)]
    rest = [n for n in ranked if n not in tied]
    return tied, rest[0] if rest else None


def tables(matrix: dict, names: list[str]) -> str:
    """The two markdown tables: winners per workload, and every policy's step time."""
    lines = ["| workload | best policy (ties within 0.5 %) | step ms | runner-up | margin | "
             "vs static_ep | overload (best) | overload (static_ep) |", "|" + "---|" * 8]
    for workload, res in matrix.items():
        tied, second = winners(res)
        b = res[tied[0]]
        static = res.get("static_ep", b)
        margin = f"{res[second]['step_time_s'] / b['step_time_s']:.3f}x" if second else "-"
        lines.append(f"| {workload} | {', '.join(tied)} | {b['step_time_s'] * 1e3:.1f} | "
                     f"{second or '-'} | {margin} | "
                     f"{static['step_time_s'] / b['step_time_s']:.2f}x | "
                     f"{b['overload_mean']:.2f} | {static['overload_mean']:.2f} |")
    lines += ["", "Mean step time (ms) per policy:", "",
              "| workload | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for workload, res in matrix.items():
        lines.append(f"| {workload} | " + " | ".join(f"{res[n]['step_time_s'] * 1e3:.1f}"
                                                      for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(quick: bool, write_atomic, out: Path = RESULTS) -> int:
    """Run the matrix, print the tables, write them with ``write_atomic(path, text)``."""
    t0 = time.perf_counter()
    matrix, names = run_matrix(quick)
    text = tables(matrix, names)
    print(text)
    cmd = "python benchmarks/policies.py --workloads" + (" --quick" if quick else "")
    write_atomic(out, f"# Which policy for which skew\n\n`{cmd}` "
                 f"({time.perf_counter() - t0:.0f} s)\n\n{text}")
    print(f"wrote {out}", file=sys.stderr)
    return 0
