"""Ranking search results: constraints, the Pareto front, and tables (text, CSV, HTML rows).

A *row* is one finished configuration flattened for tables: its key, policy + knobs, the axes
(trace, model, cluster), status, and the summary numbers. Objectives are minimised:
mean step time, peak memory, dropped fraction, and bytes moved by re-layouts per iteration
(``moved_bytes``; so a ``migration_weight`` sweep keeps the configs that move less on the
front). The ranking sorts by mean step time unless
told another column (``sort_by``: any of :data:`SORTABLE`, e.g. ``overload_mean``), and
``limits`` (``{column: max}``) make the load and traffic metrics constraints too.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from .fileio import atomic_write
from .runs import METRIC_SUMMARY, GiB
from .search_spec import describe

OBJECTIVES = ("mean_step_s", "peak_memory_GiB", "dropped_frac", "moved_bytes")
COLUMNS = ("rank", "key", "config", "trace", "model", "cluster", "status", "mean_step_s",
           "p50_step_s", "p95_step_s", "peak_memory_GiB", "dropped_frac", "a2a_s",
           *METRIC_SUMMARY, "oom", "feasible", "violates", "error")
SORTABLE = ("mean_step_s", "p50_step_s", "p95_step_s", "peak_memory_GiB", "dropped_frac",
            "a2a_s", *METRIC_SUMMARY)


def to_row(record: dict) -> dict:
    """Flatten one ``results.jsonl`` record into a table row."""
    cfg, summ = record.get("config", {}), record.get("summary") or {}
    peak = summ.get("peak_memory_bytes", math.nan)
    return {
        "key": record.get("key", ""), "config": describe(cfg) if cfg else "",
        "trace": cfg.get("trace") or "", "model": cfg.get("model") or "",
        "cluster": cfg.get("cluster") or "", "status": record.get("status", "?"),
        "mean_step_s": _f(summ.get("mean_step_s")), "p50_step_s": _f(summ.get("p50_step_s")),
        "p95_step_s": _f(summ.get("p95_step_s")),
        "peak_memory_GiB": _f(peak) / GiB, "dropped_frac": _f(summ.get("dropped_frac")),
        "a2a_s": _f(summ.get("a2a_s")), "oom": bool(record.get("oom", False)),
        "error": record.get("error", "") or "",
        **{k: _f(summ.get(k)) for k in METRIC_SUMMARY},
    }


def _f(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _violations(row: dict, max_memory_GiB: float | None, max_drop_frac: float | None,
                limits: dict[str, float] | None = None) -> str:
    why = []
    if row["status"] != "ok":
        why.append("oom" if row["oom"] else "error")
    elif not math.isfinite(row["mean_step_s"]):
        why.append("no step time")
    if max_memory_GiB is not None and not row["peak_memory_GiB"] <= max_memory_GiB:
        why.append(f"memory > {max_memory_GiB:g} GiB")
    if max_drop_frac is not None and not _drop(row) <= max_drop_frac:
        why.append(f"drops > {max_drop_frac:g}")
    for name, most in (limits or {}).items():
        if not row[name] <= most:
            why.append(f"{name} > {most:g}")
    return "; ".join(why)


def _drop(row: dict) -> float:
    """Dropped fraction, treating 'not reported' as 0 (dropless runs may omit it)."""
    return 0.0 if math.isnan(row["dropped_frac"]) else row["dropped_frac"]


def check_metric(name: str, flag: str) -> str:
    """``name`` if it is a sortable / limitable column, else a one-line MoesimError."""
    if name not in SORTABLE:
        from moesim.errors import MoesimError

        raise MoesimError(f"{flag} {name!r} is not a ranking column; choose one of "
                          f"{', '.join(SORTABLE)}")
    return name


def rank(records: Iterable[dict], *, max_memory_GiB: float | None = None,
         max_drop_frac: float | None = None, sort_by: str = "mean_step_s",
         limits: dict[str, float] | None = None) -> list[dict]:
    """All rows: feasible ones first by ``sort_by`` (ascending, ties by mean step time;
    ``rank`` 1..n), then the rest. ``limits``: ``{column: max}`` constraints."""
    check_metric(sort_by, "sort_by")
    for name in limits or {}:
        check_metric(name, "limit")
    rows = [to_row(r) for r in records]
    for row in rows:
        row["violates"] = _violations(row, max_memory_GiB, max_drop_frac, limits)
        row["feasible"] = not row["violates"]
    feasible = sorted((r for r in rows if r["feasible"]),
                      key=lambda r: (_nan_last(r[sort_by]), r["mean_step_s"], r["key"]))
    for i, row in enumerate(feasible, 1):
        row["rank"] = i
    rest = sorted((r for r in rows if not r["feasible"]),
                  key=lambda r: (r["status"] != "ok", _nan_last(r["mean_step_s"]), r["key"]))
    for row in rest:
        row["rank"] = ""
    return feasible + rest


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _objectives(row: dict) -> tuple[float, ...]:
    moved = row.get("moved_bytes", 0.0)       # not reported: nothing moved
    return (_nan_last(row["mean_step_s"]), _nan_last(row["peak_memory_GiB"]), _drop(row),
            0.0 if moved is None or math.isnan(moved) else moved)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (minimising)."""
    pairs = list(zip(a, b, strict=True))
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(rows: Iterable[dict]) -> list[dict]:
    """Feasible rows no other feasible row dominates, by mean step time."""
    cand = [r for r in rows if r.get("feasible", True) and r.get("status", "ok") == "ok"]
    objs = [_objectives(r) for r in cand]
    front = [r for r, o in zip(cand, objs, strict=True) if not any(dominates(p, o) for p in objs)]
    return sorted(front, key=lambda r: (_objectives(r), r["key"]))


