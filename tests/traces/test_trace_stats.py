"""Trace statistics against naive loop references, and the info command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.traces import bundled_trace_path, save_trace
from moesim.traces.stats import default_ep_size, per_pass_stats, trace_stats
from tests.traces.tracetoys import make_trace


def naive_stats(counts_TLRE: np.ndarray, ep: int) -> dict[str, np.ndarray]:
    T, L, R, E = counts_TLRE.shape
    out = {k: np.full((T, L), np.nan) for k in ("max_mean", "gini", "gpu_imbalance",
                                                 "rank_corr")}
    out["tv"] = np.full((T - 1, L), np.nan)
    out["consecutive_corr"] = np.full((T - 1, L), np.nan)
    for t in range(T):
        for layer in range(L):
            load = counts_TLRE[t, layer].sum(axis=0).astype(float)
            out["max_mean"][t, layer] = load.max() / load.mean()
            diffs = np.abs(load[:, None] - load[None, :]).sum()
            out["gini"][t, layer] = diffs / (2 * E * load.sum())
            gpu = [load[g * (E // ep):(g + 1) * (E // ep)].sum() for g in range(ep)]
            out["gpu_imbalance"][t, layer] = max(gpu) / np.mean(gpu)
            pairs = [np.corrcoef(counts_TLRE[t, layer, a], counts_TLRE[t, layer, b])[0, 1]
                     for a in range(R) for b in range(R) if a < b]
            out["rank_corr"][t, layer] = np.mean(pairs)
            if t + 1 < T:
                nxt = counts_TLRE[t + 1, layer].sum(axis=0).astype(float)
                out["tv"][t, layer] = 0.5 * np.abs(load / load.sum() - nxt / nxt.sum()).sum()
                out["consecutive_corr"][t, layer] = np.corrcoef(load, nxt)[0, 1]
    return out


def test_stats_match_naive_reference():
    trace = make_trace(T=6, L=3, R=4, E=6, k=2, N=20, mb=2, seed=3)
    fast = per_pass_stats(trace, ep_size=3)
    slow = naive_stats(trace.counts_TLRE, 3)
    for name in fast:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-9, err_msg=name)


def test_default_ep_size():
    assert default_ep_size(32, 16) == 16
    assert default_ep_size(32, 12) == 8
    assert default_ep_size(10, 4) == 2
    assert default_ep_size(7, 3) == 1


def test_bad_ep_size():
    with pytest.raises(MoesimError, match="--ep-size 3 must divide the 32 experts"):
        trace_stats(make_trace(E=32, N=40), ep_size=3)


def test_windows_cover_the_trace():
    trace = make_trace(T=12, mb=2)
    stats = trace_stats(trace)
    assert [w["name"] for w in stats.windows] == ["first", "middle", "last"]
    assert stats.windows[0]["iterations"][0] == 1 and stats.windows[-1]["iterations"][1] == 51


def test_info_default_is_bundled_and_json(capsys, tmp_path):
    assert main(["trace", "info"]) == 0
    text = capsys.readouterr().out
    assert "80 passes = 20 iterations x 4 micro-batches" in text and "drift over" in text
    assert main(["trace", "info", "--json", "--iterations", "2:6", "--ep-size", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_iterations"] == 4 and data["ep_size"] == 8
    assert data["path"] == str(bundled_trace_path())
    assert set(data["overall"]) >= {"max_mean", "gini", "gpu_imbalance", "tv", "rank_corr"}
    assert len(data["per_layer"]["max_mean"]) == 24


def test_info_rank_aggregated_has_no_rank_corr(tmp_path, capsys):
    from moesim.traces import import_eplb
    np.save(tmp_path / "w.npy", np.array([[3, 1, 2, 2]]))
    save_trace(import_eplb(tmp_path / "w.npy"), tmp_path / "w.npz")
    assert main(["trace", "info", str(tmp_path / "w.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"]["rank_corr"] is None and data["overall"]["tv"] is None
