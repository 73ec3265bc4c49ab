"""Closed-form checks of moesim.memory_layout: activation memory per layer equals Korthikanti
et al. Table 2 in every case, selective recompute removes exactly its module's term, the
in-flight micro-batch counts match the schedules' own step lists, and ZeRO 0-3 memory equals
the bytes-per-parameter formulas."""

from __future__ import annotations

import pytest

from moesim.errors import MoesimError
from moesim.memory_layout import (
    ActivationSplit,
    AttentionDims,
    attention_bytes,
    attention_dims,
    embedding_bytes,
    expert_row_bytes,
    full_recompute_layer_bytes,
    in_flight_micro_batches,
    interleaved_memory_penalty,
    layernorm_bytes,
    mlp_bytes,
    moe_token_bytes,
    output_layer_bytes,
    stage_dense_params,
    state_bytes_per_param,
    zero3_gather_bytes,
)
from moesim.pipeline import schedule_steps
from moesim.specs import ModelSpec, load_model

S, B, H, A = 2048, 2, 1024, 16       # Table 2's symbols
T = S * B
MHA = AttentionDims(hidden=H, heads=A, q=H, k=H, v=H, o=H)


def layer(split: ActivationSplit, ffn: int = 4 * H, gated: bool = False) -> float:
    """One dense transformer layer (attention + norms + MLP) by the module's functions."""
    return (attention_bytes(T, S, MHA, split) + layernorm_bytes(T, H, split)
            + mlp_bytes(T, H, ffn, gated, split))


SBH = S * B * H
SCORES = 5 * A * S / H


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_table2_every_case(t: int) -> None:
    sel = ("core_attn",)
    assert layer(ActivationSplit()) == SBH * (34 + SCORES)
    assert layer(ActivationSplit(t=t)) == pytest.approx(SBH * (10 + 24 / t + SCORES / t),
                                                        rel=1e-12)
    if t > 1:
        assert layer(ActivationSplit(t=t, sp=True)) == pytest.approx(
            SBH * (34 + SCORES) / t, rel=1e-12)
        assert layer(ActivationSplit(t=t, sp=True, modules=sel)) == pytest.approx(
            SBH * 34 / t, rel=1e-12)
    assert layer(ActivationSplit(t=t, modules=sel)) == pytest.approx(SBH * (10 + 24 / t),
                                                                     rel=1e-12)
    assert full_recompute_layer_bytes(T, H, ActivationSplit(t=t)) == 2 * SBH


def test_table2_split_into_attention_mlp_and_norms() -> None:
    """34 = attention 11 (+ 5as/h scores) + MLP 19 + LayerNorms 4."""
    none = ActivationSplit()
    assert attention_bytes(T, S, MHA, none) == SBH * (11 + SCORES)
    assert mlp_bytes(T, H, 4 * H, False, none) == 19 * SBH
    assert layernorm_bytes(T, H, none) == 4 * SBH
    assert attention_bytes(T, S, MHA, ActivationSplit(flash=True)) == 11 * SBH


def test_general_ffn_and_gating() -> None:
    """Per token b·(h + 2F) + h plain, b·(h + 3F) + h gated (SwiGLU keeps 2F + F)."""
    none = ActivationSplit()
    assert mlp_bytes(T, H, 3000, False, none) == T * (2 * (H + 2 * 3000) + H)
    assert mlp_bytes(T, H, 3000, True, none) == T * (2 * (H + 3 * 3000) + H)
    # TP splits only the intermediates without SP
    assert mlp_bytes(T, H, 3000, True, ActivationSplit(t=4)) == T * (3 * H + 6 * 3000 / 4)


@pytest.mark.parametrize("c", [2, 4])
def test_cp_divides_sequence_dependent_terms(c: int) -> None:
    sp_sel = ActivationSplit(t=2, sp=True, modules=("core_attn",), c=c)
    assert layer(sp_sel) == pytest.approx(SBH * 34 / (2 * c), rel=1e-12)
    full_scores = layer(ActivationSplit(c=c)) - layer(ActivationSplit(c=c, flash=True))
    assert full_scores == pytest.approx(5 * A * S * S * B / c, rel=1e-12)


def test_selective_modules_remove_their_terms() -> None:
    base = ActivationSplit(t=2)
    def minus(*mods: str) -> float:
        return layer(base) - layer(ActivationSplit(t=2, modules=mods))
    assert minus("core_attn") == pytest.approx(SCORES / 2 * SBH, rel=1e-12)
    assert minus("mlp") == pytest.approx(16 / 2 * SBH, rel=1e-12)       # the 4h intermediates
    assert minus("layernorm") == pytest.approx(4 * SBH, rel=1e-12)      # both norms' outputs
    assert minus("moe_act") == minus("moe") == 0.0                      # not in a dense layer


def test_moe_terms_follow_the_rows_and_recompute() -> None:
    F, E = 1536, 64
    none, act, moe = (ActivationSplit(modules=m) for m in ((), ("moe_act",), ("moe",)))
    assert expert_row_bytes(H, F, True, none) == 2 * (H + 3 * F)
    assert expert_row_bytes(H, F, True, act) == 2 * (H + 2 * F)
    assert expert_row_bytes(H, F, False, act) == 2 * (H + F)
    assert expert_row_bytes(H, F, True, moe) == 0.0
    assert expert_row_bytes(H, F, True, ActivationSplit(et=4)) == 2 * (H + 3 * F / 4)
    assert moe_token_bytes(T, H, E, 0, True, none) == T * (3 * H + 4 * E)
    assert moe_token_bytes(T, H, E, F, True, moe) == T * 3 * H      # input + mask only
    assert moe_token_bytes(T, H, E, F, True, ActivationSplit(t=4, sp=True)) == pytest.approx(
        T * ((3 * H + 4 * E) / 4 + 2 * 3 * F / 4), rel=1e-12)


