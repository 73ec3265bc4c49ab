"""``moesim trace``: import, inspect, synthesize, export, validate, spread and record traces."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError, TraceError
from moesim.traces.bundled import bundled_trace_path
from moesim.traces.format import RoutingTrace
from moesim.traces.importers import (
    export_csv,
    import_csv,
    import_eplb,
    import_sglang,
    import_smartmoe,
)
from moesim.traces.io import load_trace, save_trace
from moesim.traces.load_stats import expert_load_summary, format_expert_load
from moesim.traces.stats import format_table, trace_stats
from moesim.traces.synth import POPULARITY_KINDS, SynthConfig, synth_meta, synthesize
from moesim.traces.transform import spread_over_ranks
from moesim.traces.workload_cli import (
    add_limit_check,
    add_workload_flags,
    limit_check_line,
    synth_workload,
)

IMPORT_HELP = {
    "smartmoe": "SmartMoE/FastMoE folder of table_iter{N}_rank{r}.log files",
    "sglang": "SGLang expert-distribution dump: stat .pt, per_pass .pt (file or folder) or "
              "--init-expert-location .json",
    "eplb": "DeepSeek EPLB weight[layers, experts] as .npy or headerless .csv",
    "csv": "long CSV with header pass,layer,rank,expert,count (moesim trace export writes it)",
    "megatron": "Megatron-Core --moe-routing-trace-path folder of router_trace_rank{r}.jsonl",
    "trtllm": "TensorRT-LLM ExpertStatistic folder (meta_info.json, rank{r}.safetensors)",
    "vllm": "vLLM EPLB state: torch.save file with expert_load_window and "
            "physical_to_logical_map, or JSON load_history",
}
# (flag, SynthConfig field, type, help)
SYNTH_KNOBS = (
    ("--layers", "num_layers", int, "MoE layers"),
    ("--ranks", "num_ranks", int, "source ranks (GPUs)"),
    ("--experts", "num_experts", int, "experts per layer"),
    ("--top-k", "top_k", int, "experts per token"),
    ("--tokens-per-rank", "tokens_per_rank", int, "tokens per rank per micro-batch"),
    ("--micro-batches", "micro_batches_per_iteration", int, "micro-batches per iteration"),
    ("--iterations", "num_iterations", int, "iterations to generate"),
    ("--stride", "iteration_stride", int, "training iterations between recorded ones"),
    ("--popularity", "popularity", str, f"popularity law: {', '.join(POPULARITY_KINDS)}"),
    ("--skew", "popularity_sigma", float, "sigma of log-popularity at full skew (lognormal)"),
    ("--zipf-exponent", "zipf_exponent", float, "Zipf exponent (with --popularity zipf)"),
    ("--skew-start", "skew_start", float, "fraction of full skew at the first iteration"),
    ("--drift-sigma", "drift_sigma", float, "sd of the AR(1) drift of log-popularity"),
    ("--drift-rho", "drift_rho", float, "AR(1) coefficient per iteration"),
    ("--regime-shift-prob", "regime_shift_prob", float, "chance per layer per iteration that "
     "popularity is redrawn"),
    ("--doc-tokens", "doc_tokens", int, "tokens per document (burstiness grain)"),
    ("--doc-sigma", "doc_sigma", float, "log-popularity tilt of one document (burstiness)"),
    ("--rank-sigma", "rank_sigma", float, "persistent per-rank log-popularity tilt"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``moesim trace ...`` to the top-level parser."""
    trace = subparsers.add_parser(
        "trace", help="import, inspect, synthesize, export and validate routing traces",
        description="Routing traces: counts[pass, layer, rank, expert] of token assignments. "
        "Import them from other tools, print their statistics, generate synthetic ones.")
    sub = trace.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    _add_import(sub)
    _add_info(sub)
    _add_synth(sub)
    _add_export(sub)
    _add_validate(sub)
    _add_spread(sub)
    _add_regroup(sub)
    _add_record(sub)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="convert another tool's routing data to a moesim trace",
                       description="Convert routing data recorded by another tool into a "
                       "validated moesim trace (.npz file, or a directory for huge traces).")
    p.add_argument("kind", choices=sorted(IMPORT_HELP), help="; ".join(
        f"{k}: {v}" for k, v in sorted(IMPORT_HELP.items())))
    p.add_argument("src", type=Path, help="file or folder to import")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, required=True,
                   help="where to write the trace (*.npz, or a directory path)")
    p.add_argument("--top-k", type=int, default=2,
                   help="experts each token picks; tokens per rank = row sum / top-k "
                        "(default: 2; megatron and trtllm read it from the files)")
    p.add_argument("--allow-uneven", action="store_true",
                   help="smartmoe: accept rows with different sums as a variable-k trace")
    p.add_argument("--drop-zero-layers", action="store_true",
                   help="sglang: drop all-zero (dense) layers instead of keeping them")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="sglang/csv/vllm: passes per iteration (default: 1)")
    p.add_argument("--include-mtp", action="store_true",
                   help="megatron: add multi-token-prediction routers as extra layers after "
                        "the decoder's (default: excluded)")
    p.add_argument("--experts", type=int, default=None,
                   help="megatron: number of experts (default: largest expert id + 1)")
    p.add_argument("--keep-topk", action="store_true",
                   help="megatron: store the per-token choices too")
    p.add_argument("--stage", default=None,
                   help="megatron: keep only records of this stage (when a folder mixes them)")
    p.add_argument("--naive-dp-size", type=int, default=1,
                   help="vllm: the dump comes from the naive all-to-all with this many "
                        "data-parallel ranks, which counts every token that many times; "
                        "divide the load back (default: 1)")
    p.set_defaults(func=_cmd_import)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a trace's shape and load statistics",
                       description="Per-layer skew (max/mean, Gini), per-GPU imbalance under "
                       "contiguous expert placement, consecutive-pass total variation and "
                       "correlation, rank-to-rank correlation, and their drift over time.")
    p.add_argument("trace", nargs="?", type=Path,
                   help="trace file or directory (default: the bundled demo trace)")
    p.add_argument("--ep-size", type=int, default=None,
                   help="GPUs the experts are spread over for gpu_imb (default: the rank "
                        "count if it divides the experts, else its largest divisor <= ranks)")
    p.add_argument("--iterations", default=None, metavar="A:B",
                   help="only iterations A..B-1, 0-based positions in the trace (Python "
                        "slice; either end may be left out)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_limit_check(p)
    p.set_defaults(func=_cmd_info)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a synthetic trace with realistic statistics",
                       description="Generate a synthetic trace: skewed, drifting, bursty "
                       "popularity, top-k without replacement. Defaults match published "
                       "statistics of real traces; --preset smartmoe matches the SmartMoE-AE "
                       "training trace.")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, required=True,
                   help="trace to write: FILE.npz (drawn in memory), or a directory (drawn and "
                   "written a chunk of passes at a time in bounded memory, for traces larger "
                   "than RAM; the streaming sampler draws other numbers for the same seed, with "
                   "the same statistics)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--preset", choices=("default", "smartmoe"), default="default",
                   help="starting knob values (default: default)")
    for flag, field, kind, text in SYNTH_KNOBS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=text)
    add_workload_flags(p)
    p.set_defaults(func=_cmd_synth)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a trace as CSV pass,layer,rank,expert,count",
                       description="Write every cell of a trace as a long CSV (readable by "
                       "'moesim trace import csv' and by any spreadsheet or dataframe tool).")
    p.add_argument("trace", type=Path, help="trace file or directory")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, required=True,
                   help="CSV file to write")
    p.set_defaults(func=_cmd_export)


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a trace file against the schema",
                       description="Load a trace and check every schema invariant; prints "
                       "'ok' or the first problem (exit code 2).")
    p.add_argument("trace", type=Path, help="trace file or directory")
    p.set_defaults(func=_cmd_validate)


