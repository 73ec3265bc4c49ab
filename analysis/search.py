"""Offline policy search: run every configuration of a spec on a local process pool (or as
tasks on a Ray cluster: :mod:`moesim.analysis.search_ray`).

Each finished configuration appends one JSON line to ``DIR/results.jsonl`` (one ``write`` of a
whole line, then flush + fsync), so a killed search loses at most the configurations that were
still running; ``--resume`` skips the keys already present and ignores a torn last line. A
configuration that fails (out of memory, a bad knob) is recorded with its error and the search
goes on. At the end the results are ranked under the memory / drop constraints and the Pareto
front over (step time, peak memory, dropped tokens, bytes moved) is written: ``ranking.csv``,
``pareto.csv``. Per-iteration arrays are not written unless asked (``save_runs``: each
configuration's RunResult then lands in ``DIR/runs/<key>``, for figures and reports).

A record in ``results.jsonl``::

    {"key": "swiftmoe-0123456789ab", "config": {...}, "status": "ok" | "oom" | "error",
     "oom": false, "error": "", "elapsed_s": 1.2,
     "summary": {"mean_step_s", "p50_step_s", "p95_step_s", "peak_memory_bytes",
                 "dropped_frac", "a2a_s", "iterations", "status",
                 "overload_mean", "overload_max", "overload_cum_max", "imbalance", ...}}

(the load and traffic metrics: ``moesim.analysis.runs.METRIC_SUMMARY``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from moesim.dirlock import DirLock
from moesim.errors import MoesimError, OutOfMemoryError
from moesim.supervise import die_with_parent

from . import ranking
from .progress import Progress
from .search_check import check_configs
from .search_spec import config_key, describe, load_spec

RESULTS = "results.jsonl"
Evaluator = Callable[[dict, "Path | None"], dict]


def simulate_config(config: dict, run_dir: Path | None) -> dict:
    """Simulate one configuration (into ``run_dir`` when given) and summarise it: the default
    evaluator."""
    from .simulate_adapter import simulate_summary

    return simulate_summary(config, run_dir)


_SIMULATOR = simulate_config


def run_one(evaluate: Evaluator, config: dict, run_dir: Path | None) -> dict:
    """Evaluate one config; never raises for the config's own failures (they are recorded)."""
    t0 = time.perf_counter()
    record = {"key": config_key(config), "config": config, "status": "ok", "oom": False,
              "error": "", "summary": {}}
    try:
        record["summary"] = evaluate(config, run_dir)
        if record["summary"].get("oom"):
            record.update(status="oom", oom=True)
    except OutOfMemoryError as exc:
        record.update(status="oom", oom=True, error=str(exc))
    except Exception as exc:  # a failing config must not stop the search
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    record["elapsed_s"] = round(time.perf_counter() - t0, 4)
    return record


# -- results.jsonl ---------------------------------------------------------------------------


def read_results(path: Path) -> dict[str, dict]:
    """``{key: record}`` from a results file; a torn (unterminated or garbled) line is skipped."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out[rec["key"]] = rec
    return out


def _repair_tail(path: Path) -> None:
    """Cut an unterminated last line (a write killed mid-way) so appends start on a new line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())


def append_record(fh, record: dict) -> None:
    """Append one record as a single line: one write, flush, fsync."""
    fh.write((json.dumps(record, sort_keys=True, default=str) + "\n").encode())
    fh.flush()
    os.fsync(fh.fileno())


# -- the search -------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """What a search produced: every record, the ranked rows, the Pareto front, the files."""

    records: list[dict]
    rows: list[dict]
    front: list[dict]
    files: dict[str, Path]
    sort_by: str = "mean_step_s"


def run_search(spec: str | Path | None, out_dir: str | Path, *, workers: int | None = None,
               resume: bool = False, max_memory_GiB: float | None = None,
               max_drop_frac: float | None = None, limit: int | None = None,
               save_runs: bool = False, evaluate: Evaluator | None = None,
               progress: bool = True, sort_by: str = "mean_step_s",
               limits: dict[str, float] | None = None, ray: str | None = None) -> SearchOutcome:
    """Run (or resume) a search; ``limit`` caps how many new configs this call runs.

    ``evaluate(config, run_dir) -> summary`` defaults to :func:`simulate_config`;
    ``sort_by`` / ``limits``: see :func:`moesim.analysis.ranking.rank`. ``ray``: run the
    configs as tasks on the Ray cluster at that address instead of the local pool
    (:mod:`moesim.analysis.search_ray`; ``workers`` is then ignored).
    """
    ranking.check_metric(sort_by, "--sort-by")
    for name in limits or {}:
        ranking.check_metric(name, "--max-metric")
    configs = load_spec(spec)
    evaluate = evaluate or simulate_config
    if evaluate is _SIMULATOR:  # the simulator builds these names: check them all first
        check_configs(configs, spec or "the example spec")
    out = Path(out_dir)
    with DirLock(out, "search directory"):
        return _search_locked(configs, out, evaluate, workers=workers, resume=resume,
                              limit=limit, save_runs=save_runs, progress=progress, ray=ray,
                              max_memory_GiB=max_memory_GiB, max_drop_frac=max_drop_frac,
                              sort_by=sort_by, limits=limits)


