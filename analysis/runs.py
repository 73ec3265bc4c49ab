"""Reading RunResults for analysis: loading, labels, summaries, and pairing backends.

``analysis`` reads run directories only (``moesim.results``); this module is the one place that
turns paths into :class:`~moesim.results.RunResult` objects and derives the per-run numbers the
figures, the report and the search share.

Shape legend: ``I`` iterations, ``L`` MoE layers, ``F`` phases, ``R`` ranks, ``E`` experts,
``C`` memory components.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moesim import traffic_io
from moesim.errors import MoesimError
from moesim.results import RunResult, load_run

RunLike = RunResult | str | os.PathLike
GiB = float(2**30)


def as_run(run: RunLike) -> RunResult:
    """A :class:`RunResult` from a run or a run directory path (MoesimError if not a run).

    A run killed before it consolidated its files (status ``running``, only ``parts/``) is read
    from its finished parts, so it can still be plotted (marked incomplete).
    """
    if isinstance(run, RunResult):
        return run
    path = Path(run)
    if not path.is_dir():
        raise MoesimError(f"{path} is not a moesim run directory (no such directory); point at "
                          "a directory written by `moesim simulate` or `moesim run`")
    result = load_run(path)
    if not result.complete and not result.summary:
        _load_parts(result)
    return result


def _load_parts(run: RunResult) -> None:
    """Fill a run's summary and arrays from ``parts/part-*.npz`` (the writer's chunks)."""
    parts = sorted((run.path / "parts").glob("part-*.npz"))
    loaded = []
    for part in parts:
        try:
            with np.load(part, allow_pickle=False) as z:
                loaded.append(traffic_io.upgrade_part({k: z[k] for k in z.files}))
        except (OSError, ValueError):
            continue  # a part being written when the run was killed
    if not loaded:
        return
    rows = [row for z in loaded for row in json.loads(bytes(z["summary_json"]).decode())]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    run.summary.update({k: np.array([_float(row.get(k)) for row in rows]) for k in keys})
    for key in loaded[0]:
        if key not in ("summary_json", "state_json", "components"):
            run.arrays[key] = np.concatenate([z[key] for z in loaded])
    run.arrays["components"] = loaded[0]["components"]


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def as_runs(runs: RunLike | Iterable[RunLike]) -> list[RunResult]:
    """A list of :class:`RunResult` from one or many runs / paths; at least one."""
    if isinstance(runs, (RunResult, str, os.PathLike)):
        runs = [runs]
    out = [as_run(r) for r in runs]
    if not out:
        raise MoesimError("no runs given; pass one or more run directories")
    return out


def policy_name(run: RunResult) -> str:
    """The policy a run used (``config.policy.name`` or ``config.policy``), or ``?``."""
    pol = run.config.get("policy", "?")
    if isinstance(pol, dict):
        return str(pol.get("name", "?"))
    return str(pol)


def policy_knobs(run: RunResult) -> dict:
    """The knobs a run's policy was configured with (empty when not recorded)."""
    pol = run.config.get("policy")
    if isinstance(pol, dict):
        knobs = pol.get("knobs", pol.get("config", {}))
        return dict(knobs) if isinstance(knobs, dict) else {}
    return dict(run.config.get("knobs", {}) or {})


def layout_text(run: RunResult) -> str:
    """The run's parallel layout as ``key=value`` fields that differ from the default
    (``default`` for a run without ``--parallel``); read from ``config.json``."""
    par = run.config.get("parallel") if isinstance(run.config, dict) else None
    if not isinstance(par, dict):
        return "default"
    from moesim.errors import MoesimError
    from moesim.layout import ParallelLayout, layout_from_dict

    fields = {f: par[f] for f in ParallelLayout.__dataclass_fields__ if f in par}
    try:
        return layout_from_dict(fields).describe()
    except (MoesimError, TypeError):  # a damaged or older config: show what it says
        return ",".join(f"{k}={v}" for k, v in sorted(fields.items()))


