"""Recording a training trace: shape, validity, determinism, drops, the shipped sample."""

from pathlib import Path

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.traces.record_train import (
    TrainRecordConfig,
    counts_from_topk,
    load_corpus,
    record_training,
    stdlib_files,
)
from moesim.traces.tinylm import TinyLMConfig

SHIPPED = Path(__file__).resolve().parents[2] / "traces" / "data" / "tinylm-stdlib.npz"


def tiny_cfg(**model) -> TrainRecordConfig:
    m = TinyLMConfig(num_layers=2, d_model=16, num_heads=2, ffn_hidden=16, num_experts=4,
                     top_k=2, seq_len=32, **model)
    return TrainRecordConfig(model=m, ranks=2, tokens_per_rank=64, steps=3, keep_topk=True,
                             max_corpus_bytes=200_000)


@pytest.fixture(scope="module")
def recorded():
    return record_training(tiny_cfg(), command="test")


def test_trace_shape_and_validity(recorded):
    from moesim.traces.validate import validate

    validate(recorded)
    assert recorded.counts_TLRE.shape == (3, 2, 2, 4)
    assert recorded.topk_TLRNK.shape == (3, 2, 2, 64, 2)
    assert (recorded.counts_TLRE.sum(-1) == 64 * 2).all()
    for t in range(3):
        assert (counts_from_topk(recorded.topk_TLRNK[t], 4) == recorded.counts_TLRE[t]).all()
    extra = recorded.meta.extra
    assert extra["torch_version"] and extra["recipe"]["seed"] == 0 and len(extra["lm_loss"]) == 3


def test_recording_is_deterministic(recorded):
    again = record_training(tiny_cfg(), command="test")
    assert np.array_equal(again.counts_TLRE, recorded.counts_TLRE)
    assert again.meta.extra["lm_loss"] == recorded.meta.extra["lm_loss"]


def test_capacity_drops_are_counted_not_hidden():
    trace = record_training(tiny_cfg(capacity_factor=0.5))
    dropped = np.array(trace.meta.extra["dropped_TL"])
    assert dropped.sum() > 0
    assert (trace.counts_TLRE.sum(-1) == 128).all()  # counts are the chosen experts


def test_counts_from_topk_ignores_padding():
    topk = np.array([[[[0, 1], [2, -1]]]])
    assert counts_from_topk(topk, 3).tolist() == [[[1, 1, 1]]]


def test_corpus_from_user_files_and_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world " * 50)
    corpus = load_corpus([f])
    assert corpus.num_files == 1 and corpus.data_U8.size == 600
    with pytest.raises(MoesimError, match="cannot read"):
        load_corpus([tmp_path / "missing.txt"])
    with pytest.raises(MoesimError, match="multiple of"):
        TrainRecordConfig(tokens_per_rank=100)


def test_stdlib_corpus_is_sorted_and_nonempty():
    files = stdlib_files()
    assert len(files) > 100
    assert all("site-packages" not in p.parts for p in files)


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped sample trace not generated")
def test_shipped_sample_trace():
    from moesim.traces.io import load_trace
    from moesim.traces.validate import validate

    assert SHIPPED.stat().st_size <= 5 * 2**20
    trace = validate(load_trace(SHIPPED))
    extra = trace.meta.extra
    assert extra["command"].startswith("moesim trace record --train")
    assert extra["torch_version"] and extra["corpus"]["sha256"]
    assert trace.num_passes == len(extra["lm_loss"])


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped sample trace not generated")
def test_shipped_recipe_reproduces_its_first_steps():
    """Warm-up steps do not depend on the total step count, so 3 steps must match exactly."""
    import platform

    import torch

    from moesim.traces.io import load_trace

    trace = load_trace(SHIPPED)
    extra = trace.meta.extra
    if (extra["torch_version"], extra["python_version"]) != (torch.__version__,
                                                           platform.python_version()):
        pytest.skip("recorded with other torch/Python versions")
    recipe = dict(extra["recipe"], steps=3)
    cfg = TrainRecordConfig(model=TinyLMConfig(**extra["model_config"]), **recipe)
    again = record_training(cfg)
    assert np.array_equal(again.counts_TLRE, trace.counts_TLRE[:3])
