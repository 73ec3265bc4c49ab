"""Every figure renders headlessly to a real image; bad inputs give one-line MoesimErrors."""

from __future__ import annotations

import json

import pytest

from moesim.analysis import compare, figures, plots, timeline
from moesim.analysis.figio import mark_incomplete, new_figure
from moesim.analysis.runs import as_run
from moesim.cli import main
from moesim.errors import MoesimError
from moesim.results import load_run


def test_predicted_vs_measured_pdf(measured_pair, tmp_path, check_image):
    out = compare.plot_predicted_vs_measured(list(measured_pair), tmp_path / "pvm.pdf")
    check_image(out)


def test_pdf_output(runs, tmp_path, check_image):
    check_image(plots.plot_memory(runs, tmp_path / "memory.pdf"))


def test_timeline_from_arrays_when_no_trace_file(runs, tmp_path, check_image):
    run = load_run(runs[1])
    assert not timeline.timeline_files(run)
    check_image(timeline.plot_timeline(run, tmp_path / "tl.png", iteration=3))
    with pytest.raises(MoesimError, match="iteration 99 was not recorded"):
        timeline.plot_timeline(run, tmp_path / "tl.png", iteration=99)


def test_timeline_rank_selection(runs, tmp_path, check_image):
    check_image(timeline.plot_timeline(runs[0], tmp_path / "tl.png", ranks=[0, 3]))
    with pytest.raises(MoesimError, match=r"rank\(s\) \[9\] not in the timeline"):
        timeline.plot_timeline(runs[0], tmp_path / "tl.png", ranks=[9])
    bars = timeline.bars_from_trace(runs[0] / "timeline_iter1.json")
    kept, note = timeline._select_ranks(bars * 1, None)
    assert note == "" and len(kept) == len(bars)


def test_timeline_reads_chrome_trace(runs):
    bars = timeline.bars_from_trace(runs[0] / "timeline_iter1.json")
    assert {b.phase for b in bars} <= {"route", "dispatch", "expert", "combine", "dense"}
    assert any(b.row == "rank 0 / comm" for b in bars)


def test_incomplete_runs_are_marked(runs, incomplete_run, tmp_path, check_image):
    loaded = [load_run(runs[0]), load_run(incomplete_run)]
    fig, _ = new_figure()
    mark_incomplete(fig, loaded)
    notes = [t.get_text() for t in fig.texts]
    assert any("INCOMPLETE" in n and "killed" in n for n in notes)
    check_image(plots.plot_step_time(loaded, tmp_path / "s.png"))


def test_killed_run_is_read_from_its_parts(make_run, tmp_path, check_image):
    run_dir = make_run(tmp_path / "sigkilled", "swiftmoe", iterations=6, killed=True)
    assert not (run_dir / "iterations.csv").exists()
    run = as_run(run_dir)
    assert run.manifest["status"] == "running"
    assert run.summary["step_time_s"].size == 6 and run["expert_load"].shape[0] == 6
    check_image(plots.plot_step_time([run], tmp_path / "s.png"))
    check_image(plots.plot_load_heatmap(run, tmp_path / "h.png"))


def test_speedup_needs_a_baseline(runs, tmp_path, check_image):
    with pytest.raises(MoesimError, match="no static_ep run"):
        plots.plot_speedup(runs[1:], tmp_path / "s.png")
    check_image(plots.plot_speedup(runs[1:], tmp_path / "s.png", baseline=runs[2]))


def test_plot_all_cli_draws_every_kind(runs, tmp_path, capsys, check_image):
    assert main(["plot", "all", str(runs[0]), "-o", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr()
    written = [tmp_path / "d" / line.split("/")[-1] for line in printed.out.split()]
    # pred_vs_meas needs an executor run: skipped with its reason (drawn in the PDF test)
    assert {p.stem.split("-")[0] for p in written} == set(figures.KINDS) - {"pred_vs_meas"}
    assert "skipped pred_vs_meas" in printed.err
    for path in written:
        check_image(path)


def test_plot_one_kind_cli(runs, tmp_path, capsys, check_image):
    out = tmp_path / "heat.png"
    assert main(["plot", "load_heatmap", str(runs[0]), "-o", str(out), "--layers", "0,2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    check_image(out)


def test_plot_all_skips_with_reasons(runs):
    loaded = [load_run(r) for r in runs[1:]]
    assert "no static_ep run" in figures._not_applicable("speedup", loaded, None)
    assert figures._not_applicable("speedup", loaded, runs[0]) == ""
    assert "executor run" in figures._not_applicable("pred_vs_meas", loaded, None)
    assert figures._not_applicable("memory", loaded, None) == ""


@pytest.mark.parametrize("argv, message", [
    (["plot", "step_time", "NOPE", "-o", "x.png"], "not a moesim run directory"),
    (["plot", "step_time", "RUN", "-o", "x.svg"], "must end in .png or .pdf"),
    (["plot", "load_heatmap", "RUN", "-o", "x.png", "--layers", "7"], "out of range"),
    (["plot", "all", "RUN", "-o", "x.png"], "must be a directory"),
])
def test_plot_bad_inputs_are_one_line_errors(argv, message, runs, tmp_path, capsys,
                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(runs[0]) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moesim: error:") and message in err and "\n" not in err


def test_not_a_run_dir_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoesimError, match="no manifest.json"):
        plots.plot_step_time(tmp_path / "empty", tmp_path / "x.png")


def test_missing_arrays_named(make_run, tmp_path):
    run = make_run(tmp_path / "r", iterations=2)
    (run / "load.npz").unlink()
    with pytest.raises(MoesimError, match="no expert_load"):
        plots.plot_load_heatmap(run, tmp_path / "x.png")
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
