"""Run layout programs on real processes and check each against the whole-stack reference.

``python -m moesim.executor.selfcheck --cases FILE --report FILE`` (started by
:func:`moesim.executor.launch.launch`) reads a pickle of
``{name: {"model": ModelSpec, "layout": ParallelLayout, "items": [(iteration, Program)]}}`` and
runs :func:`run_case` for each: its programs on a
:class:`~moesim.executor.interpreter.RankExecutor` under its layout (after
:func:`moesim.executor.capabilities.unsupported` accepts it), each iteration checked with
:func:`moesim.executor.layout_check.check_layout_iteration`. The report (rank 0) is
``{name: {"ok": bool, "iterations": [report, ...]} | {"ok": false, "error": "..."}}``.
"""

from __future__ import annotations

from moesim.errors import MoesimError
from moesim.executor.worker import Heartbeat, _device


def run_case(case: dict, rank: int, world: int, hb: Heartbeat) -> dict:
    """Every iteration of one case on this rank; the report (meaningful on rank 0)."""
    from moesim.executor.capabilities import unsupported
    from moesim.executor.interpreter import RankExecutor
    from moesim.executor.layout_check import check_layout_iteration

    what = unsupported(case["layout"])
    if what is not None:
        return {"ok": False, "error": f"refused: {what}"}
    ex = RankExecutor(case["model"], rank, world, _device(), layout=case["layout"])
    reports = []
    try:
        for iteration, program in case["items"]:
            ex.prepare(program, iteration)
            times = ex.run(program, progress=hb.beat)
            report = check_layout_iteration(ex, program, iteration)
            if report is not None:
                report["ops_timed"] = len(times.events)
                reports.append(report)
    except MoesimError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": bool(reports) and all(r["ok"] for r in reports), "iterations": reports}
