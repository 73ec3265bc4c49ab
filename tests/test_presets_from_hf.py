"""moesim presets from-hf: a ModelSpec TOML from a Hugging Face config.json.

The configs below carry the published values of each model's config.json; the shipped presets
were written by hand from the same files, so the derived counts must equal theirs exactly.
"""

from __future__ import annotations

import json

import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.presets_hf import hf_fields, moe_layer_ids, write_preset
from moesim.specs import load_model

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False,
    "max_position_embeddings": 163840, "hidden_act": "silu"}
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "hidden_act": "silu"}
QWEN2_MOE = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False}
QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "tie_word_embeddings": False}
OLMOE = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
    "tie_word_embeddings": False}


def write_config(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cfg, preset, seq", [(DEEPSEEK_V3, "deepseek-v3", 4096),
                                               (MIXTRAL_8X7B, "mixtral-8x7b-e8k2", 8192)])
def test_from_hf_reproduces_the_hand_written_presets(tmp_path, cfg, preset, seq):
    out = write_preset(write_config(tmp_path, cfg), tmp_path / "m.toml", seq_len=seq)
    got, want = load_model(out), load_model(preset)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
                  "gated", "seq_len", "num_shared_experts", "dense_flops_per_token",
                  "dense_params_per_layer", "other_params", "num_attention_heads",
                  "num_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "vocab_size", "tied_embeddings",
                  "num_dense_layers", "dense_ffn_hidden_size"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.total_params == want.total_params


@pytest.mark.parametrize("cfg, layers, experts, k, F, shared", [
    (QWEN2_MOE, 24, 60, 4, 1408, 4), (QWEN3_MOE, 48, 128, 8, 768, 0),
    (OLMOE, 16, 64, 8, 1024, 0)])
def test_from_hf_other_families(tmp_path, cfg, layers, experts, k, F, shared):
    spec = load_model(write_preset(write_config(tmp_path, cfg), tmp_path / "q.toml"))
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.ffn_hidden_size,
            spec.num_shared_experts) == (layers, experts, k, F, shared)
    assert spec.seq_len == 4096 and spec.name == "q"
    assert spec.num_attention_heads == cfg["num_attention_heads"]
    assert spec.num_kv_heads == cfg["num_key_value_heads"]
    assert spec.vocab_size == cfg["vocab_size"] and spec.head_dim == cfg.get("head_dim", 0)


def test_every_value_names_its_source(tmp_path):
    text = write_preset(write_config(tmp_path, DEEPSEEK_V3), tmp_path / "d.toml").read_text()
    lines = text.splitlines()
    values = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("#")]
    for i in values[2:]:                       # description, source come first
        assert lines[i - 1].startswith("# "), lines[i]
    assert "first_k_dense_replace 3" in text and "n_routed_experts" in text
    assert "max_position_embeddings = 163840 is the context limit" in text


def test_dense_layer_rules():
    assert moe_layer_ids(dict(QWEN3_MOE, num_hidden_layers=6, mlp_only_layers=[0, 5]))[0] == \
        [1, 2, 3, 4]
    assert moe_layer_ids(dict(QWEN3_MOE, num_hidden_layers=6, decoder_sparse_step=2))[0] == \
        [1, 3, 5]
    assert moe_layer_ids(dict(DEEPSEEK_V3, num_hidden_layers=8, moe_layer_freq=2))[0] == \
        [4, 6]
    fields = {f.name: f.value for f in hf_fields(dict(QWEN3_MOE, num_hidden_layers=6,
                                                      mlp_only_layers=[0]))}
    assert fields["num_layers"] == 5


def test_from_hf_cli_and_errors(tmp_path, capsys):
    cfg = write_config(tmp_path, MIXTRAL_8X7B)
    out = tmp_path / "mix.toml"
    assert main(["presets", "from-hf", str(cfg), "-o", str(out), "--seq-len", "2048"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_model(out).seq_len == 2048
    dense = write_config(tmp_path, {"model_type": "llama", "hidden_size": 8,
                                    "num_hidden_layers": 2}, "dense.json")
    assert main(["presets", "from-hf", str(dense), "-o", str(out)]) == 2
    assert "MoE" in capsys.readouterr().err
    assert main(["presets", "from-hf", str(tmp_path / "none.json"), "-o", str(out)]) == 2
    assert main(["presets", "from-hf", str(cfg)]) == 2
    with pytest.raises(MoesimError, match="top_k"):
        write_preset(write_config(tmp_path, dict(MIXTRAL_8X7B, num_experts_per_tok=9)),
                     tmp_path / "bad.toml")