def run_label(run: RunResult) -> str:
    """A short legend label: the run's ``display_name`` if set (e.g. by a search report), else
    its directory's name, else its policy."""
    label = getattr(run, "display_name", None) or run.path.name or policy_name(run)
    if not run.complete:
        label += " (incomplete)"
    return label


def labels(runs: Sequence[RunResult]) -> list[str]:
    """Legend labels for several runs, made unique."""
    out: list[str] = []
    for run in runs:
        base = run_label(run)
        label, n = base, 2
        while label in out:
            label, n = f"{base} #{n}", n + 1
        out.append(label)
    return out


def _name(value) -> str:
    """A spec's display name: ``name`` of a dict, a trace's file name, or the string."""
    if isinstance(value, dict):
        value = value.get("name") or value.get("path") or ""
    return Path(str(value)).name if value else ""


def _trace_name(value) -> str:
    """A trace's file name, marked ``(synthetic)`` when ``moesim trace synth`` drew it."""
    name = _name(value)
    meta = value.get("meta") if isinstance(value, dict) else None
    extra = meta.get("extra") if isinstance(meta, dict) else None
    return f"{name} (synthetic)" if name and isinstance(extra, dict) \
        and "synth_config" in extra else name


def setting(runs: Sequence[RunResult]) -> str:
    """``model X · cluster Y · trace Z`` for what all runs share (blank parts left out)."""
    parts = []
    for key in ("model", "cluster", "trace"):
        names = {(_trace_name if key == "trace" else _name)(r.config.get(key)) for r in runs}
        if len(names) == 1 and (name := names.pop()):
            parts.append(f"{key} {name}")
    return " · ".join(parts)


def titled(title: str, runs: Sequence[RunResult]) -> str:
    """A figure title with the runs' shared setting on a second line."""
    where = setting(runs)
    return f"{title}\n{where}" if where else title


def incomplete_note(runs: Sequence[RunResult]) -> str:
    """A one-line note naming every run whose manifest status is not ``complete`` ('' if none)."""
    bad = [f"{r.path.name} ({r.manifest.get('status', '?')}, "
           f"{len(r.manifest.get('iterations', []))} iterations)" for r in runs if not r.complete]
    return ("INCOMPLETE: " + "; ".join(bad)) if bad else ""


def column(run: RunResult, name: str) -> np.ndarray:
    """One summary column (``iterations.csv``) as floats; empty when the run has none."""
    return np.asarray(run.summary.get(name, np.zeros(0)), dtype=float)


def iterations(run: RunResult) -> np.ndarray:
    """Iteration numbers of the summary rows (falls back to 0..n-1)."""
    its = column(run, "iteration")
    if its.size:
        return its
    return np.arange(column(run, "step_time_s").size, dtype=float)


def require(run: RunResult, *names: str) -> None:
    """Raise MoesimError unless the run holds all array ``names`` (e.g. ``expert_load``)."""
    missing = [n for n in names if not run.has(n)]
    if missing:
        status = run.manifest.get("status", "?")
        raise MoesimError(f"{run.path}: run has no {', '.join(missing)} (status {status}); "
                          "finish or resume the run so its arrays are consolidated")


def peak_memory_bytes(run: RunResult) -> float:
    """Peak per-GPU memory over iterations and ranks (summary column, else memory.npz)."""
    col = column(run, "peak_memory_bytes")
    if col.size and np.isfinite(col).any():
        return float(np.nanmax(col))
    if "memory_bytes" in run.arrays and run["memory_bytes"].size:
        return float(run["memory_bytes"].sum(axis=1).max())
    return float("nan")


def drop_fraction(run: RunResult) -> float:
    """Dropped tokens / routed tokens over the whole run (NaN when unknown)."""
    dropped, total = column(run, "tokens_dropped"), column(run, "tokens_total")
    if dropped.size and total.size and np.nansum(total) > 0:
        return float(np.nansum(dropped) / np.nansum(total))
    if "dropped" in run.arrays and "expert_load" in run.arrays:
        tot = run["expert_load"].sum()
        return float(run["dropped"].sum() / tot) if tot else float("nan")
    return float("nan")


