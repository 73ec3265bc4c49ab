"""Report: one self-contained HTML page with embedded figures and tables."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from moesim.analysis import figures, search
from moesim.analysis.report import build_report
from moesim.cli import main
from moesim.errors import MoesimError


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                      page)]


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r'(src|href)="(?!data:)', page), "external asset referenced"


def test_report_of_runs_and_validation(incomplete_run, measured_pair, tmp_path, check_image,
                                       monkeypatch):
    # every kind renders in test_plot_all_cli_draws_every_kind; here three keep the test fast
    kinds = {k: v for k, v in figures.KINDS.items() if k in ("step_time", "memory",
                                                               "pred_vs_meas")}
    monkeypatch.setattr(figures, "KINDS", kinds)
    out = build_report([incomplete_run, *measured_pair], tmp_path / "r" / "report.html")
    page = out.read_text()
    _assert_self_contained(page)
    images = _images(page)
    assert len(images) == 3
    for k, png in enumerate(images[:3]):
        path = tmp_path / f"img{k}.png"
        path.write_bytes(png)
        check_image(path)
    assert "Predicted vs measured" in page and "MAPE %" in page
    assert "Incomplete runs" in page and "killed" in page
    assert page.count("<table>") >= 2


def _fake_eval(config, run_dir, make_run=None):
    slots = config["knobs"].get("slots_per_rank", 1)
    if make_run is not None and slots == 2:  # a saved run (--save-runs) for the report
        make_run(run_dir, "swiftmoe", iterations=3)
    return {"mean_step_s": 0.1 / slots, "p50_step_s": 0.1 / slots, "p95_step_s": 0.12 / slots,
            "peak_memory_bytes": slots * 2**30, "dropped_frac": 0.01 * slots,
            "a2a_s": np.float64(0.01), "iterations": 3, "status": "complete"}


def test_report_of_a_search(tmp_path, make_run):
    spec = tmp_path / "spec.toml"
    spec.write_text("[policies.swiftmoe]\nslots_per_rank = [1, 2, 4]\n")
    search.run_search(spec, tmp_path / "s", workers=1, progress=False, save_runs=True,
                      evaluate=lambda cfg, run_dir: _fake_eval(cfg, run_dir, make_run))
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "s"), "-o", str(out), "--max-memory-GiB", "3"]) == 0
    page = out.read_text()
    _assert_self_contained(page)
    assert len(_images(page)) == 1 + 3  # Pareto + step time, drops, memory of the saved run
    assert "best configurations" in page
    assert "Pareto front" in page and "peak memory ≤ 3 GiB" in page
    assert "swiftmoe slots_per_rank=2" in page


def test_report_bad_input(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    with pytest.raises(MoesimError, match="neither a run directory"):
        build_report([tmp_path / "x"], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "x"), "-o", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


def test_report_skips_what_is_not_a_run(runs, tmp_path, capsys):
    """`moesim report runs/demo/* -o ...` after `make demo`: the glob also matches figures/
    and an earlier report; they are skipped with a note."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "old.html").write_text("x")
    out = tmp_path / "r.html"
    assert main(["report", *map(str, runs), str(tmp_path / "figures"),
                 str(tmp_path / "old.html"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "figures" in err and "old.html" in err
    assert out.is_file()
