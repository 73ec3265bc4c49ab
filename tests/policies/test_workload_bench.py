"""benchmarks/workload_bench.py's winner table: ties, margins and the speed-up over static EP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "workload_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("workload_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(ms: float, overload: float = 1.0) -> dict:
    return {"step_time_s": ms / 1e3, "overload_mean": overload, "imbalance": overload - 1}


def test_winners_ties_and_margin():
    bench = _bench()
    res = {"static_ep": _row(100.0, 3.0), "eplb": _row(80.0, 1.2), "flexmoe": _row(80.2, 1.3),
           "hecate": _row(90.0)}
    tied, second = bench.winners(res)
    assert tied == ["eplb", "flexmoe"] and second == "hecate"  # 80.2 is within 0.5 % of 80
    text = bench.tables({"hot_rank": res}, list(res))
    line = next(row for row in text.splitlines() if row.startswith("| hot_rank | eplb"))
    assert "| eplb, flexmoe | 80.0 | hecate | 1.125x | 1.25x | 1.20 | 3.00 |" in line
    all_tie = {"a": _row(10.0), "b": _row(10.0)}
    assert bench.winners(all_tie) == (["a", "b"], None)
