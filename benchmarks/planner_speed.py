"""Planner wall time of the placement policies, beside LAER-MoE's published planner figures.

Usage::

    python benchmarks/planner_speed.py [--repeats 7] [--gpus 64 256 1024] [--experts 32 256]
    python benchmarks/planner_speed.py --compare [--repeats 15] [--gpus 64 1024] [--experts 32]

For each policy, GPU count (8 GPUs per node) and expert count it times ``decide`` for **one MoE
layer** on a synthetic skewed trace (6 iterations, per-layer Dirichlet(0.4) popularity, 8192
tokens × top-2 per rank) and prints the median of ``--repeats`` runs (after one warm-up) of
``Decision.planner_time_s`` (wall) and of this process's CPU time (the two differ when other
processes share the cores; CPU time is the fairer figure then). Slots per GPU:
``max(2, 2·E/G)`` (so every expert fits; LAER's ``C = 2`` wherever ``E ≤ G``). Hecate is timed
with ``overlap_degree`` forced above its extra slots, i.e. on its costlier proportional
materialisation branch. EPLB re-plans every iteration.

``--compare`` times only LAER-MoE, against the planner it replaced (the frozen copy in
``tests/policies/laer_reference.py``, swapped in for ``laer_fsep.plan_layer``), alternating the
two in the same process so both see the same machine load.

LAER-MoE (arXiv 2602.11686) reports its C++ planner at 0.5 ms for 64 GPUs and 0.1–0.28 s for
1024 GPUs, with E = 32. Its artifact's planner (``greedy_balancer.cpp``) takes 0.76 / 7.8 / 115 ms
at 64 / 256 / 1024 GPUs (C = 2, E = 32; the figures of issue 16); the closing table sets
``laer_fsep``'s CPU time beside them (target: at least 2× faster at every size). ``kernel``
says whether the C kernel (``moesim.policies._greedy_c``) or the Python fallback ran.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np

from moesim.errors import MoesimError
from moesim.policies import History, available_policies, greedy, laer_fsep, make_policy
from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec

GPUS_PER_NODE = 8
PUBLISHED_MS = {("laer_fsep", 32, 64): "0.5", ("laer_fsep", 32, 1024): "100–280"}
ARTIFACT_CPP_MS = {64: 0.76, 256: 7.8, 1024: 115.0}      # greedy_balancer.cpp, C = 2, E = 32


def _model(num_experts: int) -> ModelSpec:
    return ModelSpec(name=f"bench-e{num_experts}", num_layers=1, hidden_size=4096,
                     ffn_hidden_size=14336, num_experts=num_experts, top_k=2,
                     tokens_per_rank=8192, seq_len=8192)


def _cluster(num_gpus: int) -> Cluster:
    """A100 nodes as in LAER's testbed (effective 216 GB/s NVLink, 89 GB/s IB per node)."""
    hw = HardwareProfile(name="a100", peak_flops=312e12, mem_bw_GBps=2039.0)
    return Cluster(name=f"a100x{num_gpus}", num_nodes=num_gpus // GPUS_PER_NODE,
                   gpus_per_node=GPUS_PER_NODE, intra=LinkLevel(bw_GBps=216.0, latency_s=5e-6),
                   inter=LinkLevel(bw_GBps=89.0 / GPUS_PER_NODE, latency_s=1e-5),
                   host=LinkLevel(bw_GBps=25.0, latency_s=1e-5), gpu_memory_GiB=80.0,
                   hardware=hw)


def _history(model: ModelSpec, num_gpus: int, seed: int = 0) -> History:
    """6 past iterations of skewed counts ``[T, L, R, E]``."""
    rng = np.random.default_rng(seed)
    T, E = 6, model.num_experts
    counts = np.empty((T, 1, num_gpus, E), dtype=np.int64)
    for t in range(T):
        p = rng.dirichlet(np.full(E, 0.4))
        counts[t, 0] = rng.multinomial(model.tokens_per_rank * model.top_k, p, size=num_gpus)
    return History(iteration=T, past_TLRE=counts, passes_per_iteration=1)


def _knobs(name: str, slots: int) -> dict | None:
    """Knobs per policy (None: not timed)."""
    if name in ("laer_fsep", "swiftmoe"):
        return {"slots_per_rank": slots}
    if name == "eplb":
        return {"slots_per_rank": slots, "interval": 1}
    if name == "hecate":
        return {"extra_slots_per_rank": 2, "overlap_degree": 8}
    return None


def time_policy(name: str, num_experts: int, num_gpus: int,
                repeats: int) -> tuple[float, float]:
    """Median planner wall time and CPU time of this process (s) of one layer's decision."""
    runs = _runs(name, num_experts, num_gpus, repeats, [None])[None]
    return float(np.median(runs[0])), float(np.median(runs[1]))


