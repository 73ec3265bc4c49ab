"""Balance against bytes moved: the figure, the ``moved_bytes`` metric, and a search that
sweeps ``migration_weight`` onto the Pareto front."""

from __future__ import annotations

import math

import pytest
from test_analysis_e2e import SPEC as E2E_SPEC
from test_analysis_e2e import spec  # noqa: F401  (the fixture: the tiny trace and its spec)

from moesim.analysis import ranking, search
from moesim.analysis.figures import KINDS, plot_all
from moesim.analysis.migration_plot import plot_balance_vs_moved
from moesim.analysis.runs import as_run, summarize

# the end-to-end test's tiny trace and [search] header, with an EPLB weight sweep
SPEC = E2E_SPEC[:E2E_SPEC.index("[policies")] + """[policies.eplb]
interval = [1]
window = [1]
migration_weight = [0.0, 1e6]
"""


def test_figure_and_catalogue(runs, tmp_path, check_image):
    assert "balance_vs_moved" in KINDS
    check_image(plot_balance_vs_moved(runs, tmp_path / "bm.png"))
    written, _ = plot_all(runs, tmp_path / "all")
    assert any(p.stem == "balance_vs_moved" for p in written)


def test_moved_bytes_is_a_run_metric(runs):
    s = summarize(as_run(runs[0]))
    assert s["moved_bytes"] == 0.0                     # the fixture's runs never re-lay out


def test_fewer_bytes_moved_keeps_a_slower_config_on_the_front():
    def row(key, step, moved):
        return {"key": key, "mean_step_s": step, "peak_memory_GiB": 10.0, "dropped_frac": 0.0,
                "moved_bytes": moved, "status": "ok", "feasible": True}
    rows = [row("fast", 1.0, 5e9), row("frugal", 1.1, 1e8), row("worse", 1.2, 2e8),
            row("unknown", 1.3, math.nan)]
    front = {r["key"] for r in ranking.pareto_front(rows)}
    # "worse" is dominated by "frugal"; "unknown" (not reported = nothing moved) is not
    assert front == {"fast", "frugal", "unknown"}
    assert "moved_bytes" in ranking.OBJECTIVES and "moved_bytes" in ranking.SORTABLE


@pytest.fixture(scope="module")
def mig_spec(request):
    path = request.getfixturevalue("spec").with_name("migration.toml")
    path.write_text(SPEC)
    return path


def test_search_sweeps_migration_weight_onto_the_front(mig_spec, tmp_path):
    outcome = search.run_search(mig_spec, tmp_path / "s", workers=1, progress=False)
    by_weight = {r["config"]["knobs"]["migration_weight"]: r for r in outcome.records}
    assert {r["status"] for r in outcome.records} == {"ok"}
    moved = {w: r["summary"]["moved_bytes"] for w, r in by_weight.items()}
    assert moved[0.0] > 0 and moved[1e6] < moved[0.0]
    front = {r["key"] for r in outcome.front}
    assert by_weight[1e6]["key"] in front
    assert "moved MiB/it" in ranking.text_table(outcome.rows, "ranking")


def test_example_migration_spec_loads():
    from pathlib import Path

    from moesim.analysis.search_spec import EXAMPLE_SPEC, load_spec

    configs = load_spec(Path(EXAMPLE_SPEC).with_name("search_migration.toml"))
    weights = {c["knobs"].get("migration_weight") for c in configs}
    assert weights == {0.0, 1.0, 10.0} and len(configs) == 6 + 2 + 2
