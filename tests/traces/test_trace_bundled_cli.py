"""The bundled demo trace and the `moesim trace` commands end to end."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.traces import bundled_trace_path, load_trace
from moesim.traces.bundled import make_bundled_trace


def test_bundled_trace_is_small_valid_and_reproducible():
    path = bundled_trace_path()
    assert path.stat().st_size < 2 * 1024 * 1024
    trace = load_trace(path)
    m = trace.meta
    assert trace.counts_TLRE.shape == (80, 24, 16, 32)
    assert (m.top_k, m.tokens_per_rank, m.micro_batches_per_iteration) == (2, 2048, 4)
    assert m.license == "Apache-2.0" and "synth" in m.source
    np.testing.assert_array_equal(make_bundled_trace().counts_TLRE, trace.counts_TLRE)


def test_synth_export_import_validate_spread(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["trace", "synth", "-o", str(out), "--seed", "3", "--layers", "2", "--ranks",
                 "2", "--experts", "8", "--tokens-per-rank", "32", "--iterations", "3",
                 "--micro-batches", "1", "--popularity", "zipf"]) == 0
    assert main(["trace", "validate", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["trace", "export", str(out), "-o", str(tmp_path / "s.csv")]) == 0
    assert main(["trace", "import", "csv", str(tmp_path / "s.csv"), "-o",
                 str(tmp_path / "back")]) == 0
    np.testing.assert_array_equal(load_trace(out).counts_TLRE,
                                  load_trace(tmp_path / "back").counts_TLRE)
    np.save(tmp_path / "w.npy", np.array([[4, 2, 2, 0], [1, 1, 3, 3]]))
    assert main(["trace", "import", "eplb", str(tmp_path / "w.npy"), "-o",
                 str(tmp_path / "w.npz")]) == 0
    assert main(["trace", "spread", str(tmp_path / "w.npz"), "--ranks", "2", "-o",
                 str(tmp_path / "w2.npz")]) == 0
    assert load_trace(tmp_path / "w2.npz").meta.num_ranks == 2


@pytest.mark.parametrize("argv,message", [
    (["trace", "info", "nope.npz"], "no trace at nope.npz"),
    (["trace", "info", "--iterations", "x"], "--iterations 'x' is not A:B"),
    (["trace", "info", "--iterations", "50:60"], "selects nothing"),
    (["trace", "info", "--ep-size", "5"], "--ep-size 5 must divide the 32 experts"),
    (["trace", "synth", "-o", "x.npz", "--skew", "-1"], "popularity_sigma = -1.0 must be >= 0"),
    (["trace", "import", "smartmoe", "nowhere", "-o", "x.npz"], "nowhere is not a directory"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error: ") and message in err and err.count("\n") == 1


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    text = capsys.readouterr().out
    for word in ("import", "info", "synth", "export", "validate"):
        assert word in text