def summarize(run: RunResult) -> dict:
    """The numbers a search ranks by and a report tabulates, for one run."""
    out = summarize_columns(run.summary)
    out.update(status=run.manifest.get("status", "?"), error=run.manifest.get("error", ""),
               peak_memory_bytes=peak_memory_bytes(run), dropped_frac=drop_fraction(run))
    return out


# run-level load and traffic metrics (moesim.metrics columns): name -> (column, reduction)
METRIC_SUMMARY = {
    "overload_mean": ("overload_mean", np.mean), "overload_max": ("overload_max", np.max),
    "overload_cum_max": ("overload_cum_max", np.max), "imbalance": ("imbalance", np.mean),
    "node_imbalance": ("node_imbalance", np.mean),
    "intra_node_imbalance": ("intra_node_imbalance", np.mean),
    "hottest_link_bytes": ("hottest_link_bytes", np.max),
    "inter_node_bytes": ("inter_node_bytes", np.mean),
    "expert_balance_p50": ("expert_balance_p50", np.mean),
    "expert_balance_p95": ("expert_balance_p95", np.mean),
    "moved_bytes": ("relayout_bytes", np.mean),     # re-layout bytes per iteration
}


def summarize_columns(columns: dict[str, np.ndarray]) -> dict:
    """Mean / p50 / p95 step time, peak memory, dropped fraction, a2a time and OOM flag from
    per-iteration summary columns (``iterations.csv`` or simulate's rows), and the run-level
    load and traffic metrics of :data:`METRIC_SUMMARY` (means over iterations, or the max
    for maxima; NaN for runs without them)."""

    def col(name: str) -> np.ndarray:
        arr = np.asarray(columns.get(name, np.zeros(0)), dtype=float)
        return arr[np.isfinite(arr)]

    def stat(fn, arr: np.ndarray) -> float:
        return float(fn(arr)) if arr.size else float("nan")

    step, dropped, total = col("step_time_s"), col("tokens_dropped"), col("tokens_total")
    return {
        "status": "complete", "iterations": int(step.size),
        "mean_step_s": stat(np.mean, step), "p50_step_s": stat(np.median, step),
        "p95_step_s": stat(lambda a: np.percentile(a, 95), step),
        "peak_memory_bytes": stat(np.max, col("peak_memory_bytes")),
        "dropped_frac": float(dropped.sum() / total.sum()) if total.sum() > 0 else float("nan"),
        "a2a_s": stat(np.mean, col("a2a_time_s")),
        "oom": bool(stat(np.max, col("oom")) > 0),
        "error": "",
        **{name: stat(fn, col(column)) for name, (column, fn) in METRIC_SUMMARY.items()},
    }


def comparable_config(run: RunResult) -> dict:
    """A run's config without backend-specific and bookkeeping keys, for pairing runs."""
    skip = {"backend", "started_at", "argv", "out_dir", "profile", "hardware", "executor",
            "simulator", "world", "launcher", "progress", "timeline_iterations", "resume"}
    return {k: v for k, v in run.config.items() if k not in skip}


def pair_runs(runs: Sequence[RunResult]) -> list[tuple[RunResult, RunResult]]:
    """(predicted, measured) pairs: a simulator run and an executor run with the same config.

    When configs never match exactly but there is exactly one run of each backend, that pair is
    returned (the user passed them together on purpose).
    """
    sims = [r for r in runs if r.backend == "simulator"]
    execs = [r for r in runs if r.backend == "executor"]
    pairs = []
    for s in sims:
        for e in execs:
            if comparable_config(s) == comparable_config(e):
                pairs.append((s, e))
    if not pairs and len(sims) == 1 and len(execs) == 1:
        pairs.append((sims[0], execs[0]))
    return pairs
