"""Every paper's set-up, replayed through its policy and the baselines, beside the paper's numbers.

    python benchmarks/policies.py --quick   # few iterations, 2 MoE layers per model (< 3 min)
    python benchmarks/policies.py           # 8 iterations, every MoE layer, every model (~5 min)
    python benchmarks/policies.py --workloads  # every policy on the 8 isolating workloads

For each set-up of ``../shared/POLICIES.md`` (SwiftMoE, LAER-MoE, Hecate, FlexMoE, EPLB,
SmartMoE, FasterMoE) and each trace — the real SmartMoE-AE sample, regrouped to the set-up
(:func:`regroup`), and a synthetic trace of the set-up's shape (``SynthConfig.smartmoe_like``
in its skewed regime, consecutive iterations) — it simulates every policy and prints one row
each: mean step time over the iterations after the first (iteration 0 has no history), the
speed-up over the set-up's static-EP baseline, all-to-all time, token survival, peak GPU
memory, re-layout bytes per iteration, planner time, and the mean per-layer gap of the
policy's max GPU load to ``oracle_ilp``'s proven bound (2 layers, 2 iterations, 1 s per
layer), with the paper's published figure beside it. The table is also written to
``benchmarks/results/policies.md`` (atomic write).

Real-trace mapping (:func:`regroup`): the sample has 16 ranks, 24 layers, 32 experts, top-2,
4 micro-batches of 2048 tokens, every 10th iteration. Layers: the first ``L`` (cycled when the
model has more). Experts: summed in contiguous groups (32 → 16 / 8) or each split evenly at
random (32 → 64, the parts under random expert ids). Ranks: summed in groups, or
each rank's tokens split evenly at random over ``R/16`` ranks (16 → 32). Micro-batches: the
first ``M`` of each iteration. Every (pass, layer, rank) row is then rescaled to the model's
``tokens_per_rank · top_k`` with its proportions kept (largest-remainder rounding), so the
popularity skew is the trace's and the volume the model's. The sampled iterations are 10
training steps apart, so a policy that plans from "the previous iteration" sees 10-step-old
load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.policies import History, make_policy
from moesim.policies.oracle_ilp import gap_to_oracle
from moesim.simulate import simulate
from moesim.specs import Cluster, ModelSpec, load_cluster, load_model
from moesim.traces import RoutingTrace, SynthConfig, TraceMeta, import_smartmoe, synthesize

SMARTMOE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "smartmoe-trace"
RESULTS = Path(__file__).resolve().parent / "results" / "policies.md"
GiB = 2.0 ** 30
WARMUP = 2   # iterations left out of the means: no history yet (0), LAER's one-iteration lag (1)
# re-plan every trace iteration so that short runs exercise the planners (the SmartMoE sample's
# iterations are 10 training steps apart, i.e. the papers' 10-step intervals)
FLEX = {"check_interval": 1, "window": 1}
EPLB = {"interval": 1, "window": 1}


@dataclass(frozen=True)
class Setup:
    """One paper's set-up: models × cluster, the policies (label → (name, knobs)), the
    baseline's label, and the paper's published figure per policy label."""

    paper: str
    models: tuple[str, ...]
    cluster: str
    policies: dict
    baseline: str
    published: dict = field(default_factory=dict)


def _setups() -> list[Setup]:
    swift_cf = {"capacity_factor": 1.0, "capacity_rule": "deepspeed", "ep_size": 4}
    return [
        Setup("SwiftMoE", ("gpt-moe-s", "gpt-moe-m", "gpt-moe-l"), "a100-16x1-100g", {
            "static_ep cf1 (DS ZeRO-1 offload)": ("static_ep", dict(swift_cf,
                                                                     optimizer_on_host=True)),
            "static_ep cf2 offload": ("static_ep", dict(swift_cf, capacity_factor=2.0,
                                                        optimizer_on_host=True)),
            "static_ep cf4 offload": ("static_ep", dict(swift_cf, capacity_factor=4.0,
                                                        optimizer_on_host=True)),
            "static_ep cf1 (GPU optimizer)": ("static_ep", swift_cf),
            "swiftmoe S=4 cf1": ("swiftmoe", {"slots_per_rank": 4, "capacity_factor": 1.0}),
            "flexmoe S=4 cf1": ("flexmoe", dict(FLEX, slots_per_rank=4, capacity_factor=1.0)),
        }, "static_ep cf1 (DS ZeRO-1 offload)", {
            "static_ep cf1 (DS ZeRO-1 offload)": "survival 44.9%",
            "static_ep cf2 offload": "survival 65.6%",
            "static_ep cf4 offload": "survival 74.9%",
            "swiftmoe S=4 cf1": "iter 2.8-9.3% faster; 43-69% fewer drops",
            "flexmoe S=4 cf1": "rebalancing iters 2.46-4.10x slower",
        }),
        # LAER-MoE runs under its artifact's own layouts: benchmarks/paper_layouts.py (below)
        Setup("Hecate", ("hecate-gpt-moe-s", "hecate-gpt-moe-l"), "v100-32-100g", {
            "static_ep (dropless)": ("static_ep", {}),
            "hecate": ("hecate", {}),
            "fastermoe": ("fastermoe", {}),
            "flexmoe": ("flexmoe", dict(FLEX, slots_per_rank=3)),
        }, "static_ep (dropless)", {
            "hecate": "1.65x/2.05x geo-mean over best baseline (V100 16/32 GPUs)",
            "flexmoe": "uses 83% more memory than Hecate",
        }),
        Setup("Hecate", ("hecate-gpt-moe-s", "hecate-gpt-moe-l"), "a100-40g-4x8-400g", {
            "static_ep (dropless)": ("static_ep", {}),
            "hecate": ("hecate", {}),
            "fastermoe": ("fastermoe", {}),
        }, "static_ep (dropless)", {
            "hecate": "2.95x geo-mean over best baseline (A100); a2a 12.3x lower than EP",
        }),
        Setup("SmartMoE/FasterMoE/EPLB", ("smartmoe-gpt",), "a100-4x8-ib800@2", {
            "static_ep (dropless)": ("static_ep", {}),
            "smartmoe": ("smartmoe", {"freq": 1}),
            "fastermoe": ("fastermoe", {}),
            "eplb (even)": ("eplb", EPLB),
            "eplb (node_first)": ("eplb", dict(EPLB, routing="node_first")),
            "flexmoe": ("flexmoe", dict(FLEX, slots_per_rank=3)),
            "laer_fsep C=4": ("laer_fsep", {"slots_per_rank": 4}),
        }, "static_ep (dropless)", {
            "flexmoe": "1.70x vs DeepSpeed, 1.30x vs FasterMoE (FlexMoE paper)",
        }),
    ]


# --------------------------------------------------------------------------------------------
# traces


def _round_rows(p_X: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Largest-remainder rounding of proportions ``p[..., E]`` to integer rows summing to
    ``total`` (each entry at most ``cap``, the tokens that can pick one expert)."""
    x = p_X * total
    out = np.floor(x).astype(np.int64)
    short = total - out.sum(axis=-1)
    order = np.argsort(-(x - out), axis=-1)
    rank = np.argsort(order, axis=-1)
    out += rank < short[..., None]
    return np.minimum(out, cap)


