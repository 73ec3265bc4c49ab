"""moesim.memory_stage: per-stage, per-rank assembly — the hot rank's expert activations show,
stages hold the schedule's in-flight micro-batches, recompute and ZeRO act as their formulas
say, the default layout keeps memory.py's state numbers, and the table names the peak."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import memory_layout as ml
from moesim.layout import ParallelLayout
from moesim.memory import default_footprint, dynamic_memory
from moesim.memory_stage import (
    dense_layer_act_bytes,
    expert_state_from_footprint,
    expert_state_zero,
    moe_layer_fixed_bytes,
    stage_memory,
    stage_memory_table,
)
from moesim.placement import Decision, Placement
from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec
from moesim.stages import Stage

H, F, E, K, T = 512, 1024, 8, 2, 1024
MODEL = ModelSpec(name="m", num_layers=4, hidden_size=H, ffn_hidden_size=F, num_experts=E,
                  top_k=K, seq_len=512, tokens_per_rank=T, micro_batches=4,
                  num_attention_heads=8, vocab_size=1000)


def _stage(index: int, layers: list[int], n: int, dense: int = 0,
           chunks: int = 1) -> Stage:
    parts = np.array_split(np.array(layers), chunks)
    return Stage(index=index, first_rank=index * n, num_ranks=n, num_dense_layers=dense,
                 chunks=tuple(tuple(int(x) for x in c) for c in parts))


def _uniform_rows(m: int, layers: int, n: int) -> np.ndarray:
    return np.full((m, layers, n), float(T * K))


def _mem(layout: ParallelLayout, stage: Stage, num_stages: int, rows: np.ndarray,
         model: ModelSpec = MODEL, m: int = 4, **kw) -> dict[str, np.ndarray]:
    return stage_memory(model=model, layout=layout, stage=stage, num_stages=num_stages,
                        micro_batches=m, tokens=T, expert_state_R={}, rows_MLR=rows, **kw).gpu


def test_hot_rank_needs_more_activation_memory_and_the_table_names_it() -> None:
    n = 4
    rows = _uniform_rows(4, 2, n)
    rows[2, 1, 3] *= 3                       # micro-batch 2, second layer: rank 3 is hot
    st = stage_memory(model=MODEL, layout=ParallelLayout(), stage=_stage(0, [0, 1], n),
                      num_stages=1, micro_batches=4, tokens=T, expert_state_R={},
                      rows_MLR=rows)
    acts = st.gpu["activations"]
    row_b = ml.expert_row_bytes(H, F, True, ml.ActivationSplit(flash=True))
    assert acts[3] - acts[0] == pytest.approx(2 * T * K * row_b)
    assert st.peak_rank == 3
    table = stage_memory_table([st], 80 * 2**30)
    assert "peak: stage 0, rank 3" in table and "fits" in table


def test_1f1b_stages_hold_p_minus_i_micro_batches() -> None:
    p, n, m = 4, 2, 8
    layout = ParallelLayout(pp=p)
    split = ml.ActivationSplit(flash=True)
    per_mb = moe_layer_fixed_bytes(MODEL, T, split) + T * K * ml.expert_row_bytes(
        H, F, True, split)
    ends = {0: ml.embedding_bytes(T, H, split), p - 1: ml.output_layer_bytes(T, H, 1000, split)}
    for i in range(p):
        acts = _mem(layout, _stage(i, [i], n), p, _uniform_rows(m, 1, n), MODEL, m)
        expected = (per_mb + ends.get(i, 0.0)) * (p - i)
        assert acts["activations"] == pytest.approx(np.full(n, expected), rel=1e-12)


def test_full_recompute_keeps_layer_inputs_and_one_working_layer() -> None:
    n = 2
    full = _mem(ParallelLayout(recompute="full"), _stage(0, [0, 1, 2], n), 1,
                _uniform_rows(4, 3, n))["activations"]
    split = ml.ActivationSplit(flash=True)
    layer = moe_layer_fixed_bytes(MODEL, T, split) + T * K * ml.expert_row_bytes(H, F, True,
                                                                                split)
    ends = ml.embedding_bytes(T, H, split) + ml.output_layer_bytes(T, H, 1000, split)
    assert full == pytest.approx(np.full(n, 3 * 2 * T * H + ends + layer), rel=1e-12)
    block = _mem(ParallelLayout(recompute="full", recompute_num_layers=1),
                 _stage(0, [0, 1, 2], n), 1, _uniform_rows(4, 3, n))["activations"]
    assert block == pytest.approx(np.full(n, 2 * T * H + 2 * layer + ends + layer), rel=1e-12)


def test_selective_moe_act_removes_the_activation_outputs() -> None:
    n = 2
    rows = _uniform_rows(4, 2, n)
    base = _mem(ParallelLayout(), _stage(0, [0, 1], n), 1, rows)["activations"]
    act = _mem(ParallelLayout(recompute="selective", recompute_modules=("moe_act",)),
               _stage(0, [0, 1], n), 1, rows)["activations"]
    assert base - act == pytest.approx(np.full(n, 2 * T * K * 2 * F))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stages_on_a_stage(zero: int) -> None:
    n, t = 8, 2
    layout = ParallelLayout(tp=t, sp=True, zero=zero, ep=4)
    experts_R = np.full(n, 2 * MODEL.params_per_expert * 2.0)
    edp = 2
    st = stage_memory(model=MODEL, layout=layout, stage=_stage(0, [0, 1], n), num_stages=1,
                      micro_batches=4, tokens=T,
                      expert_state_R=expert_state_zero(experts_R, MODEL, zero, edp, 2),
                      rows_MLR=_uniform_rows(4, 2, n))
    dense = ml.stage_dense_params(MODEL, 0, 2, True, True, 1) / t
    bw, bg, bo = ml.state_bytes_per_param(zero, 2.0, 2.0, 12.0, n // t)
    ew, eg, eo = ml.state_bytes_per_param(zero, 2.0, 2.0, 12.0, edp)
    assert st.gpu["weights"] == pytest.approx(np.full(n, dense * bw + experts_R[0] * ew))
    assert st.gpu["grads"] == pytest.approx(np.full(n, dense * bg + experts_R[0] * eg))
    assert st.gpu["optimizer"] == pytest.approx(np.full(n, dense * bo + experts_R[0] * eo))
    gather = st.gpu["param_gather"]
    assert gather == pytest.approx(np.full(n, 2 * MODEL.dense_params / t * 2.0 if zero == 3
                                           else 0.0))
    if zero == 3:   # the stage's two MoE layers' experts, both gathered (compute + prefetch)
        assert st.gpu["expert_gather"] == pytest.approx(experts_R * 2.0)
        four = expert_state_zero(experts_R, MODEL, 3, edp, num_layers=4)["expert_gather"]
        assert four == pytest.approx(experts_R / 2 * 2.0)
    else:
        assert "expert_gather" not in st.gpu


def _cluster(world: int) -> Cluster:
    link = LinkLevel(bw_GBps=100.0, latency_s=1e-6)
    return Cluster(name="c", num_nodes=1, gpus_per_node=world, intra=link, inter=link,
                   host=link, gpu_memory_GiB=80.0,
                   hardware=HardwareProfile(name="h", peak_flops=1e14, mem_bw_GBps=1000.0))


def test_default_layout_keeps_memory_py_state_and_documented_activation_terms() -> None:
    """tp = pp = cp = 1, zero None: weights/grads/optimizer are static EP's footprint plus the
    embedding, output head and final norm (which memory.py leaves out); activations are
    memory.py's plus each MoE block's input and dropout mask (3·T·H per layer) and the
    embedding / output layer."""
    R, L = 4, MODEL.num_layers
    phy = np.tile(np.arange(E), (L, 1))
    decision = Decision(placement=Placement(phy, R, E // R, E))
    gpu, _ = default_footprint(decision, MODEL, _cluster(R))
    rows = np.random.default_rng(0).integers(100, 900, size=(4, L, R)).astype(float)
    st = stage_memory(model=MODEL, layout=ParallelLayout(), stage=_stage(0, list(range(L)), R),
                      num_stages=1, micro_batches=4, tokens=T,
                      expert_state_R=expert_state_from_footprint(gpu, MODEL, R),
                      rows_MLR=rows)
    ends = MODEL.embedding_params + MODEL.output_head_params + MODEL.final_norm_params
    for key, b in (("weights", 2.0), ("grads", 2.0), ("optimizer", 12.0 / R)):
        assert st.gpu[key] == pytest.approx(gpu[key] + ends * b, rel=1e-12)
    unknown_vocab = MODEL.replace(vocab_size=0)
    st0 = stage_memory(model=unknown_vocab, layout=ParallelLayout(),
                       stage=_stage(0, list(range(L)), R), num_stages=1, micro_batches=4,
                       tokens=T, expert_state_R=expert_state_from_footprint(gpu, MODEL, R),
                       rows_MLR=rows)
    for key, b in (("weights", 2.0), ("grads", 2.0), ("optimizer", 12.0 / R)):
        assert st0.gpu[key] == pytest.approx(gpu[key] + H * b, rel=1e-12)  # + final norm
    old = dynamic_memory(rows.reshape(4, L, R, 1).repeat(E // R, axis=3).reshape(4, L, -1)
                         / (E // R), np.zeros((4, L, R)), MODEL, decision.placement)
    split = ml.ActivationSplit(flash=True)
    extra = L * 3 * T * H + ml.embedding_bytes(T, H, split) + ml.output_layer_bytes(
        T, H, 1000, split)
    assert st.gpu["activations"] == pytest.approx(old["activations"] + extra, rel=1e-12)
    assert st.gpu["a2a_buffers"] == pytest.approx(old["a2a_buffers"], rel=1e-12)


def test_dense_layers_first_and_interleaved_chunks() -> None:
    model = MODEL.replace(num_dense_layers=2, dense_ffn_hidden_size=2048)
    n, p, v, m = 2, 2, 2, 4
    layout = ParallelLayout(pp=p, vpp=v, pp_schedule="interleaved")
    stage = Stage(index=0, first_rank=0, num_ranks=n, num_dense_layers=2,
                  chunks=((0,), (2, 3)))       # chunk 0: a dense layer; chunk 1: two MoE
    rows = _uniform_rows(m, 2, n)
    acts = _mem(layout, stage, p, rows, model, m)["activations"]
    split = ml.ActivationSplit(flash=True)
    dense = dense_layer_act_bytes(model, T, split) + ml.embedding_bytes(T, H, split)
    moe2 = 2 * (moe_layer_fixed_bytes(model, T, split)
                + T * K * ml.expert_row_bytes(H, F, True, split))
    # stage 0 warm-up (p-1)*2 + (v-1)*p = 4 forwards, then one more: chunk 0 of mb 0, 1, then
    # chunk 1 of mb 0, 1, then chunk 0 of mb 2 -> 3 dense chunk passes + 2 MoE chunk passes
    assert acts == pytest.approx(np.full(n, 3 * dense + 2 * moe2))


def test_rows_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="rows_MLR"):
        _mem(ParallelLayout(), _stage(0, [0, 1], 2), 1, np.zeros((4, 3, 2)))
