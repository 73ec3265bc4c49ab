"""The bundled trace is synthetic and every place that names it says so."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moesim.analysis.runs import setting
from moesim.cli import build_parser, main
from moesim.traces import bundled_trace_path, load_trace


def test_trace_info_says_synthetic(capsys):
    assert main(["trace", "info", "--iterations", "0:1"]) == 0
    source = capsys.readouterr().out.splitlines()[1]
    assert source.startswith("source: moesim.traces.synth (synthetic: no recorded data)")


def test_simulate_help_calls_the_bundled_trace_synthetic(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the bundled synthetic trace" in text and "bundled SmartMoE trace" not in text


def test_figure_titles_mark_synthetic_traces():
    meta = load_trace(bundled_trace_path()).meta.to_dict()
    synthetic = SimpleNamespace(config={"trace": {"path": str(bundled_trace_path()),
                                                  "meta": meta}})
    assert setting([synthetic]) == "trace bundled.npz (synthetic)"
    recorded = SimpleNamespace(config={"trace": {"path": "/x/smartmoe.npz",
                                                 "meta": dict(meta, extra={})}})
    assert setting([recorded]) == "trace smartmoe.npz"
