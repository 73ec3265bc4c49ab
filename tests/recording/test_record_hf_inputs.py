"""Recording from Hugging Face models: JetMoE's sorted-dispatch gate, a checkpoint without a
tokenizer, sizes checked before the model loads, the tiny models listed in --help."""

import importlib.util
import re

import numpy as np
import pytest
import torch

from moesim.cli import build_parser, main
from moesim.traces import load_trace
from moesim.traces.record_cli import TINY_MODELS


def test_help_lists_every_tiny_model(capsys):
    from moesim.traces.record_hf import tiny_configs

    assert tuple(tiny_configs()) == TINY_MODELS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["trace", "record", "--help"])
    text = re.sub(r"-\n\s*", "-", capsys.readouterr().out)    # argparse wraps at hyphens
    for name in TINY_MODELS:
        assert name in text


def test_sizes_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import moesim.traces.record_hf as record_hf

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the sizes were checked")

    monkeypatch.setattr(record_hf, "load_hf_model", must_not_load)
    argv = ["trace", "record", "--hf-model", "tiny-mixtral", "-o", str(tmp_path / "t.npz")]
    assert main([*argv, "--tokens", "100", "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multiple of --seq-len 64" in err
    assert main([*argv, "--ranks", "0"]) == 2
    assert "--ranks 0" in capsys.readouterr().err


needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="needs transformers (pip install 'moesim[hf]')")


@needs_transformers
def test_tokens_below_the_default_sequence_length_record(tmp_path):
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--hf-model", "tiny-olmoe", "--tokens", "32", "--ranks",
                 "2", "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.meta.tokens_per_rank == 32 and trace.meta.extra["seq_len"] == 32


@needs_transformers
def test_jetmoe_records_ffn_routers_exactly(tmp_path):
    from moesim.traces.record_hf import build_tiny_model, find_routers, record_hf

    model = build_tiny_model("tiny-jetmoe", seed=3)
    routers, _ = find_routers(model)
    assert all("attention" not in name for name, _ in routers) and len(routers) == 2
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0])))
             for _, m in routers]
    ids = np.random.default_rng(0).integers(0, 256, 2 * 2 * 16)
    try:
        trace = record_hf(model, ids, ranks=2, tokens_per_rank=16, seq_len=8)
    finally:
        for h in hooks:
            h.remove()
    assert trace.meta.extra["choices"] == "captured"
    assert any("attention" in n for n in trace.meta.extra["routers_excluded"])
    assert trace.meta.num_layers == 2 and trace.meta.top_k == 2
    for t in range(2):                 # JetMoE's gate: top-k of its linear layer's logits
        for layer in range(2):
            mod, x = inputs[t * 2 + layer]
            chosen = torch.topk(mod.layer(x.reshape(-1, x.shape[-1])).float(), 2, -1).indices
            want = np.bincount(chosen[:16].numpy().ravel(), minlength=8)
            np.testing.assert_array_equal(trace.counts_TLRE[t, layer, 0], want)


@needs_transformers
def test_checkpoint_without_tokenizer_reads_text_as_bytes(tmp_path):
    from moesim.traces.record_hf import build_tiny_model

    ckpt = tmp_path / "ckpt"
    build_tiny_model("tiny-mixtral", seed=1).save_pretrained(ckpt)
    text = tmp_path / "notes.txt"
    text.write_bytes(bytes(range(256)) * 2)
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--hf-model", str(ckpt), "--text", str(text), "--ranks",
                 "2", "--tokens", "64", "--seq-len", "32", "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.num_passes == 512 // 128
    assert trace.meta.extra["tokenizer"].startswith("bytes modulo the vocabulary")
