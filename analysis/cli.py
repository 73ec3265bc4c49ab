"""``moesim search`` / ``moesim plot`` / ``moesim report``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moesim.errors import MoesimError

FORMATS = (".png", ".pdf")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the analysis commands to the ``moesim`` parser."""
    _register_search(sub)
    _register_plot(sub)
    _register_report(sub)


# Rankings leave out configurations that drop more than this fraction of token assignments
# unless told otherwise: a configuration that is fast because it skips 60 % of the expert work
# is not a placement choice. 5 % is what a capacity factor of about 1.25 drops on skewed traces.
DEFAULT_MAX_DROP_FRAC = 0.05


def _drop_bound(text: str) -> float | None:
    """``--max-drop-frac``: a fraction, or ``none`` for no bound."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction 0..1 or 'none'") from None


def _constraints(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory-GiB", type=float, dest="max_memory_GiB", metavar="GIB",
                   help="rank only configs whose peak GPU memory is at most this")
    p.add_argument("--max-drop-frac", type=_drop_bound, dest="max_drop_frac", metavar="FRAC",
                   default=DEFAULT_MAX_DROP_FRAC,
                   help="rank only configs that drop at most this fraction of token "
                   "assignments (0..1; 'none' for no bound); the configs over it are listed "
                   f"after the ranking, marked (default: {DEFAULT_MAX_DROP_FRAC})")


def _rank_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sort-by", default="mean_step_s", metavar="COLUMN",
                   help="rank by this column, ascending (default mean_step_s; also e.g. "
                   "overload_mean, overload_cum_max, imbalance, intra_node_imbalance, "
                   "hottest_link_bytes, expert_balance_p95)")
    p.add_argument("--max-metric", action="append", default=[], metavar="COLUMN=MAX",
                   help="rank only configs whose COLUMN is at most MAX (repeatable), e.g. "
                   "--max-metric overload_max=2")


def _limits(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise MoesimError(f"--max-metric {item!r} is not COLUMN=MAX; e.g. "
                              "--max-metric overload_max=2")
    return out


def _register_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="offline search over policies × knobs × clusters × traces × models",
        description="Simulate every configuration of a search spec (TOML grid, or a .py file "
        "with configs()) on a local process pool; append each result to DIR/results.jsonl, "
        "then print and write the ranking (ranking.csv) and the Pareto front (pareto.csv). "
        "Without SPEC, runs the bundled example analysis/examples/search_smartmoe.toml.")
    p.add_argument("spec", nargs="?", help="search spec (.toml or .py); default: the example")
    p.add_argument("-o", "--out", "--output", dest="out", default="runs/search",
                   help="output directory "
                   "(default: runs/search)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"worker processes (default: os.cpu_count() = {os.cpu_count()})")
    p.add_argument("--resume", action="store_true",
                   help="continue a search in DIR, skipping configs already recorded")
    p.add_argument("--limit", type=int, default=None, help="run at most this many new configs")
    p.add_argument("--save-runs", action="store_true",
                   help="also write each config's RunResult to DIR/runs/<key> (for plots)")
    p.add_argument("--top", type=int, default=20, help="rows to print per table (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    from moesim.clihelp import add_json_flag

    add_json_flag(p, "the ranking, the configs over a bound and the Pareto front")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run the configs as tasks on a Ray cluster: auto (default: the one "
                   "`ray start` joined), HOST:6379, ray://HOST:10001, or local (a private "
                   "one); needs pip install 'moesim[ray]'")
    _constraints(p)
    _rank_options(p)
    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from .search import print_outcome, run_search

    if args.workers is not None and args.workers < 1:
        raise MoesimError("--workers must be at least 1")
    _check_search_flags(args)
    outcome = run_search(args.spec, args.out, workers=args.workers, resume=args.resume,
                         max_memory_GiB=args.max_memory_GiB, max_drop_frac=args.max_drop_frac,
                         limit=args.limit, save_runs=args.save_runs,
                         progress=not args.no_progress, sort_by=args.sort_by,
                         limits=_limits(args.max_metric), ray=args.ray)
    if args.json:
        from moesim.clihelp import print_json

        print_outcome(outcome, sys.stderr, limit=args.top, max_drop_frac=args.max_drop_frac)
        print_json(search_json(outcome, args))
    else:
        print_outcome(outcome, limit=args.top, max_drop_frac=args.max_drop_frac)
    failed = [r for r in outcome.records if r["status"] == "error"]
    if failed:
        print(f"moesim: error: {len(failed)} of {len(outcome.records)} configuration(s) "
              f"failed (listed above, and in {outcome.files.get('results', args.out)})",
              file=sys.stderr)
        return 1
    return 0


def _check_search_flags(args: argparse.Namespace) -> None:
    """The search's own flags, by the shared rules of :mod:`moesim.validation`."""
    from moesim import validation

    validation.optional(validation.non_negative_int, args.limit, "--limit")
    validation.positive_int(args.top, "--top")
    _check_constraints(args)