def csv_bytes(rows: Sequence[dict]) -> bytes:
    """Rows as CSV (``COLUMNS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return buf.getvalue().encode()


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write rows to ``path`` atomically (mode ``0666 & ~umask``)."""
    return atomic_write(path, csv_bytes(rows))


TABLE = (("rank", "#", "{}"), ("config", "config", "{}"), ("mean_step_s", "mean ms", "ms"),
         ("p95_step_s", "p95 ms", "ms"), ("peak_memory_GiB", "peak GiB", "{:.2f}"),
         ("dropped_frac", "drop %", "pct"), ("a2a_s", "a2a ms", "ms"),
         ("overload_mean", "overload", "{:.2f}"), ("overload_cum_max", "cum ovl", "{:.2f}"),
         ("imbalance", "imbal", "{:.2f}"), ("moved_bytes", "moved MiB/it", "mib"),
         ("violates", "note", "{}"))


def fmt(value, how: str) -> str:
    """Format one cell: ``ms`` (seconds → ms), ``pct`` (fraction → %), or a format string."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if how == "ms":
        return f"{value * 1e3:.3f}"
    if how == "pct":
        return f"{value * 100:.2f}"
    if how == "mib":
        return f"{value / 2**20:.1f}"
    return how.format(value)


def table_cells(rows: Sequence[dict], context: Sequence[dict] | None = None
                ) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the summary table; trace / model / cluster columns appear
    only for the axes whose value differs between the ``context`` rows (default: ``rows``)."""
    head = [h for _, h, _ in TABLE]
    cells = [[fmt(row.get(k, ""), how) for k, _, how in TABLE] for row in rows]
    if all(not row.get("violates") for row in rows):  # nothing to note: drop the column
        head.pop()
        for line in cells:
            line.pop()
    context = rows if context is None else context
    varying = [a for a in ("trace", "model", "cluster") if len({r.get(a) for r in context}) > 1]
    for pos, axis in enumerate(varying, start=2):
        head.insert(pos, axis)
        for row, line in zip(rows, cells, strict=True):
            line.insert(pos, _short(str(row.get(axis) or "-")))
    return head, cells


def _short(text: str) -> str:
    """A path's file name (trace paths are long); other names as they are."""
    return Path(text).name if "/" in text else text


def text_table(rows: Sequence[dict], title: str, limit: int = 20,
               context: Sequence[dict] | None = None) -> str:
    """A fixed-width text table of the first ``limit`` rows (``context``: see table_cells)."""
    head, cells = table_cells(rows[:limit], context if context is not None else rows)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more (see the CSV)")
    return "\n".join(lines)
