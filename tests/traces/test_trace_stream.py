"""Traces larger than memory: the chunked directory writer, the streaming synthetic generator
(same statistics as the in-memory one), chunked validation and statistics, and a simulation
reading a memory-mapped trace."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import TraceError
from moesim.simulate import simulate
from moesim.specs import load_cluster, load_model
from moesim.traces import SynthConfig, load_trace, save_trace, synthesize
from moesim.traces import stream as trace_stream
from moesim.traces.io import TraceDirWriter, count_dtype
from moesim.traces.stats import per_pass_stats, trace_stats
from moesim.traces.synth_stream import SAMPLER, synthesize_to_dir

SMALL = SynthConfig(num_layers=3, num_ranks=4, num_experts=16, top_k=4, tokens_per_rank=64,
                    micro_batches_per_iteration=2, num_iterations=5)


def test_writer_round_trip_pass_by_pass(tmp_path):
    trace = synthesize(SMALL, rng=1)
    with TraceDirWriter(tmp_path / "t", trace.meta, trace.num_passes) as w:
        for t in range(trace.num_passes):
            w.write(trace.counts_TLRE[t:t + 1])
    back = load_trace(tmp_path / "t")
    np.testing.assert_array_equal(back.counts_TLRE, trace.counts_TLRE)
    assert back.meta == trace.meta


def test_writer_is_atomic_and_checks_each_chunk(tmp_path):
    trace = synthesize(SMALL, rng=1)
    save_trace(trace, tmp_path / "t")
    bad = np.array(trace.counts_TLRE[2:4])
    bad[1, 0, 0, 0] += 1                                    # a row no longer sums to N·k
    with pytest.raises(TraceError, match=r"\[t, l, r\] = \(3, 0, 0\) sum to"):
        with TraceDirWriter(tmp_path / "t", trace.meta, trace.num_passes) as w:
            w.write(trace.counts_TLRE[:2])
            w.write(bad)
    with pytest.raises(TraceError, match="only 2 of 10 passes"):
        with TraceDirWriter(tmp_path / "t", trace.meta, trace.num_passes) as w:
            w.write(trace.counts_TLRE[:2])
    np.testing.assert_array_equal(load_trace(tmp_path / "t").counts_TLRE, trace.counts_TLRE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]   # no half-written leftovers


def test_streamed_synth_is_deterministic_whatever_the_chunking(tmp_path):
    a = synthesize_to_dir(SMALL, tmp_path / "a", rng=7)
    b = synthesize_to_dir(SMALL, tmp_path / "b", rng=np.random.default_rng(7), workers=1,
                          max_cells=1)
    ta, tb = load_trace(a), load_trace(b)
    np.testing.assert_array_equal(ta.counts_TLRE, tb.counts_TLRE)
    assert ta.meta.extra["sampler"] == SAMPLER == "stream-v2"
    assert ta.counts_TLRE.dtype == np.uint16                # 64 tokens x top-4 fit in 16 bits
    c = load_trace(synthesize_to_dir(SMALL, tmp_path / "c", rng=8))
    assert not np.array_equal(ta.counts_TLRE, c.counts_TLRE)


def test_streamed_synth_keeps_the_published_statistics(tmp_path):
    """The statistics test of the in-memory generator (test_trace_synth), on the streamed one."""
    cfg = SynthConfig(num_layers=6, num_ranks=16, num_experts=256, top_k=8,
                      tokens_per_rank=6144, micro_batches_per_iteration=1, num_iterations=40)
    streamed = per_pass_stats(load_trace(synthesize_to_dir(cfg, tmp_path / "s", rng=11)), 16)
    in_memory = per_pass_stats(synthesize(cfg, rng=11), ep_size=16)
    for stats in (streamed, in_memory):
        late = {k: float(np.nanmean(v[20:])) for k, v in stats.items()}
        assert 2.6 <= late["max_mean"] <= 13.7
        assert 0.05 <= late["tv"] <= 0.09
        assert 0.975 <= late["consecutive_corr"] <= 0.995
        assert 0.7 <= late["rank_corr"] <= 0.92
    for name in ("tv", "rank_corr", "gini"):
        assert np.nanmean(streamed[name]) == pytest.approx(np.nanmean(in_memory[name]),
                                                           rel=0.1)


def test_chunked_validation_names_the_pass(tmp_path, monkeypatch):
    trace = synthesize(SMALL, rng=2)
    counts = np.array(trace.counts_TLRE)
    counts[7, 1, 2, 3] = -1
    np.save(tmp_path / "counts.npy", counts)
    save_trace(trace, tmp_path / "t")
    (tmp_path / "counts.npy").replace(tmp_path / "t" / "counts.npy")
    monkeypatch.setattr(trace_stream, "CHUNK_CELLS", 3 * 4 * 16 * 2)   # chunks of 2 passes
    with pytest.raises(TraceError, match=r"negative count -1 at \[t, l, r, e\] = \(7, 1, 2, 3\)"):
        load_trace(tmp_path / "t")


def test_stats_stream_in_chunks_and_match(tmp_path, monkeypatch):
    trace = synthesize(SMALL, rng=3)
    save_trace(trace, tmp_path / "t")
    whole = trace_stats(trace).to_dict()
    monkeypatch.setattr(trace_stream, "CHUNK_CELLS", 3 * 4 * 16)        # one pass per chunk
    assert trace_stats(load_trace(tmp_path / "t")).to_dict() == whole


def test_cli_synth_to_a_directory_streams(tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["trace", "synth", "-o", str(out), "--layers", "2", "--ranks", "8",
                 "--experts", "16", "--top-k", "2", "--tokens-per-rank", "64",
                 "--iterations", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_trace(out).meta.extra["sampler"] == SAMPLER
    assert main(["trace", "info", str(out)]) == 0


@pytest.mark.parametrize("policy", ["swiftmoe", "eplb", "laer_fsep", "fastermoe", "smartmoe",
                                    "hecate", "fastermoe_oracle"])
def test_simulate_reads_a_mapped_trace_like_an_in_memory_one(tmp_path, policy):
    """A directory trace stores uint16 counts; every policy's history sums and the engine see
    the same int64 numbers as from the in-memory trace, so the run is the same."""
    trace = synthesize(SMALL.replace(num_ranks=16, num_experts=32, top_k=2, tokens_per_rank=256,
                                     num_layers=2, num_iterations=4), rng=4)
    save_trace(trace, tmp_path / "t")
    assert load_trace(tmp_path / "t").counts_TLRE.dtype == np.uint16
    model = load_model("smartmoe-gpt").replace(num_layers=2)
    cluster = load_cluster("a100-4x8-ib800").with_shape(2)
    kw = {"iterations": (0, 4), "progress": False}
    mapped = simulate(tmp_path / "t", model, cluster, policy, **kw)
    in_memory = simulate(trace, model, cluster, policy, **kw)
    def strip(rows):                                        # the planner's own wall time
        return [{k: v for k, v in r.items() if k != "planner_time_s"} for r in rows]

    assert strip(mapped.rows) == strip(in_memory.rows)


def test_directory_counts_take_the_narrowest_type(tmp_path):
    trace = synthesize(SMALL, rng=5)
    for tokens, top_k, dtype in ((8191, 8, np.uint16), (8192, 8, np.int32),
                                 (2**31 // 2, 2, np.int64)):
        meta = trace.meta.replace(tokens_per_rank=tokens, top_k=top_k)
        assert count_dtype(meta) == dtype
    with pytest.raises(TraceError, match="cannot hold"):
        TraceDirWriter(tmp_path / "w", trace.meta.replace(tokens_per_rank=2**16), 10,
                       dtype=np.uint16)
    with TraceDirWriter(tmp_path / "w", trace.meta, trace.num_passes, dtype=np.int64) as w:
        w.write(trace.counts_TLRE)                          # an int64 directory, as before
    assert load_trace(tmp_path / "w").counts_TLRE.dtype == np.int64


def test_readers_widen_narrow_counts(tmp_path):
    """What the simulator and the policies take from a uint16 directory trace is int64: a
    difference of two loads goes negative instead of wrapping round as unsigned sums would."""
    from moesim.policies.base import sum_counts
    from moesim.policies.primitives import per_iteration_load_TLE
    from moesim.simulate import build_history, iteration_counts

    trace = synthesize(SMALL, rng=6)
    save_trace(trace, tmp_path / "t")
    counts = load_trace(tmp_path / "t").counts_TLRE
    assert counts.dtype == np.uint16
    assert iteration_counts(counts, 2, 1).dtype == np.int64
    history = build_history(counts, 2, 3, None, oracle=True)
    assert history.current_TLRE.dtype == np.int64
    one, three = history.recent_load_LE(1), history.recent_load_LE(3)
    assert one.dtype == np.int64 and per_iteration_load_TLE(history).dtype == np.int64
    assert ((one - three) < 0).all()
    assert sum_counts(np.ones((2, 3)) / 2, 0).dtype == np.float64   # floats stay floats


def test_simulate_reads_only_the_iterations_it_runs(tmp_path):
    """A directory trace is validated (so read) up to the last simulated iteration only: a
    corrupt count in a later iteration does not stop a run that never reaches it."""
    trace = synthesize(SMALL.replace(num_ranks=16, num_experts=32, top_k=2, tokens_per_rank=256,
                                     num_layers=2, num_iterations=4), rng=7)
    save_trace(trace, tmp_path / "t")
    counts = np.load(tmp_path / "t" / "counts.npy", mmap_mode="r+")
    counts[-1, 1, 3, 5] += 1                                # the last pass no longer sums to N·k
    counts.flush()
    del counts
    model = load_model("smartmoe-gpt").replace(num_layers=2)
    cluster = load_cluster("a100-4x8-ib800").with_shape(2)
    run = simulate(tmp_path / "t", model, cluster, "eplb", iterations=(1, 3), progress=False)
    assert [r["iteration"] for r in run.rows] == [1, 2]
    with pytest.raises(TraceError, match=r"\[t, l, r\] = \(7, 1, 3\) sum to"):
        simulate(tmp_path / "t", model, cluster, "eplb", iterations=(1, 4), progress=False)
