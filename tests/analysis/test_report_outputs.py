"""What the report and `plot all` show: knobs, which run is best, the trace's expert load once
and each policy's GPU load, "no drops" for dropless runs, and up to 8 timeline ranks."""

from __future__ import annotations

import re

from moesim.analysis.figures import plot_all
from moesim.analysis.report import best_run_line, build_report, knobs_text
from moesim.analysis.runs import as_run, summarize
from moesim.analysis.timeline import _select_ranks


def test_report_shows_knobs_and_the_best_run(tmp_path, make_run):
    cfg = {"policy": {"name": "laer_fsep", "knobs": {"slots_per_rank": 4,
                                                     "capacity_factor": None}},
           "model": "tiny", "trace": "t"}
    fast = make_run(tmp_path / "laer", "laer_fsep", speed=0.5, drop=0.0, config=cfg)
    slow = make_run(tmp_path / "ep", "static_ep", speed=1.0, drop=0.0, seed=1)
    mid = make_run(tmp_path / "sw", "swiftmoe", speed=0.8, drop=0.0, seed=2)
    assert knobs_text(as_run(fast)) == "slots_per_rank=4, capacity_factor=none"
    runs = [as_run(p) for p in (slow, fast, mid)]
    line = best_run_line(runs, [summarize(r) for r in runs])
    means = {r.path.name: summarize(r)["mean_step_s"] for r in runs}
    assert line.startswith("Best (simulator): laer,")
    assert f"{means['sw'] / means['laer']:.2f}x faster than the next, sw" in line
    assert f"{means['ep'] / means['laer']:.2f}x faster than the slowest, ep" in line
    page = build_report([slow, fast, mid], tmp_path / "r.html").read_text()
    assert "slots_per_rank=4" in page and "Best (simulator): laer" in page


def test_plot_all_draws_the_trace_once_and_gpu_load_per_run(runs, tmp_path):
    written, _ = plot_all(runs, tmp_path / "figs")
    names = sorted(p.name for p in written)
    assert [n for n in names if n.startswith("load_heatmap")] == ["load_heatmap.png"]
    gpu = [n for n in names if n.startswith("gpu_load_heatmap")]
    assert len(gpu) == len(runs)


def test_drops_of_dropless_runs_say_no_drops(tmp_path, make_run):
    from moesim.analysis.plots import plot_drops

    a = make_run(tmp_path / "a", "static_ep", drop=0.0)
    b = make_run(tmp_path / "b", "eplb", drop=0.0, seed=1)
    import matplotlib.pyplot as plt

    texts = []
    real = plt.Axes.text

    def spy(self, *args, **kwargs):
        texts.append(args[2] if len(args) > 2 else "")
        return real(self, *args, **kwargs)

    plt.Axes.text = spy
    try:
        plot_drops([a, b], tmp_path / "d.png")
    finally:
        plt.Axes.text = real
    assert any(re.match(r"no drops: .*dropped 0 tokens", t) for t in texts)


class _Bar:
    def __init__(self, rank: int) -> None:
        self.rank = rank


def test_timeline_default_draws_eight_ranks():
    bars = [_Bar(r) for r in range(16)]
    kept, note = _select_ranks(bars, None)
    assert sorted({b.rank for b in kept}) == list(range(8)) and "of 16" in note
    kept, note = _select_ranks([_Bar(r) for r in range(6)], None)
    assert len({b.rank for b in kept}) == 6 and note == ""