def regroup(trace: RoutingTrace, model: ModelSpec, num_ranks: int, num_iterations: int,
            rng: np.random.Generator) -> RoutingTrace:
    """The trace mapped to ``model``'s shape on ``num_ranks`` ranks (module docstring)."""
    c = trace.counts_TLRE.astype(np.float64)
    M0 = trace.meta.micro_batches_per_iteration
    I0 = min(num_iterations, trace.num_iterations)
    M, L, E, R = model.micro_batches, model.num_layers, model.num_experts, num_ranks
    keep = [i * M0 + m for i in range(I0) for m in range(min(M, M0))]
    c = c[keep][:, [l % c.shape[1] for l in range(L)]]
    T, _, R0, E0 = c.shape
    if E0 % E == 0:
        c = c.reshape(T, L, R0, E, E0 // E).sum(axis=4)
    elif E % E0 == 0:
        # the parts of an expert get random ids (expert ids carry no meaning; adjacent ids
        # would land on one GPU under a contiguous or striped placement and double a hot spot)
        split = rng.multinomial(c.astype(np.int64), np.full(E // E0, E0 / E))
        c = split.reshape(T, L, R0, E)[..., rng.permutation(E)]
    else:
        raise MoesimError(f"cannot regroup {E0} experts to {E}")
    if R0 % R == 0:
        c = c.reshape(T, L, R, R0 // R, E).sum(axis=3)
    elif R % R0 == 0:
        split = rng.multinomial(c.astype(np.int64), np.full(R // R0, R0 / R))
        c = np.moveaxis(split, 4, 3).reshape(T, L, R, E)
    else:
        raise MoesimError(f"cannot regroup {R0} ranks to {R}")
    tot = c.sum(axis=3, keepdims=True)
    p = np.where(tot > 0, c / np.maximum(tot, 1), 1.0 / E)
    k, tok = model.top_k, model.tokens_per_rank
    counts = _round_rows(p, tok * k, tok)
    meta = TraceMeta(num_layers=L, num_ranks=R, num_experts=E, top_k=k, tokens_per_rank=tok,
                     micro_batches_per_iteration=min(M, M0), iteration_stride=10,
                     model=model.name, source=f"SmartMoE-AE sample regrouped ({R0}r/{E0}e "
                     f"-> {R}r/{E}e)", license=trace.meta.license)
    return RoutingTrace(counts, meta)


def synthetic(model: ModelSpec, num_ranks: int, num_iterations: int, seed: int) -> RoutingTrace:
    """SmartMoE-like statistics in the skewed regime, consecutive iterations."""
    cfg = SynthConfig.smartmoe_like(
        num_layers=model.num_layers, num_ranks=num_ranks, num_experts=model.num_experts,
        top_k=model.top_k, tokens_per_rank=model.tokens_per_rank,
        micro_batches_per_iteration=model.micro_batches, num_iterations=num_iterations,
        iteration_stride=1, skew_start=1.0)
    return synthesize(cfg, rng=seed, workers=1)


# --------------------------------------------------------------------------------------------
# runs


def _cluster(name: str) -> Cluster:
    base, _, nodes = name.partition("@")
    c = load_cluster(base)
    return c.with_shape(int(nodes)) if nodes else c


def run_policy(trace: RoutingTrace, model: ModelSpec, cluster: Cluster, name: str,
               knobs: dict) -> dict:
    """Mean summary columns over the iterations after the first (all when only one)."""
    policy = make_policy(name, knobs)
    t0 = time.perf_counter()
    summ = simulate(trace, model, cluster, policy, progress=False, allow_oom=True)
    rows = summ.rows[WARMUP:] or summ.rows
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    mean["survival"] = 1.0 - (sum(r["tokens_dropped"] for r in rows)
                              / max(sum(r["tokens_total"] for r in rows), 1))
    mean["oom"] = max(r["oom"] for r in rows)
    mean["wall_s"] = time.perf_counter() - t0
    return mean


def oracle_gap(trace: RoutingTrace, model: ModelSpec, cluster: Cluster, name: str,
               knobs: dict, iterations: int = 2, layers: int = 2,
               time_limit_s: float = 1.0, cache: dict | None = None) -> float:
    """Mean over layers and iterations ``WARMUP..WARMUP+iterations-1`` of the policy's
    per-layer max GPU load gap to ``oracle_ilp``'s bound (same slots per GPU) on the first
    ``layers`` layers; ``cache`` keeps the oracle's decisions per (trace, S, iteration)."""
    L = min(layers, model.num_layers)
    m = model.replace(num_layers=L, tokens_per_rank=trace.meta.tokens_per_rank,
                      micro_batches=trace.meta.micro_batches_per_iteration)
    c_TLRE = trace.counts_TLRE[:, :L]
    mb = trace.meta.micro_batches_per_iteration
    policy, rng = make_policy(name, knobs), np.random.default_rng(0)
    cache = {} if cache is None else cache
    prev, gaps = None, []
    for it in range(min(WARMUP + iterations, trace.num_iterations)):
        cur = c_TLRE[it * mb:(it + 1) * mb]
        d = policy.decide(History(it, c_TLRE[:it * mb], mb, prev), m, cluster, rng)
        prev = d
        if it < min(WARMUP, trace.num_iterations - 1):
            continue
        S = d.placement.slots_per_rank
        key = (id(trace), S, it)
        if key not in cache:
            oracle = make_policy("oracle_ilp", {"slots_per_rank": S,
                                                "time_limit_s": time_limit_s})
            cache[key] = oracle.decide(History(it, c_TLRE[:it * mb], mb, None, cur), m,
                                       cluster, rng)
        gaps.append(np.mean(gap_to_oracle(d, cache[key], cur.sum(axis=(0, 2)))))
    return float(np.mean(gaps)) if gaps else float("nan")


def _traces(setup: Setup, model: ModelSpec, cluster: Cluster, iters: int,
            real: RoutingTrace | None) -> list[tuple[str, RoutingTrace]]:
    out = []
    if real is not None:
        out.append(("smartmoe", regroup(real, model, cluster.world_size, iters,
                                        np.random.default_rng(0))))
    out.append(("synth", synthetic(model, cluster.world_size, iters, seed=0)))
    return out


def _fmt(x: float, spec: str, nan: str = "-") -> str:
    return nan if x is None or not np.isfinite(x) else format(x, spec)


def run_all(quick: bool) -> tuple[list[dict], str]:
    """Every set-up × model × trace × policy → rows; and the table header note."""
    iters, layers = (4, 2) if quick else (8, 10**6)
    real = import_smartmoe(SMARTMOE_DIR) if SMARTMOE_DIR.is_dir() else None
    if real is None:
        print(f"note: {SMARTMOE_DIR} is absent; real-trace rows skipped", file=sys.stderr)
    rows = []
    for setup in _setups():
        cluster = _cluster(setup.cluster)
        models = setup.models[:1] if quick else setup.models
        for model_name in models:
            full = load_model(model_name)
            model = full.replace(num_layers=min(layers, full.num_layers))
            for trace_name, trace in _traces(setup, model, cluster, iters, real):
                base, cache = None, {}
                for label, (name, knobs) in setup.policies.items():
                    r = run_policy(trace, model, cluster, name, knobs)
                    if label == setup.baseline:
                        base = r["step_time_s"]
                    gap = oracle_gap(trace, model, cluster, name, knobs, cache=cache)
                    rows.append(dict(paper=setup.paper, model=model_name, cluster=setup.cluster,
                                     trace=trace_name, policy=label, gap=gap,
                                     speedup=base / r["step_time_s"] if base else np.nan,
                                     published=setup.published.get(label, ""), **r))
                    print(f"  {setup.paper:10s} {model_name:20s} {trace_name:8s} {label:36s} "
                          f"{r['step_time_s'] * 1e3:9.1f} ms  ({r['wall_s']:.1f}s)",
                          file=sys.stderr)
    depth = (f"at most {layers} MoE layers per model (ModelSpec.replace(num_layers=...))"
             if quick else "every MoE layer of each model")
    note = (f"{'--quick: ' if quick else ''}{iters} iterations per trace (means over "
            f"iterations {WARMUP}..{iters - 1}), {depth}; oracle gap on 2 layers x 2 "
            "iterations after the warm-up, 1 s per layer"
            + ("; --quick: first model of each set-up only" if quick else ""))
    return rows, note


def table(rows: list[dict], note: str) -> str:
    """The markdown table."""
    head = ("| paper | model | cluster | trace | policy | step ms | speed-up vs static | "
            "a2a ms | survival % | peak GiB | re-layout GB/it | planner ms | "
            "gap to oracle % | published |")
    lines = [f"_{note}_", "", head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['paper']} | {r['model']} | {r['cluster']} | {r['trace']} | {r['policy']} | "
            f"{r['step_time_s'] * 1e3:.1f} | {_fmt(r['speedup'], '.2f')}x | "
            f"{r['a2a_time_s'] * 1e3:.1f} | {r['survival'] * 100:.1f} | "
            f"{r['peak_memory_bytes'] / GiB:.1f}{' OOM' if r['oom'] else ''} | "
            f"{r['relayout_bytes'] / 1e9:.2f} | {r['planner_time_s'] * 1e3:.2f} | "
            f"{_fmt(r['gap'] * 100, '.1f')} | {r['published']} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations and layers (< 3 min)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table path (default "
                    "benchmarks/results/policies.md, or workloads.md with --workloads)")
    ap.add_argument("--workloads", action="store_true", help="instead: every policy on the "
                    "eight isolating workloads, the winner per workload (workload_bench.py)")
    args = ap.parse_args(argv)
    if args.workloads:
        import workload_bench

        return workload_bench.main(args.quick, write_atomic,
                                   args.out or workload_bench.RESULTS)
    args.out = args.out or RESULTS
    t0 = time.perf_counter()
    rows, note = run_all(args.quick)
    text = table(rows, note)
    import paper_layouts  # beside this file: LAER-MoE with its published layouts

    laer = paper_layouts.MODELS[:1] if args.quick else paper_layouts.MODELS
    laer_rows = [r for name, layers, tp in laer for r in paper_layouts.run(name, layers, tp, 4)]
    text += ("\n\n## LAER-MoE under its artifact's layouts (`benchmarks/paper_layouts.py`)\n\n"
             + paper_layouts.table(laer_rows)
             + "\n\npublished: LAER 1.11-1.69x vs Megatron, 1.03-1.39x vs FLEX")
    print(text)
    write_atomic(args.out, f"# Policies vs the papers\n\n`python benchmarks/policies.py"
                 f"{' --quick' if args.quick else ''}` ({time.perf_counter() - t0:.0f} s)\n\n"
                 + text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