def _add_spread(sub) -> None:
    p = sub.add_parser("spread", help="split a rank-aggregated trace over ranks",
                       description="Deal a rank-aggregated trace's (SGLang stat, EPLB) "
                       "assignments to ranks at random, keeping every total exact.")
    p.add_argument("trace", type=Path, help="rank-aggregated trace")
    p.add_argument("--ranks", type=int, required=True, help="number of ranks")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (default: 0)")
    p.add_argument("-o", "--out", "--output", dest="output", type=Path, required=True,
                   help="trace to write")
    p.set_defaults(func=_cmd_spread)


def _add_regroup(sub) -> None:
    p = sub.add_parser("regroup", help="split or merge a trace's source ranks to N ranks",
                       description="Replay a trace recorded on R ranks on N: merge groups of "
                       "ranks (N divides R), share each rank's tokens out over N/R ranks (R "
                       "divides N), or both via lcm(R, N). Every expert's total per pass and "
                       "layer stays exact; the regrouping is written into the metadata "
                       "(extra.regroup).")
    p.add_argument("trace", type=Path, help="trace file or directory")
    p.add_argument("--ranks", type=int, required=True, help="number of ranks to regroup to")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for dealing counts-only ranks' tokens on a split (default: 0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="trace to write")
    p.set_defaults(func=_cmd_regroup)


def _add_record(sub) -> None:
    """``moesim trace record`` lives in record_cli.py (recorders); wire it in when present."""
    try:
        from moesim.traces.record_cli import add_record_parser
    except ModuleNotFoundError as exc:
        if exc.name != "moesim.traces.record_cli":
            raise
        return
    add_record_parser(sub)


