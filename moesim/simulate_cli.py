"""``moesim simulate``: replay a routing trace through a placement policy on a modelled cluster.

With no arguments it runs the bundled synthetic trace (shaped like SmartMoE's GPT-MoE run, 16
ranks; no recorded data) with model ``smartmoe-gpt`` on ``a100-4x8-ib800`` reduced to 2 nodes
(16 GPUs) under ``static_ep``. It prints one row per iteration (stdout), a progress bar (stderr,
long runs), a final summary line, and writes a RunResult directory (``--out``, default
``moesim-runs/<policy>-<cluster>-<time>``). ``--world-size`` / ``--gpus-per-node`` / ``--nodes``
resize the cluster; ``--regroup`` regroups a trace recorded on another number of ranks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moesim.errors import MoesimError

DEFAULT_MODEL = "smartmoe-gpt"
DEFAULT_CLUSTER = "a100-4x8-ib800"
DEFAULT_NODES_BUNDLED = 2
HEADER = (f"{'iter':>5} {'step ms':>10} {'MoE %':>6} {'a2a ms':>9} {'straggler':>9} "
          f"{'dropped %':>9} {'peak GiB':>9}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a placement policy on a routing trace",
        description="Replay a routing trace through a placement policy and predict step time, "
        "MoE/all-to-all time, stragglers, dropped tokens and memory per iteration. With no "
        "arguments: the bundled synthetic trace (shaped like SmartMoE's GPT-MoE run; no "
        "recorded data), model smartmoe-gpt, cluster a100-4x8-ib800 with --nodes 2, policy "
        "static_ep.")
    p.add_argument("--trace", help="trace file (.npz) or directory; default: the bundled "
                   "synthetic trace")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model preset name or .toml path")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster preset or .toml path")
    p.add_argument("--nodes", type=int, help="resize the cluster to N nodes (GPUs per node kept)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node of the cluster (default: the preset's)")
    p.add_argument("--world-size", type=int,
                   help="simulate on N GPUs: N / gpus-per-node nodes, or one node of N GPUs "
                        "when N is smaller than a node")
    p.add_argument("--regroup", action="store_true",
                   help="when the trace's rank count differs from the GPU count, regroup its "
                        "ranks to the GPU count (as 'moesim trace regroup'; written into the "
                        "run's config); without it such a trace is refused")
    p.add_argument("--policy", default="static_ep", help="registered policy name")
    p.add_argument("--knob", action="append", default=[], metavar="K=V",
                   help="policy knob, repeatable (e.g. --knob capacity_factor=1.0)")
    p.add_argument("--iterations", metavar="A:B", help="trace iterations A..B-1 (A:, :B, or A)")
    p.add_argument("--out", help="RunResult directory to write")
    p.add_argument("--timeline", default="", metavar="I,J",
                   help="iterations to export as Chrome/Perfetto timelines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out run")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's RNG")
    p.add_argument("--allow-oom", action="store_true",
                   help="record plans that do not fit in GPU memory instead of failing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=run)


def shape_cluster(cluster, nodes: int | None, gpus_per_node: int | None,
                  world_size: int | None, bundled_default: bool):
    """The cluster resized by ``--nodes`` / ``--gpus-per-node`` / ``--world-size``.

    With none given, the bundled trace on the default cluster runs on
    :data:`DEFAULT_NODES_BUNDLED` nodes. ``--world-size N`` alone keeps the preset's GPUs per
    node (one node of ``N`` when ``N`` is smaller) and must be a multiple of them.
    """
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node),
                        ("--world-size", world_size)):
        if value is not None and value < 1:
            raise MoesimError(f"{flag} {value} must be >= 1")
    if nodes is None and gpus_per_node is None and world_size is None:
        return cluster.with_shape(DEFAULT_NODES_BUNDLED) if bundled_default else cluster
    gpn = gpus_per_node or cluster.gpus_per_node
    if world_size is not None:
        if gpus_per_node is None and nodes is None and world_size < gpn:
            gpn = world_size
        if world_size % gpn:
            raise MoesimError(f"--world-size {world_size} is not a multiple of {gpn} GPUs per "
                              "node; change it or pass --gpus-per-node")
        if nodes is not None and nodes * gpn != world_size:
            raise MoesimError(f"--nodes {nodes} x {gpn} GPUs per node is not --world-size "
                              f"{world_size}; give two of the three")
        nodes = world_size // gpn
    return cluster.with_shape(nodes if nodes is not None else cluster.num_nodes, gpn)


def parse_iterations(text: str | None) -> tuple[int, int] | None:
    """``"A:B"`` → ``(A, B)``; ``"A:"``, ``":B"``, ``"A"`` likewise; None → all (the rule
    every command shares: :func:`moesim.validation.iteration_range`)."""
    from moesim.validation import iteration_range

    return iteration_range(text, "--iterations")


def parse_knobs(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` → dict (strings; the policy's Config coerces them)."""
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoesimError(f"--knob {item!r} is not K=V; e.g. --knob capacity_factor=1.0")
        knobs[key.strip()] = value.strip()
    return knobs