def test_mla_and_gqa_attention_widths() -> None:
    ds = load_model("deepseek-v3")
    dims = attention_dims(ds)
    assert (dims.q, dims.k, dims.v, dims.o) == (128 * 192, 128 * 192, 128 * 128, 128 * 128)
    assert dims.latent == 2 * 1536 + 2 * 512 + 64
    flash = ActivationSplit(flash=True)
    up = attention_bytes(T, S, dims, flash) - attention_bytes(
        T, S, dims, ActivationSplit(flash=True, modules=("mla_up_proj",)))
    assert up == T * 2 * (dims.q + dims.k + dims.v)
    mix = attention_dims(load_model("mixtral-8x7b-e8k2"))
    assert (mix.q, mix.k, mix.v, mix.o) == (4096, 1024, 1024, 4096)
    with pytest.raises(MoesimError, match="num_attention_heads"):
        attention_bytes(T, S, AttentionDims(hidden=H, heads=0, q=H, k=H, v=H, o=H),
                        ActivationSplit())


def test_embedding_and_output_layer() -> None:
    sp = ActivationSplit(t=4, sp=True)
    assert embedding_bytes(T, H, ActivationSplit()) == 8 * T + SBH
    assert embedding_bytes(T, H, sp) == 8 * T + SBH / 4
    assert output_layer_bytes(T, H, 50000, sp) == pytest.approx(
        4 * SBH * (1 + 50000 / H) / 4, rel=1e-12)


def _max_outstanding(name: str, stage: int, p: int, m: int, v: int, overlap: bool) -> float:
    """Peak number of forwarded-but-not-backwarded chunk passes in the schedule's steps."""
    live = peak = 0
    for step in schedule_steps(name, stage, p, m, v, overlap):
        kinds = ["F", "B"] if step.kind == "FB" else [step.kind]
        for kind in kinds:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
    return peak / v


@pytest.mark.parametrize("name,p,m,v", [("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("1f1b", 1, 4, 1),
                                        ("gpipe", 4, 8, 1), ("interleaved", 4, 8, 2),
                                        ("interleaved", 2, 8, 3), ("interleaved", 4, 4, 2)])
@pytest.mark.parametrize("overlap", [False, True])
def test_in_flight_matches_the_schedules(name: str, p: int, m: int, v: int,
                                         overlap: bool) -> None:
    if name == "gpipe" and overlap:
        return
    for i in range(p):
        assert in_flight_micro_batches(name, p, i, m, v, overlap) == pytest.approx(
            _max_outstanding(name, i, p, m, v, overlap)), i


def test_1f1b_and_interleaved_closed_forms() -> None:
    assert [in_flight_micro_batches("1f1b", 4, i, 8) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches("1f1b", 8, 0, 3) == 3
    assert in_flight_micro_batches("gpipe", 4, 2, 8) == 8
    for p, v in ((4, 2), (8, 4), (16, 2)):
        assert in_flight_micro_batches("interleaved", p, 0, 64, v) == pytest.approx(
            p * interleaved_memory_penalty(p, v))
    with pytest.raises(MoesimError, match="schedule"):
        in_flight_micro_batches("zb", 2, 0, 2)


@pytest.mark.parametrize("d", [1, 4, 64])
def test_zero_stages_bytes_per_parameter(d: int) -> None:
    bw, bg, bo = 2.0, 4.0, 12.0
    assert state_bytes_per_param(0, bw, bg, bo, d) == (bw, bg, bo)
    assert state_bytes_per_param(1, bw, bg, bo, d) == (bw, bg, bo / d)
    assert state_bytes_per_param(2, bw, bg, bo, d) == (bw, bg / d, bo / d)
    assert state_bytes_per_param(3, bw, bg, bo, d) == (bw / d, bg / d, bo / d)
    assert sum(state_bytes_per_param(0, bw, bg, bo, d)) == 18           # Megatron, no dist-opt
    assert sum(state_bytes_per_param(1, bw, bg, bo, d)) == 6 + 12 / d   # distributed optimizer
    with pytest.raises(MoesimError, match="ZeRO"):
        state_bytes_per_param(4, bw, bg, bo, d)


def test_zero3_gather_buffers_and_stage_params() -> None:
    assert zero3_gather_bytes([1.0, 5.0, 2.0, 4.0], 2.0) == 14.0  # largest pair 5 + 2, x 2 B
    assert zero3_gather_bytes([3.0], 2.0) == 6.0
    assert zero3_gather_bytes([], 2.0) == 0.0
    m = ModelSpec(name="m", num_layers=4, hidden_size=H, ffn_hidden_size=4 * H, num_experts=8,
                  top_k=2, num_attention_heads=A, vocab_size=1000, num_dense_layers=2,
                  dense_ffn_hidden_size=2 * H)
    emb = 1000 * H
    assert stage_dense_params(m, 2, 0, True, False, 2) == 2 * m.dense_layer_params + emb
    assert stage_dense_params(m, 0, 4, False, True, 2) == 4 * m.dense_params + H + emb
    tied = m.replace(tied_embeddings=True)
    assert stage_dense_params(tied, 0, 4, False, True, 2) == 4 * m.dense_params + H + emb
    assert stage_dense_params(tied, 2, 4, True, True, 1) == (2 * m.dense_layer_params
                                                             + 4 * m.dense_params + emb + H)


def test_split_validation() -> None:
    with pytest.raises(MoesimError, match="recompute module"):
        ActivationSplit(modules=("attn",))
    with pytest.raises(MoesimError, match="ActivationSplit.t"):
        ActivationSplit(t=0)
