"""ModelSpec's optional shape facts (heads, GQA, MLA, vocabulary, dense layers): the presets'
numbers agree with the parameter counts their comments derive, old specs compute what they did,
and inconsistent shapes are refused with a message naming the field."""

from __future__ import annotations

import pytest

from moesim.errors import MoesimError
from moesim.specs import ModelSpec, list_presets, load_cluster, load_model, spec_to_dict

BASE = dict(name="m", num_layers=2, hidden_size=1024, ffn_hidden_size=4096, num_experts=8,
            top_k=2)


def test_deepseek_v3_mla_weights_match_the_preset_derivation() -> None:
    m = load_model("deepseek-v3")
    assert m.is_mla and m.num_dense_layers == 3 and m.total_transformer_layers == 61
    # q_a 7168x1536 + q norm 1536 + q_b 1536x128x192 + kv_a 7168x576 + kv norm 512
    # + kv_b 512x128x256 + o 128x128x7168 (the preset comment: 187,105,280 + 2,048 norms)
    assert m.attention_params == 187_105_280 + 1536 + 512
    # the dense layers' FFN is 3 x 7168 x 18432 (SwiGLU), two RMSNorms 2 x 7168
    assert m.dense_layer_params == m.attention_params + 396_361_728 + 14_336


@pytest.mark.parametrize("name", ["deepseek-v3", "mixtral-8x7b-e8k2", "mixtral-8x7b-e16k4",
                                  "mixtral-8x22b-e8k2", "mixtral-8x22b-e16k4"])
def test_structured_counts_add_up_to_other_params(name: str) -> None:
    """Embedding + untied head + dense-only layers + final norm = the preset's other_params."""
    m = load_model(name)
    assert not m.tied_embeddings
    assert (m.embedding_params + m.output_head_params + m.num_dense_layers * m.dense_layer_params
            + m.final_norm_params) == m.other_params


@pytest.mark.parametrize("name", ["mixtral-8x7b-e8k2", "mixtral-8x22b-e16k4"])
def test_gqa_attention_weights_match_the_preset(name: str) -> None:
    """q, o: H x H; k, v: H x (8 KV heads x 128) -- the attention part of dense_params."""
    m = load_model(name)
    h = m.hidden_size
    assert m.attention_head_dim == 128 and m.num_query_groups == 8
    assert m.attention_params == 2 * h * h + 2 * h * 1024
    assert m.dense_params > m.attention_params  # plus router and norms


def test_megatron_mla_parameter_formula_agrees() -> None:
    """Megatron theoretical_memory_usage.py's MLA term (RMSNorm, norm_size 1): q_lora·(h +
    a·(qk + rope) + 1) + kv_lora·(h + a·(qk + v) + 1) + h·rope + a·v·h."""
    m = ModelSpec(**BASE, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=128,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    h, a = 1024, 16
    ref = 384 * (h + a * (64 + 32) + 1) + 128 * (h + a * (64 + 64) + 1) + h * 32 + a * 64 * h
    assert m.attention_params == ref
    no_q_lora = m.replace(q_lora_rank=0)
    assert no_q_lora.attention_params == ref - 384 * (h + a * 96 + 1) + h * a * 96


def test_defaults_keep_the_old_conventions() -> None:
    m = ModelSpec(**BASE)
    assert m.attention_params == 4 * 1024**2 == m.dense_params
    assert m.embedding_params == m.output_head_params == 0
    assert m.total_transformer_layers == 2
    with_heads = m.replace(num_attention_heads=16, vocab_size=1000)
    assert with_heads.dense_params == m.dense_params
    assert with_heads.attention_flops_per_token == m.attention_flops_per_token
    assert with_heads.total_params == m.total_params
    tied = with_heads.replace(tied_embeddings=True)
    assert tied.embedding_params == 1000 * 1024 and tied.output_head_params == 0


def test_spec_to_dict_omits_unset_shape_facts() -> None:
    d = spec_to_dict(ModelSpec(**BASE))
    assert "vocab_size" not in d and "tied_embeddings" not in d and "num_dense_layers" not in d
    d = spec_to_dict(ModelSpec(**BASE, vocab_size=5, tied_embeddings=True))
    assert d["vocab_size"] == 5 and d["tied_embeddings"] is True
    assert ModelSpec(**d) == ModelSpec(**BASE, vocab_size=5, tied_embeddings=True)


@pytest.mark.parametrize("bad,match", [
    (dict(num_kv_heads=8), "need num_attention_heads"),
    (dict(num_attention_heads=16, num_kv_heads=6), "num_kv_heads=6 must divide"),
    (dict(num_attention_heads=24), "not a multiple of num_attention_heads"),
    (dict(num_attention_heads=16, qk_rope_head_dim=64), "needs kv_lora_rank"),
    (dict(num_attention_heads=16, kv_lora_rank=64, qk_nope_head_dim=32), "needs qk_rope"),
    (dict(num_attention_heads=16, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
          v_head_dim=32, head_dim=64), "takes no head_dim"),
    (dict(vocab_size=-1), "vocab_size must be a number >= 0"),
    (dict(num_dense_layers=1.5), "num_dense_layers must be a whole number"),
    (dict(tied_embeddings="yes"), "tied_embeddings must be true or false"),
])
def test_inconsistent_shapes_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(MoesimError, match=match):
        ModelSpec(**BASE, **bad)


def test_head_dim_and_mla_with_hf_kv_heads_are_accepted() -> None:
    """head_dim may differ from H / heads (Qwen3-style); MLA tolerates HF's num_key_value_heads
    = num_attention_heads (DeepSeek's config.json says 128)."""
    m = ModelSpec(**BASE, num_attention_heads=24, head_dim=128, num_kv_heads=4)
    assert m.attention_params == 2 * 1024 * 24 * 128 + 2 * 1024 * 4 * 128
    ModelSpec(**BASE, num_attention_heads=16, num_kv_heads=16, kv_lora_rank=64,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def test_folded_dense_blocks_in_every_other_layer_presets() -> None:
    for name in ("gpt-moe-s", "gpt-moe-m", "gpt-moe-l", "hecate-gpt-moe-l", "hecate-bert-moe"):
        m = load_model(name)
        assert m.dense_blocks_per_moe_layer == 1 and m.tied_embeddings and m.num_attention_heads
    assert all(load_model(n).dense_blocks_per_moe_layer == 0
               for n in list_presets("models") if not n.startswith(("gpt-moe", "hecate-g",
                                                                    "hecate-b")))
    assert load_model("hecate-gpt-moe-s").dense_blocks_per_moe_layer == 0


def test_h800_cluster_preset() -> None:
    c = load_cluster("h800-256x8")
    assert c.world_size == 2048 and c.intra.bw_GBps == 160 and c.inter.bw_GBps == 50
    assert c.hardware.peak_flops == load_cluster("h100-32x8").hardware.peak_flops