def _cmd_import(args: argparse.Namespace) -> int:
    if args.kind == "smartmoe":
        trace = import_smartmoe(args.src, args.top_k, allow_uneven=args.allow_uneven)
    elif args.kind == "sglang":
        trace = import_sglang(args.src, args.top_k, drop_zero_layers=args.drop_zero_layers,
                              micro_batches=args.micro_batches)
    elif args.kind == "eplb":
        trace = import_eplb(args.src, args.top_k)
    elif args.kind in ENGINE_IMPORTERS:
        trace = ENGINE_IMPORTERS[args.kind](args)
    else:
        trace = import_csv(args.src, args.top_k, micro_batches=args.micro_batches)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {_shape_line(trace)}")
    return 0


def _import_megatron(args: argparse.Namespace) -> RoutingTrace:
    from moesim.traces.import_megatron import import_megatron

    return import_megatron(args.src, include_mtp=args.include_mtp, num_experts=args.experts,
                           keep_topk=args.keep_topk, stage=args.stage)


def _import_trtllm(args: argparse.Namespace) -> RoutingTrace:
    from moesim.traces.import_trtllm import import_trtllm

    return import_trtllm(args.src)


def _import_vllm(args: argparse.Namespace) -> RoutingTrace:
    from moesim.traces.import_vllm import import_vllm

    return import_vllm(args.src, args.top_k, naive_dp_size=args.naive_dp_size,
                       micro_batches=args.micro_batches)


ENGINE_IMPORTERS = {"megatron": _import_megatron, "trtllm": _import_trtllm,
                    "vllm": _import_vllm}


def _cmd_info(args: argparse.Namespace) -> int:
    path = args.trace or bundled_trace_path()
    start, stop = _parse_range(args.iterations) if args.iterations is not None else (None, None)
    trace = load_trace(path, stop_iteration=stop if stop is not None and stop >= 0 else None)
    if args.iterations is not None:
        whole = trace.num_iterations
        trace = trace.select_iterations(start, stop)
        if trace.num_passes == 0:
            raise MoesimError(f"--iterations {args.iterations} selects nothing; the trace has "
                              f"{whole} iterations (positions 0..{whole - 1})")
    stats = trace_stats(trace, args.ep_size)
    load = expert_load_summary(trace)
    limit = limit_check_line(trace, args)
    if args.json:
        out = {"path": str(path), "meta": trace.meta.to_dict(), "num_passes": trace.num_passes,
               "num_iterations": trace.num_iterations, **stats.to_dict(), "expert_load": load}
        if limit:
            out["group_limit"] = limit[1]
        print(json.dumps(out, indent=1))
    else:
        print(format_table(trace, stats) + format_expert_load(load)
              + (f"\n{limit[0]}" if limit else ""))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    changes = {field: getattr(args, field) for _, field, _, _ in SYNTH_KNOBS
               if getattr(args, field) is not None}
    trace = synth_workload(args, changes)
    if trace is not None:
        save_trace(trace, args.output)
        print(f"wrote {args.output}: {_shape_line(trace)} (workload {args.workload})")
        return 0
    try:
        base = SynthConfig.smartmoe_like() if args.preset == "smartmoe" else SynthConfig()
        config = dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise MoesimError(str(exc)) from None
    if args.output.suffix != ".npz" and not config.per_token:
        from moesim.traces.synth_stream import synthesize_to_dir

        synthesize_to_dir(config, args.output, rng=args.seed)
        shape = (config.num_passes, config.num_layers, config.num_ranks, config.num_experts)
        trace = RoutingTrace(np.broadcast_to(np.int64(0), shape), synth_meta(config))
    else:
        trace = synthesize(config, rng=args.seed)
        save_trace(trace, args.output)
    print(f"wrote {args.output}: {_shape_line(trace)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    export_csv(trace, args.output)
    print(f"wrote {args.output}: {trace.counts_TLRE.size} rows")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    print(f"ok: {args.trace}: {_shape_line(trace)}")
    return 0


def _cmd_spread(args: argparse.Namespace) -> int:
    trace = spread_over_ranks(load_trace(args.trace), args.ranks, args.seed)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {_shape_line(trace)}")
    return 0


def _cmd_regroup(args: argparse.Namespace) -> int:
    from moesim.traces.regroup import regroup_ranks

    trace = regroup_ranks(load_trace(args.trace), args.ranks, args.seed)
    save_trace(trace, args.output)
    print(f"wrote {args.output}: {_shape_line(trace)}")
    return 0


def _parse_range(text: str) -> tuple[int | None, int | None]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise TraceError(f"--iterations {text!r} is not A:B (e.g. 0:10, 5:, :20)") from None


def _shape_line(trace: RoutingTrace) -> str:
    m = trace.meta
    return (f"{trace.num_passes} passes ({trace.num_iterations} iterations x "
            f"{m.micro_batches_per_iteration}), {m.num_layers} layers, {m.num_ranks} ranks, "
            f"{m.num_experts} experts, top-{m.top_k}, {m.tokens_per_rank} tokens/rank")