def _check_constraints(args: argparse.Namespace) -> None:
    from moesim import validation

    validation.optional(lambda v, f: validation.number(v, f, minimum=0.0, strict_minimum=True),
                        args.max_memory_GiB, "--max-memory-GiB")
    validation.optional(validation.fraction, args.max_drop_frac, "--max-drop-frac")


def search_json(outcome, args: argparse.Namespace) -> dict:
    """``search --json``: the bounds, status counts, the ranking, the configs over a bound and
    the Pareto front (rows as in ranking.csv; schema in docs/cli.md)."""
    def row(r: dict) -> dict:
        return {**r, "rank": r["rank"] or None}

    counts: dict[str, int] = {}
    for rec in outcome.records:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    return {"out_dir": str(args.out), "max_drop_frac": args.max_drop_frac,
            "max_memory_GiB": args.max_memory_GiB, "sort_by": outcome.sort_by,
            "counts": counts,
            "ranking": [row(r) for r in outcome.rows if r["feasible"]],
            "over_bound": [row(r) for r in outcome.rows
                           if not r["feasible"] and r["status"] == "ok"],
            "failed": [row(r) for r in outcome.rows if r["status"] != "ok"],
            "pareto": [row(r) for r in outcome.front]}


def _register_plot(sub: argparse._SubParsersAction) -> None:
    from .figures import KINDS

    kinds = "\n".join(f"  {k:13s} {v[2]}" for k, v in KINDS.items())
    p = sub.add_parser(
        "plot", help="draw figures from run directories",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw a figure from RunResult directories (PNG or PDF by the output's "
        f"suffix). Kinds:\n{kinds}\n  all           every figure the runs support, into -o DIR")
    p.add_argument("kind", choices=[*KINDS, "all"], metavar="KIND", help="figure kind, or all")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("-o", "--out", "--output", dest="out", required=True,
                   help="output file (.png/.pdf); a directory for `plot all`")
    p.add_argument("--baseline", help="speedup: the run to compare against (default: the "
                   "static_ep run)")
    p.add_argument("--layers", help="load_heatmap: comma-separated layers (default: up to 4)")
    p.add_argument("--layer", type=int, help="rank_load: one layer (default: all layers)")
    p.add_argument("--iteration", type=int, help="timeline: which iteration (default: the "
                   "first recorded timeline)")
    p.add_argument("--ranks", help="timeline: comma-separated ranks (default: the first 8)")
    p.add_argument("--format", choices=[f[1:] for f in FORMATS], default="png",
                   help="plot all: file format (default png)")
    p.set_defaults(func=_run_plot)


def _kind_options(args: argparse.Namespace) -> dict:
    if args.kind == "speedup":
        return {"baseline": args.baseline}
    if args.kind == "load_heatmap":
        return {"layers": _int_list("--layers", args.layers)}
    if args.kind == "rank_load":
        return {"layer": args.layer}
    if args.kind == "timeline":
        return {"iteration": args.iteration, "ranks": _int_list("--ranks", args.ranks)}
    return {}


def _int_list(flag: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise MoesimError(f"{flag} {text!r}: give integers like 0,3,7") from None


def _run_plot(args: argparse.Namespace) -> int:
    from .figures import plot_all, plot_kind

    if args.kind == "all":
        if Path(args.out).suffix.lower() in FORMATS:
            raise MoesimError("`moesim plot all` writes several files: -o must be a directory")
        written, skipped = plot_all(args.runs, args.out, fmt=args.format,
                                    baseline=args.baseline)
        for reason in skipped:
            print(f"moesim: skipped {reason}", file=sys.stderr)
    else:
        written = plot_kind(args.kind, args.runs, args.out, **_kind_options(args))
    for path in written:
        print(path)
    return 0


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML page of searches, validations or runs",
        description="Write one HTML file (figures embedded, no external assets) with the tables "
        "and figures of search directories, run directories, or simulator + executor pairs.")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_SEARCH_DIR")
    p.add_argument("-o", "--out", "--output", dest="out", default="report.html",
                   help="output HTML (default "
                   "report.html)")
    _constraints(p)
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    _check_constraints(args)
    print(build_report(args.inputs, args.out, max_memory_GiB=args.max_memory_GiB,
                       max_drop_frac=args.max_drop_frac))
    return 0
