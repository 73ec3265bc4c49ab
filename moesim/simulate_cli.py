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
from moesim.layout import add_parallel_argument, parse_layout

DEFAULT_MODEL = "smartmoe-gpt"
DEFAULT_CLUSTER = "a100-4x8-ib800"
DEFAULT_NODES_BUNDLED = 2
HEADER = (f"{'iter':>5} {'step ms':>10} {'MoE %':>6} {'a2a ms':>9} {'straggler':>9} "
          f"{'dropped %':>9} {'peak GiB':>9}")


def register(sub: argparse._SubParsersAction) -> None:
    from moesim.clihelp import add_json_flag

    p = sub.add_parser(
        "simulate", help="simulate a placement policy on a routing trace",
        description="Replay a routing trace through a placement policy and predict step time, "
        "MoE/all-to-all time, stragglers, dropped tokens and memory per iteration. With no "
        "arguments: the bundled synthetic trace (shaped like SmartMoE's GPT-MoE run; no "
        "recorded data), model smartmoe-gpt, cluster a100-4x8-ib800 with 2 nodes, policy "
        "static_ep. A row of a search ranking pastes in as it is (--trace bundled --cluster "
        "a100-4x8-ib800@2 ...).")
    p.add_argument("--trace", help="trace file (.npz) or directory, or 'bundled' (default: "
                   "the bundled synthetic trace)")
    p.add_argument("--model", default=None,
                   help=f"model preset name or .toml path (default: {DEFAULT_MODEL})")
    p.add_argument("--cluster", default=None,
                   help="cluster preset or .toml path; NAME@NODES or NAME@NODESxGPUS reshapes "
                   f"it (default: {DEFAULT_CLUSTER}, on 2 nodes with the bundled trace)")
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
    p.add_argument("--policy", default=None, help="registered policy name, see `moesim "
                   "policies` (default: static_ep)")
    p.add_argument("--knob", action="append", default=[], metavar="K=V",
                   help="policy knob, repeatable (e.g. --knob capacity_factor=1.0)")
    p.add_argument("--iterations", metavar="A:B", help="trace iterations A..B-1 (A:, :B, or A; "
                   "default: all)")
    p.add_argument("--config", metavar="RUN/config.json",
                   help="repeat a finished run exactly: its trace, model, cluster, policy, "
                   "knobs, iterations and seed (not combinable with those flags)")
    p.add_argument("-o", "--out", "--output", dest="out",
                   help="RunResult directory to write (default: moesim-runs/POLICY-CLUSTER-TIME)")
    p.add_argument("--timeline", default="", metavar="I,J",
                   help="iterations to export as Chrome/Perfetto timelines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out run")
    p.add_argument("--seed", type=int, default=None, help="seed of the policy's RNG (default: 0)")
    add_parallel_argument(p)
    p.add_argument("--allow-oom", action="store_true",
                   help="record plans that do not fit in GPU memory instead of failing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    add_json_flag(p, "the summary and every iteration's row")
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
    from moesim.traces.bundled import bundled_trace_path, named_trace_path

    path = named_trace_path(args.trace)
    if not path.exists():
        raise MoesimError(f"no trace file {args.trace!r}; check the path, or omit --trace "
                          "(or give --trace bundled) to use the bundled trace")
    return path, path == bundled_trace_path()


CONFIG_FLAGS = ("trace", "model", "cluster", "nodes", "gpus_per_node", "world_size", "policy",
                "knob", "iterations", "seed", "parallel")


def _inputs(args: argparse.Namespace) -> dict:
    """simulate's inputs from the flags, or from ``--config`` (a finished run's config)."""
    from moesim import validation
    from moesim.policies.base import make_policy
    from moesim.specs import load_cluster, load_model

    if args.config:
        from moesim.rerun import rerun_inputs

        given = [f"--{f.replace('_', '-')}" for f in CONFIG_FLAGS
                 if getattr(args, f) not in (None, [])]
        if given:
            raise MoesimError(f"--config sets the whole run; drop {', '.join(given)}")
        r = rerun_inputs(args.config)
        return {"trace": r.trace_path, "model": r.model, "cluster": r.cluster,
                "policy": r.policy, "iterations": r.iterations, "rng_seed": r.rng_seed,
                "allow_oom": r.allow_oom or args.allow_oom, "regroup": r.regroup,
                "layout": r.layout}
    trace, bundled = _trace_path(args)
    cluster = shape_cluster(load_cluster(args.cluster or DEFAULT_CLUSTER), args.nodes,
                            args.gpus_per_node, args.world_size,
                            bundled and args.cluster is None)
    return {"trace": trace, "model": load_model(args.model or DEFAULT_MODEL),
            "cluster": cluster, "policy": make_policy(args.policy or "static_ep",
                                                      parse_knobs(args.knob)),
            "iterations": parse_iterations(args.iterations),
            "rng_seed": validation.seed(0 if args.seed is None else args.seed),
            "allow_oom": args.allow_oom,
            "regroup": args.regroup, "layout": parse_layout(args.parallel)}


def run(args: argparse.Namespace) -> int:
    from moesim.simulate import simulate

    inputs = _inputs(args)
    policy, cluster = inputs["policy"], inputs["cluster"]
    out = args.out or f"moesim-runs/{policy.name}-{cluster.name.replace('@', '-')}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    rows = not (args.quiet or args.json)
    summary = simulate(**inputs, out_dir=out, timeline_iterations=parse_timeline(args.timeline),
                       resume=args.resume, progress=sys.stderr.isatty(),
                       on_iteration=_RowPrinter() if rows else None)
    label = policy_label(policy)
    layout = inputs.get("layout")
    if layout is not None and not layout.is_default:  # the run's layout beside its policy
        label += f" [{layout.describe()}]"
    line = summary_line(summary.whole_run(), label, cluster.name)
    if args.json:
        from moesim.clihelp import print_json

        print(line, file=sys.stderr)
        print_json({"summary": summary_figures(summary.whole_run(), policy, cluster.name),
                    "iterations": iteration_rows(summary.out_dir) if summary.out_dir
                    else summary.rows})
    else:
        print(line)
        if summary.stage_table:  # a parallel layout: per-stage memory, the peak named
            print(summary.stage_table)
    return 0


def iteration_rows(run_dir) -> list[dict]:
    """The rows of ``RUN/iterations.csv`` as dicts of numbers (what ``--json`` prints)."""
    from moesim.results import load_run

    columns = load_run(run_dir).summary
    n = len(next(iter(columns.values()), []))
    return [{name: _number(values[i].item()) for name, values in columns.items()}
            for i in range(n)]


def _number(x: float) -> float | int:
    """Counts read back from CSV as floats become ints again (``tokens_total``, ``oom``)."""
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2**53 else x


def policy_label(policy) -> str:
    """The policy's name with the knobs that are not its defaults, and a capacity factor
    whenever there is one (a run that drops tokens says so): ``swiftmoe(capacity_factor=1.0)``."""
    import dataclasses

    from moesim.policies.catalog import format_default

    defaults = type(policy.config)()
    shown = {f.name: getattr(policy.config, f.name) for f in dataclasses.fields(policy.config)
             if getattr(policy.config, f.name) != getattr(defaults, f.name)
             or (f.name == "capacity_factor" and getattr(policy.config, f.name) is not None)}
    if not shown:
        return policy.name
    return f"{policy.name}({', '.join(f'{k}={format_default(v)}' for k, v in shown.items())})"


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


def summary_figures(summary, policy, cluster: str) -> dict:
    """The figures of the summary line, for ``--json``: what ran where, then
    :func:`run_figures`."""
    import dataclasses

    out = {"policy": policy.name, "knobs": dataclasses.asdict(policy.config),
           "cluster": cluster, "iterations": len(summary.rows),
           "out_dir": str(summary.out_dir) if summary.out_dir else None}
    out.update(run_figures(summary))
    return out


def run_figures(summary) -> dict:
    """Means over a run's iterations (seconds, bytes), the dropped fraction, the peak memory,
    and the overload factor and imbalance where the rows have them: one definition for
    ``simulate --json`` and ``run --json`` (``summary`` needs only ``rows``)."""
    if not summary.rows:
        return {}
    total = max(summary.column("tokens_total").sum(), 1)
    step = summary.mean("step_time_s")
    out = {
        "mean_step_time_s": step,
        "moe_fraction": summary.mean("moe_time_s") / step if step > 0 else None,
        "mean_a2a_time_s": summary.mean("a2a_time_s"),
        "mean_straggler_ratio": summary.mean("straggler_ratio"),
        "dropped_fraction": summary.column("tokens_dropped").sum() / total,
        "peak_memory_bytes": summary.column("peak_memory_bytes").max(),
    }
    if "overload_mean" in summary.rows[0]:
        out.update({"mean_overload": summary.mean("overload_mean"),
                    "max_overload": summary.column("overload_max").max(),
                    "max_cum_overload": summary.column("overload_cum_max").max(),
                    "mean_imbalance": summary.mean("imbalance")})
    return {k: (float(v) if v is not None else None) for k, v in out.items()}


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
