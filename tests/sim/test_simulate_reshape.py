"""``moesim simulate --world-size / --gpus-per-node / --regroup``: a trace recorded on 4 ranks
simulates on 16 GPUs only when asked, and the regrouping is in the run's config."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.results import load_run
from moesim.traces.io import load_trace, save_trace
from moesim.traces.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "t4.npz"
    save_trace(synthesize(SynthConfig(num_ranks=4, num_iterations=3), rng=2), path)
    return path


def run(tmp_path, trace, *flags):
    return main(["simulate", "--trace", str(trace), "--out", str(tmp_path / "run"), "--quiet",
                 "--iterations", "1:2", *flags])


def test_four_rank_trace_on_16_gpus_needs_explicit_regroup(tmp_path, capsys, four_ranks):
    assert run(tmp_path, four_ranks, "--world-size", "16") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--regroup" in err and "trace regroup --ranks 16" in err
    assert run(tmp_path, four_ranks, "--world-size", "16", "--regroup") == 0
    assert "a100-4x8-ib800@2x8" in capsys.readouterr().out
    config = load_run(tmp_path / "run").config
    assert config["options"]["regroup"] is True
    step = config["trace"]["meta"]["extra"]["regroup"][-1]
    assert (step["from_ranks"], step["to_ranks"]) == (4, 16)
    assert config["trace"]["meta"]["num_ranks"] == 16
    assert config["cluster"]["num_nodes"] * config["cluster"]["gpus_per_node"] == 16


def test_regroup_is_the_same_as_trace_regroup(tmp_path, capsys, four_ranks):
    out = tmp_path / "t16.npz"
    assert main(["trace", "regroup", str(four_ranks), "--ranks", "16", "-o", str(out)]) == 0
    capsys.readouterr()
    regrouped = load_trace(out)
    original = load_trace(four_ranks)
    np.testing.assert_array_equal(regrouped.counts_TLRE.sum(2), original.counts_TLRE.sum(2))
    assert run(tmp_path, out, "--world-size", "16") == 0
    a = capsys.readouterr().out.split("->")[0]
    assert run(tmp_path / "b", four_ranks, "--world-size", "16", "--regroup") == 0
    assert capsys.readouterr().out.split("->")[0] == a


@pytest.mark.parametrize("flags, cluster", [
    (("--world-size", "4"), "a100-4x8-ib800@1x4"),
    (("--gpus-per-node", "2", "--nodes", "2"), "a100-4x8-ib800@2x2"),
    (("--world-size", "4", "--gpus-per-node", "1"), "a100-4x8-ib800@4x1"),
])
def test_cluster_shapes(tmp_path, capsys, four_ranks, flags, cluster):
    assert run(tmp_path, four_ranks, *flags) == 0
    assert capsys.readouterr().out.startswith(f"static_ep on {cluster}:")


@pytest.mark.parametrize("flags, needle", [
    (("--world-size", "12"), "not a multiple of 8"),
    (("--world-size", "16", "--nodes", "3"), "give two of the three"),
    (("--gpus-per-node", "0"), "must be >= 1"),
])
def test_bad_shapes(tmp_path, capsys, four_ranks, flags, needle):
    assert run(tmp_path, four_ranks, *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