def parse_timeline(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoesimError(f"--timeline {text!r} is not a comma-separated list of "
                          "iterations; e.g. 0,5") from None


def _trace_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """The trace to run and whether it is the bundled default."""
    if args.trace:
        path = Path(args.trace)
        if not path.exists():
            raise MoesimError(f"no trace file {args.trace!r}; check the path, or omit --trace "
                              "to use the bundled trace")
        return path, False
    from moesim import traces

    finder = getattr(traces, "bundled_trace_path", None)
    if finder is None:
        raise MoesimError("no bundled trace in this installation; pass --trace FILE")
    return Path(finder()), True


def run(args: argparse.Namespace) -> int:
    from moesim import validation
    from moesim.policies.base import make_policy
    from moesim.simulate import simulate
    from moesim.specs import load_cluster, load_model

    trace, bundled = _trace_path(args)
    model = load_model(args.model)
    cluster = shape_cluster(load_cluster(args.cluster), args.nodes, args.gpus_per_node,
                            args.world_size,
                            bundled and args.cluster == DEFAULT_CLUSTER)
    policy = make_policy(args.policy, parse_knobs(args.knob))
    out = args.out or f"moesim-runs/{args.policy}-{cluster.name.replace('@', '-')}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    summary = simulate(trace, model, cluster, policy,
                       iterations=parse_iterations(args.iterations),
                       rng_seed=validation.seed(args.seed),
                       out_dir=out, timeline_iterations=parse_timeline(args.timeline),
                       resume=args.resume, allow_oom=args.allow_oom,
                       progress=sys.stderr.isatty(),
                       on_iteration=None if args.quiet else _RowPrinter(),
                       regroup=args.regroup)
    print(summary_line(summary.whole_run(), args.policy, cluster.name))
    return 0


class _RowPrinter:
    """Prints the table header before the first row (so errors come alone), then rows."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, row: dict) -> None:
        if not self.started:
            print(HEADER)
            self.started = True
        _print_row(row)


def _print_row(row: dict) -> None:
    step = row["step_time_s"]
    share = 100 * row["moe_time_s"] / step if step > 0 else 0.0
    dropped = 100 * row["tokens_dropped"] / max(row["tokens_total"], 1)
    print(f"{row['iteration']:>5} {step * 1e3:>10.2f} {share:>6.1f} "
          f"{row['a2a_time_s'] * 1e3:>9.2f} {row['straggler_ratio']:>9.2f} {dropped:>9.2f} "
          f"{row['peak_memory_bytes'] / 2**30:>9.2f}", flush=True)


def summary_line(summary, policy: str, cluster: str) -> str:
    """One line: iterations, mean step time, MoE share, all-to-all, stragglers, drops, memory,
    overload factor and imbalance."""
    n = len(summary.rows)
    if n == 0:
        return f"{policy} on {cluster}: nothing left to simulate -> {summary.out_dir}"
    step = summary.mean("step_time_s") or float("nan")
    dropped = summary.column("tokens_dropped").sum() / max(summary.column("tokens_total").sum(), 1)
    return (f"{policy} on {cluster}: {n} iterations, mean step {step * 1e3:.2f} ms, "
            f"MoE {100 * summary.mean('moe_time_s') / step:.1f}%, "
            f"a2a {summary.mean('a2a_time_s') * 1e3:.2f} ms, "
            f"straggler {summary.mean('straggler_ratio'):.2f}, dropped {100 * dropped:.2f}%, "
            f"peak {summary.column('peak_memory_bytes').max() / 2**30:.2f} GiB, "
            f"{overload_text(summary)} -> {summary.out_dir}")


def overload_text(summary) -> str:
    """``overload 1.25 (max 1.42, cum 1.05), imbalance 0.25``: means over iterations of the
    overload factor and imbalance, and the run's largest per-entry and cumulative maxima
    (:mod:`moesim.metrics`)."""
    if "overload_mean" not in summary.rows[0]:
        return "overload -"
    return (f"overload {summary.mean('overload_mean'):.2f} "
            f"(max {summary.column('overload_max').max():.2f}, "
            f"cum {summary.column('overload_cum_max').max():.2f}), "
            f"imbalance {summary.mean('imbalance'):.2f}")
