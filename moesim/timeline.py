"""Chrome-trace / Perfetto JSON of one simulated iteration.

Each rank is a process (``pid`` = rank), each stream a thread (``tid`` = stream index, named
``compute`` / ``comm`` / ``prefetch`` / ``host``). Every op a rank runs is a complete event
(``"ph": "X"``) named by its phase (with direction and layer in ``args``); ``ts`` and ``dur``
are microseconds from the iteration's start. Metadata events (``"ph": "M"``) name processes and
threads. Open the file in https://ui.perfetto.dev or chrome://tracing.

Shape legend: ``O`` ops, ``R`` ranks.
"""

from __future__ import annotations

import numpy as np

from moesim.engine import STREAM_INDEX, Schedule
from moesim.ops import STREAMS, Op


def chrome_events(ops: list[Op], sched: Schedule, *, iteration: int = 0,
                  t0_s: float = 0.0) -> list[dict]:
    """Events of every op on every rank that ran it, plus process/thread name metadata."""
    R = sched.start_OR.shape[1]
    events = _metadata(R, iteration)
    ran_OR = np.isfinite(sched.start_OR)
    for i, op in enumerate(ops):
        ranks = np.flatnonzero(ran_OR[i])
        if len(ranks) == 0:
            continue
        ts_us = (sched.start_OR[i, ranks] + t0_s) * 1e6
        dur_us = (sched.end_OR[i, ranks] - sched.start_OR[i, ranks]) * 1e6
        name = op.phase if op.direction != "bwd" else f"{op.phase}_bwd"
        args = {"direction": op.direction, "layer": op.layer, "micro_batch": op.micro_batch,
                "op": type(op).__name__, "index": i}
        if op.label:
            args["label"] = op.label
        tid = STREAM_INDEX[op.stream]
        events.extend({"name": name, "cat": op.phase, "ph": "X", "pid": int(r), "tid": tid,
                       "ts": float(ts), "dur": float(d), "args": args}
                      for r, ts, d in zip(ranks, ts_us, dur_us, strict=True))
    return events


def _metadata(num_ranks: int, iteration: int) -> list[dict]:
    """Process names (``rank r``) and thread names (stream names) for every rank."""
    events: list[dict] = []
    for r in range(num_ranks):
        events.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0,
                       "args": {"name": f"rank {r} (iteration {iteration})"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0,
                       "args": {"sort_index": r}})
        for s, tid in STREAM_INDEX.items():
            events.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid,
                           "args": {"name": s}})
    return events


__all__ = ["chrome_events", "STREAMS"]
