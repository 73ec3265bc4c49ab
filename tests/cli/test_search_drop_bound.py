"""Search ranking has a default drop bound, says so, and lists the configs over it."""

from __future__ import annotations

import io

from moesim.analysis import ranking
from moesim.analysis.cli import DEFAULT_MAX_DROP_FRAC
from moesim.analysis.search import SearchOutcome, print_outcome
from moesim.cli import build_parser


def _record(key: str, step_s: float, dropped: float) -> dict:
    return {"key": key, "config": {"policy": "static_ep", "knobs": {"capacity_factor": 1.0}},
            "status": "ok", "summary": {"mean_step_s": step_s, "p50_step_s": step_s,
                                        "p95_step_s": step_s, "peak_memory_bytes": 2**30,
                                        "dropped_frac": dropped, "a2a_s": 0.1}}


def test_default_bound_is_on_and_changeable():
    p = build_parser()
    assert p.parse_args(["search"]).max_drop_frac == DEFAULT_MAX_DROP_FRAC == 0.05
    assert p.parse_args(["search", "--max-drop-frac", "0.5"]).max_drop_frac == 0.5
    assert p.parse_args(["search", "--max-drop-frac", "none"]).max_drop_frac is None
    assert p.parse_args(["report", "x"]).max_drop_frac == DEFAULT_MAX_DROP_FRAC


def test_fast_dropping_configs_are_not_ranked_first_and_are_marked():
    records = [_record("drops", 1.0, 0.61), _record("dropless", 2.0, 0.0)]
    rows = ranking.rank(records, max_drop_frac=DEFAULT_MAX_DROP_FRAC)
    outcome = SearchOutcome(records, rows, ranking.pareto_front(rows), {}, "mean_step_s")
    out = io.StringIO()
    print_outcome(outcome, out, max_drop_frac=DEFAULT_MAX_DROP_FRAC)
    text = out.getvalue()
    ranked, over = text.split("Over a bound")[0], text.split("Over a bound")[1].split("Pareto")[0]
    assert "drop bound 5% of token assignments, --max-drop-frac" in ranked
    assert "1 of 2 configs meet" in ranked and "2000.000" in ranked and "1000.000" not in ranked
    assert "1000.000" in over and "drops > 0.05" in over and "61.00" in over
    out = io.StringIO()
    unbounded = ranking.rank(records, max_drop_frac=None)
    print_outcome(SearchOutcome(records, unbounded, [], {}, "mean_step_s"), out)
    assert "no drop bound" in out.getvalue() and "Over a bound" not in out.getvalue()


def test_search_json(tmp_path, capsys):
    import json

    from moesim.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('[search]\ntraces = ["bundled"]\nmodels = ["smartmoe-gpt"]\n'
                    'clusters = ["a100-4x8-ib800@2"]\niterations = 1\n'
                    '[policies.static_ep]\ncapacity_factor = [1.0, "none"]\n')
    assert main(["search", str(spec), "-o", str(tmp_path / "s"), "--workers", "1",
                 "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert "Ranking by" in cap.err and doc["max_drop_frac"] == 0.05
    assert [r["config"] for r in doc["ranking"]] == ["static_ep capacity_factor=none"]
    assert doc["over_bound"][0]["violates"] == "drops > 0.05"
    assert doc["ranking"][0]["cluster"] == "a100-4x8-ib800@2"