def _runs(name: str, num_experts: int, num_gpus: int, repeats: int,
          planners: list) -> dict:
    """Wall and CPU times ``([s], [s])`` of ``repeats`` decisions (after one warm-up) per entry
    of ``planners`` (``None``: as registered; else a ``plan_layer`` swapped into
    ``laer_fsep``), alternating them run by run."""
    model, cluster = _model(num_experts), _cluster(num_gpus)
    slots = max(2, math.ceil(2 * num_experts / num_gpus))
    policy = make_policy(name, _knobs(name, slots))
    history = _history(model, num_gpus)
    out = {p: ([], []) for p in planners}
    for r in range(repeats + 1):
        for p in planners:
            rng = np.random.default_rng(r)
            with mock.patch.object(laer_fsep, "plan_layer", p) if p else nullcontext():
                c0 = time.process_time()
                d = policy.decide(history, model, cluster, rng)
                cpu = time.process_time() - c0
            if r:
                out[p][0].append(d.planner_time_s)
                out[p][1].append(cpu)
    return out


def compare_laer(experts: list[int], gpus: list[int], repeats: int) -> None:
    """Print LAER-MoE's planner times beside the frozen pre-speed-up planner's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "policies"))
    import laer_reference

    print(f"{'E':>4} {'G':>5} {'new wall':>9} {'new cpu':>9} {'old wall':>9} {'old cpu':>9} "
          f"{'cpu speed-up':>13}")
    for E in experts:
        for G in gpus:
            runs = _runs("laer_fsep", E, G, repeats, [None, laer_reference.plan_layer])
            new, old = ([float(np.median(x)) * 1e3 for x in runs[p]]
                        for p in (None, laer_reference.plan_layer))
            print(f"{E:>4} {G:>5} {new[0]:>9.3f} {new[1]:>9.3f} {old[0]:>9.3f} {old[1]:>9.3f} "
                  f"{old[1] / new[1]:>12.2f}x")
    print(f"\nms per one-layer decision, median of {repeats} runs (old and new alternating), "
          f"{GPUS_PER_NODE} GPUs per node, C = max(2, 2E/G); LAER paper (C++): 0.5 ms at "
          "G=64, 100–280 ms at G=1024 (E=32)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gpus", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--experts", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--compare", action="store_true",
                    help="time LAER-MoE against the planner it replaced, side by side")
    ap.add_argument("--no-c-kernel", action="store_true",
                    help="time the Python fallback instead of the C kernel (_greedy_c)")
    args = ap.parse_args(argv)
    if args.no_c_kernel:
        greedy._greedy_c = None
    if args.compare:
        compare_laer(args.experts, args.gpus, args.repeats)
        return
    names = [n for n in ("laer_fsep", "hecate", "swiftmoe", "eplb")
             if n in available_policies()]
    laer_cpu_ms: dict[int, float] = {}
    head = f"{'policy':<10} {'E':>4} " + " ".join(f"{f'G={g}':>15}" for g in args.gpus)
    print(head + "   LAER paper (C++, ms wall)")
    print("-" * (len(head) + 24))
    for name in names:
        for E in args.experts:
            cells, published = [], []
            for G in args.gpus:
                try:
                    wall, cpu = time_policy(name, E, G, args.repeats)
                    if name == "laer_fsep" and E == 32:
                        laer_cpu_ms[G] = cpu * 1e3
                    cells.append(f"{f'{wall * 1e3:.2f}/{cpu * 1e3:.2f}':>15}")
                except MoesimError as exc:
                    cells.append(f"{'n/a':>15}")
                    print(f"  ({name}, E={E}, G={G}: {exc})")
                if (name, E, G) in PUBLISHED_MS:
                    published.append(f"G={G}: {PUBLISHED_MS[(name, E, G)]}")
            print(f"{name:<10} {E:>4} " + " ".join(cells) + "   " + ", ".join(published))
    print(f"\nms wall/cpu (Decision.planner_time_s / this process's CPU time): one MoE layer "
          f"per decision, median of {args.repeats} runs, {GPUS_PER_NODE} GPUs per node, slots "
          "per GPU max(2, 2E/G); wall > cpu means other processes shared the cores")
    print_cpp_comparison(laer_cpu_ms)


def print_cpp_comparison(laer_cpu_ms: dict[int, float]) -> None:
    """``laer_fsep`` (E = 32) beside the LAER artifact's C++ planner: ms and speed-up."""
    sizes = [G for G in laer_cpu_ms if G in ARTIFACT_CPP_MS]
    if not sizes:
        return
    kernel = "C kernel" if greedy._greedy_c is not None else "Python fallback (no C kernel)"
    print(f"\nlaer_fsep (E=32, {kernel}) vs LAER's greedy_balancer.cpp (C=2, E=32)")
    print(f"{'G':>6} {'moesim cpu ms':>14} {'C++ ms':>8} {'C++ / moesim':>13} {'>= 2x':>6}")
    for G in sizes:
        ratio = ARTIFACT_CPP_MS[G] / laer_cpu_ms[G]
        print(f"{G:>6} {laer_cpu_ms[G]:>14.3f} {ARTIFACT_CPP_MS[G]:>8.2f} {ratio:>12.1f}x "
              f"{'yes' if ratio >= 2.0 else 'NO':>6}")


if __name__ == "__main__":
    main()