def _search_locked(configs: list[dict], out: Path, evaluate: Evaluator, *, workers, resume,
                   limit, save_runs, progress, ray=None, **constraints) -> SearchOutcome:
    """The body of :func:`run_search`, run while this process owns ``out``."""
    results = out / RESULTS
    if results.is_file() and results.stat().st_size and not resume:
        raise MoesimError(f"{out} already holds search results; pass --resume to continue "
                          "that search, or choose a new -o")
    _repair_tail(results)
    done = read_results(results)
    todo = [c for c in configs if config_key(c) not in done]
    todo = todo[:limit] if limit is not None else todo
    bar = Progress(len(todo), "configs", enabled=progress)
    with open(results, "ab") as fh:
        runs_dir = out / "runs" if save_runs else None
        for rec in _execute(todo, runs_dir, workers, evaluate, ray):
            append_record(fh, rec)
            done[rec["key"]] = rec
            bar.update(failed=rec["status"] != "ok")
    bar.close()
    keys = {config_key(c) for c in configs}
    records = [r for k, r in done.items() if k in keys]
    return finish_search(records, out, **constraints)


def _execute(todo: Sequence[dict], runs_dir: Path | None, workers: int | None,
             evaluate: Evaluator, ray: str | None = None):
    """Yield records as configs finish (in-process when ``workers == 1``; on Ray with
    ``ray``)."""
    if ray is not None:
        from .search_ray import execute_ray

        yield from execute_ray(todo, runs_dir, evaluate, ray)
        return
    workers = max(1, workers or os.cpu_count() or 1)

    def where(cfg: dict) -> Path | None:
        return runs_dir / config_key(cfg) if runs_dir is not None else None

    if workers == 1 or len(todo) <= 1:
        for cfg in todo:
            yield run_one(evaluate, cfg, where(cfg))
        return
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        pending: set[Future] = {pool.submit(run_one, evaluate, cfg, where(cfg)) for cfg in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield _result(fut)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(fut: Future) -> dict:
    try:
        return fut.result()
    except Exception as exc:  # the worker itself died (e.g. killed by the OS)
        raise MoesimError(f"a search worker died ({type(exc).__name__}: {exc}); finished "
                          "results were kept, re-run with --resume") from None


def finish_search(records: list[dict], out: Path, *, max_memory_GiB: float | None = None,
                  max_drop_frac: float | None = None, sort_by: str = "mean_step_s",
                  limits: dict[str, float] | None = None) -> SearchOutcome:
    """Rank, compute the Pareto front, and write ``ranking.csv`` / ``pareto.csv``."""
    rows = ranking.rank(records, max_memory_GiB=max_memory_GiB, max_drop_frac=max_drop_frac,
                        sort_by=sort_by, limits=limits)
    front = ranking.pareto_front(rows)
    files = {"results": out / RESULTS,
             "ranking": ranking.write_csv(out / "ranking.csv", rows),
             "pareto": ranking.write_csv(out / "pareto.csv", front)}
    return SearchOutcome(records, rows, front, files, sort_by)


def load_search(out_dir: str | Path, *, max_memory_GiB: float | None = None,
                max_drop_frac: float | None = None, sort_by: str = "mean_step_s",
                limits: dict[str, float] | None = None) -> SearchOutcome:
    """Re-rank an existing search directory without running anything (nothing is written)."""
    out = Path(out_dir)
    if not (out / RESULTS).is_file():
        raise MoesimError(f"{out} is not a search directory (no {RESULTS}); run "
                          "`moesim search SPEC -o DIR` first")
    records = list(read_results(out / RESULTS).values())
    rows = ranking.rank(records, max_memory_GiB=max_memory_GiB, max_drop_frac=max_drop_frac,
                        sort_by=sort_by, limits=limits)
    return SearchOutcome(records, rows, ranking.pareto_front(rows), {}, sort_by)


def print_outcome(outcome: SearchOutcome, stream=None, limit: int = 20,
                  max_drop_frac: float | None = None) -> None:
    """Print the ranking and the Pareto front as tables, and the failed configs. With
    ``max_drop_frac`` the title states the drop bound, and the finished configs that break a
    bound follow the ranking, unranked, each with the bound it breaks."""
    stream = stream or sys.stdout
    feasible = [r for r in outcome.rows if r["feasible"]]
    by = outcome.sort_by.replace("_", " ") if outcome.sort_by != "mean_step_s" \
        else "mean step time"
    bound = ("no drop bound" if max_drop_frac is None else
             f"drop bound {max_drop_frac * 100:g}% of token assignments, --max-drop-frac")
    print(ranking.text_table(feasible, f"Ranking by {by} ({bound}; {len(feasible)} of "
                             f"{len(outcome.rows)} configs meet the constraints)", limit,
                             outcome.rows), file=stream)
    over = [r for r in outcome.rows if not r["feasible"] and r["status"] == "ok"]
    if over:
        print(file=stream)
        print(ranking.text_table(over, f"Over a bound, not ranked ({len(over)} configs; "
                                 "the note says which)", limit, outcome.rows), file=stream)
    print(file=stream)
    print(ranking.text_table(outcome.front, "Pareto front over (step time, peak memory, "
                             "dropped tokens, bytes moved)", limit, outcome.rows), file=stream)
    failed = [r for r in outcome.records if r["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} config(s) failed:", file=stream)
        for rec in failed[:limit]:
            where = " / ".join(str(rec["config"].get(k)) for k in ("trace", "model", "cluster")
                               if rec["config"].get(k) is not None)
            print(f"  {describe(rec['config'])} [{where or 'defaults'}]: {rec['status']}: "
                  f"{rec['error']}", file=stream)
    for name, path in outcome.files.items():
        print(f"{name}: {path}", file=stream)
