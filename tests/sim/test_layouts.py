"""Parallel layouts in the simulator: parsing and refusals, closed-form pipeline bubbles, the
TP/SP/CP/ZeRO collectives per layer, recompute, overlap, and exactness of the default."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.layout import ParallelLayout, list_layout_presets, load_layout, parse_layout
from moesim.ops import AllGather, AllReduce, Compute, ReduceScatter, SendRecv
from moesim.pipeline import bubble_fraction
from moesim.policies.base import available_policies
from moesim.simulate import simulate
from moesim.specs import load_cluster, load_model

from .layouttoys import (
    free_comm_cluster,
    lower_one,
    pipeline_bubble,
    uniform_model,
    uniform_trace,
)
from .simtoys import random_trace


# -- parsing and refusals ---------------------------------------------------------------------
def test_parse_forms() -> None:
    lay = parse_layout("tp=8,ep=8,sp=true,zero=1")
    assert (lay.tp, lay.ep, lay.sp, lay.zero, lay.whole_model) == (8, 8, True, 1, True)
    assert parse_layout("recompute=full").recompute == "full"
    assert parse_layout("recompute=full").tp == parse_layout("recompute=full").pp == 1
    assert parse_layout(None) == ParallelLayout() and ParallelLayout().is_default
    for name in list_layout_presets():
        preset = load_layout(name)
        assert preset.source, f"preset {name} names its source"
        over = parse_layout(f"{name},recompute=full")
        assert over.recompute == "full" and over.tp == preset.tp


@pytest.mark.parametrize("text, needle", [
    ("tp=2,bogus=1", "unknown key 'bogus'"),
    ("tp=x", "must be an integer"),
    ("sp=maybe", "sp=true or sp=false"),
    ("vpp=2,pp=2", "needs pp_schedule=interleaved"),
    ("sp=true", "no effect with tp=1"),
    ("zero=5", "use 0, 1, 2 or 3"),
    ("recompute=sometimes", "use one of none, selective, full"),
    ("recompute_num_layers=2", "goes with recompute=full"),
    ("recompute=selective,recompute_modules=attn", "recompute_modules"),
    ("pp=1,pp_schedule=gpipe", "needs pp > 1"),
])
def test_bad_layouts_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(MoesimError, match=None) as exc:
        parse_layout(text)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("text, needle", [
    ("tp=3", "does not divide the world size"),
    ("tp=2,tp_cross_node=false,ep=4", "needs sp=true"),
    ("pp=2,vpp=2,pp_schedule=interleaved", "multiple of pp=2"),
])
def test_layouts_refused_against_the_run(text: str, needle: str) -> None:
    model = uniform_model(4, 4, micro_batches=3)
    trace = uniform_trace(4, 4, 4, micro_batches=3)
    with pytest.raises(MoesimError) as exc:
        simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout(text))
    assert needle in str(exc.value)


def test_tp_across_nodes_needs_saying_so() -> None:
    model, trace = uniform_model(4, 8), uniform_trace(8, 4, 8, micro_batches=4)
    with pytest.raises(MoesimError, match="tp_cross_node=true"):
        simulate(trace, model, free_comm_cluster(2, 4), "static_ep", progress=False,
                 layout=parse_layout("tp=8,sp=true"))
    simulate(trace, model, free_comm_cluster(2, 4), "static_ep", progress=False,
             layout=parse_layout("tp=8,sp=true,tp_cross_node=true"))


def test_trace_must_match_a_stage() -> None:
    model, trace = uniform_model(4, 4), uniform_trace(4, 4, 4, micro_batches=4)
    with pytest.raises(MoesimError, match="trace regroup --ranks 2"):
        simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout("pp=2"))


# -- the default layout is exactly what moesim did before layouts -------------------------------
def test_default_layout_changes_nothing() -> None:
    """The default layout takes the pre-layout path; lowered through the stage machinery it
    gives the same ops in the same order and the same schedule."""
    from moesim.stages import plan_layout

    model = uniform_model(2, 4, tokens=64, micro_batches=2)
    trace = random_trace(2, layers=2, ranks=4, experts=4)
    cluster = free_comm_cluster(2, 2)
    drop = ("planner_time_s",)  # the planner's own wall time
    for pol in ("static_ep", "laer_fsep", "swiftmoe"):
        a = simulate(trace, model, cluster, pol, progress=False)
        b = simulate(trace, model, cluster, pol, progress=False,
                     layout=parse_layout("whole_model=false"))
        assert [{k: v for k, v in r.items() if k not in drop} for r in a.rows] == \
            [{k: v for k, v in r.items() if k not in drop} for r in b.rows]
        ctx, sched, _ = lower_one(ParallelLayout(), trace, model, cluster, pol)
        plan = plan_layout(ParallelLayout(), cluster, model, 2)
        ctx2, sched2, _ = _lower_with_plan(plan, trace, model, cluster, pol)
        assert [type(o).__name__ + o.phase + o.label for o in ctx.program.ops] == \
            [type(o).__name__ + o.phase + o.label for o in ctx2.program.ops]
        assert np.array_equal(sched.end_OR, sched2.end_OR, equal_nan=True)


def _lower_with_plan(plan, trace, model, cluster, policy):
    from moesim import simulate as sim

    pol = sim._policy(policy)
    run = sim._Run(trace, model, cluster, pol, 0, True, sim.CostModel(cluster))
    dec, counts = sim.decide_iteration(pol, trace.counts_TLRE, 2, 0, None, model, cluster, 0)
    ctx = sim.lower_iteration_ctx(pol, dec, None, counts, model, cluster,
                                  plan=sim._plan(run, dec), cache=run.cache, layout_plan=plan)
    d = run.cost.durations(ctx.program)
    return ctx, sim.schedule(ctx.program.ops, d, cluster.world_size), d


# -- pipelines: bubbles come out of the engine ----------------------------------------------------
@pytest.mark.parametrize("schedule, p, m, v", [
    ("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 4, 1), ("gpipe", 4, 4, 1),
    ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2),
])
def test_bubble_fraction_closed_form(schedule: str, p: int, m: int, v: int) -> None:
    layers = 2 * p * v
    model = uniform_model(layers, 4, micro_batches=m)
    trace = uniform_trace(1, layers, 4, micro_batches=m)
    text = f"pp={p},pp_schedule={schedule}" + (f",vpp={v}" if v > 1 else "")
    ctx, sched, dur = lower_one(parse_layout(text + ",whole_model=false"), trace, model,
                                free_comm_cluster(p, 1))
    for rank in range(p):
        assert pipeline_bubble(ctx, sched, dur, rank) == pytest.approx(
            bubble_fraction(schedule, p, m, v), rel=1e-6)


def test_stage_sends_per_boundary() -> None:
    p, m = 4, 6
    model = uniform_model(8, 4, micro_batches=m)
    ctx, _, _ = lower_one(parse_layout(f"pp={p},whole_model=false"),
                          uniform_trace(2, 8, 4, micro_batches=m), model, free_comm_cluster(4, 2))
    sends = [op for op in ctx.program.ops if op.phase == "pp_send"]
    assert len(sends) == 2 * m * (p - 1)  # one activation and one gradient per boundary
    act = model.tokens_per_rank * model.hidden_size * model.bytes_activation
    assert all(isinstance(op, SendRecv) and np.all(op.bytes_N == act) for op in sends)


# -- TP / SP / CP collectives per layer -------------------------------------------------------
def _tp_ops(ctx, layer: int, mb: int, direction: str) -> list:
    return [op for op in ctx.program.ops if op.label.startswith("tp_") and op.layer == layer
            and op.micro_batch == mb and op.direction == direction]


@pytest.mark.parametrize("sp", [True, False])
def test_tp_bytes_per_layer_megatron(sp: bool) -> None:
    """Megatron: per transformer layer 2 all-reduces of ``s·b·h`` forward and 2 backward;
    with SP each becomes an all-gather + reduce-scatter of the same bytes. MoE layers keep the
    attention block's pair (the MoE itself routes each rank's own tokens)."""
    t = 2
    model = uniform_model(2, 4, micro_batches=2, num_dense_layers=1, num_attention_heads=4)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    text = f"tp={t}" + (",sp=true" if sp else ",ep=1")
    ctx, _, _ = lower_one(parse_layout(text), trace, model, free_comm_cluster(1, 4))
    sbh = model.tokens_per_rank * t * model.hidden_size * model.bytes_activation  # (s/c)·b·h
    dense_fwd = [op for op in ctx.program.ops if op.label.startswith("tp_") and op.layer == -1
                 and op.micro_batch == 0 and op.direction == "fwd"]
    moe_fwd, moe_bwd = _tp_ops(ctx, 0, 0, "fwd"), _tp_ops(ctx, 0, 0, "bwd")
    kinds = (AllGather, ReduceScatter) if sp else (AllReduce,)
    assert len(dense_fwd) == (4 if sp else 2)
    assert len(moe_fwd) == len(moe_bwd) == (2 if sp else 1)
    for op in dense_fwd + moe_fwd + moe_bwd:
        assert isinstance(op, kinds) and np.all(op.bytes_G == sbh)
        assert all(len(g) == t for g in op.groups)


def test_cp_ring_steps() -> None:
    c = 4
    model = uniform_model(1, 4, micro_batches=1, tokens=64, num_attention_heads=4,
                          num_kv_heads=2)
    ctx, _, _ = lower_one(parse_layout(f"cp={c}"), uniform_trace(4, 1, 4, micro_batches=1),
                          model, free_comm_cluster(1, 4))
    fwd = [op for op in ctx.program.ops if op.label.startswith("cp_ring") and
           op.direction == "fwd"]
    bwd = [op for op in ctx.program.ops if op.label.startswith("cp_ring") and
           op.direction == "bwd"]
    assert len(fwd) == len(bwd) == c - 1
    kv = 2 * 2 * (model.hidden_size // 4)  # K and V of 2 query groups
    per_rank = model.tokens_per_rank * kv * model.bytes_activation
    assert np.all(fwd[0].bytes_N == per_rank) and np.all(bwd[0].bytes_N == 2 * per_rank)
    assert sorted(fwd[0].dst_N.tolist()) == list(range(4))  # a ring: every rank receives once


# -- recompute and ZeRO -----------------------------------------------------------------------
def _compute_flops(ctx, pred) -> float:
    return sum(float(np.sum(op.flops_R)) for op in ctx.program.ops
               if isinstance(op, Compute) and pred(op))


def test_full_recompute_adds_exactly_one_forward() -> None:
    model = uniform_model(4, 4, micro_batches=2)
    trace = random_trace(1, layers=4, ranks=4, experts=4, tokens=64)
    base, _, _ = lower_one(parse_layout("whole_model=false"), trace, model,
                           free_comm_cluster(1, 4))
    rc, _, _ = lower_one(parse_layout("recompute=full,whole_model=false"), trace, model,
                         free_comm_cluster(1, 4))
    fwd = _compute_flops(base, lambda op: op.direction == "fwd")
    assert _compute_flops(rc, lambda op: op.label == "recompute") == pytest.approx(fwd)
    n_a2a = sum(op.phase in ("dispatch", "combine") for op in base.program.ops)
    assert sum(op.phase in ("dispatch", "combine") for op in rc.program.ops) == n_a2a * 3 // 2
    part, _, _ = lower_one(parse_layout("recompute=full,recompute_num_layers=1,"
                                        "whole_model=false"), trace, model,
                           free_comm_cluster(1, 4))
    one = _compute_flops(part, lambda op: op.label == "recompute")
    assert 0 < one < fwd


def test_selective_core_attn_recomputes_the_scores() -> None:
    model = uniform_model(2, 4, micro_batches=1)
    trace = uniform_trace(4, 2, 4, micro_batches=1)
    ctx, _, _ = lower_one(parse_layout("recompute=selective,whole_model=false"), trace, model,
                          free_comm_cluster(1, 4))
    got = _compute_flops(ctx, lambda op: op.label == "recompute")
    assert got == pytest.approx(2 * 4 * 4.0 * model.seq_len * model.hidden_size
                                * model.tokens_per_rank)


@pytest.mark.parametrize("zero, grads, gathers", [
    (0, AllReduce, 0), (1, ReduceScatter, 1), (2, ReduceScatter, 1), (3, None, 0)])
def test_zero_stages_dense_ops(zero: int, grads, gathers: int) -> None:
    model = uniform_model(2, 4, micro_batches=2)
    ctx, _, _ = lower_one(parse_layout(f"zero={zero},whole_model=false"),
                          uniform_trace(4, 2, 4, micro_batches=2), model,
                          free_comm_cluster(1, 4))
    ops = ctx.program.ops
    dense = [op for op in ops if op.label == "dense_grads"]
    assert (len(dense) == 0) if grads is None else (len(dense) == 1
                                                    and isinstance(dense[0], grads))
    assert sum(op.label == "dense_params" for op in ops) == gathers
    z3 = [op for op in ops if op.label == "zero3_gather"]
    assert len(z3) == (2 * 2 * 2 if zero == 3 else 0)  # 2 layers × 2 micro-batches × fwd+bwd
    assert sum(op.label == "zero3_grads" for op in ops) == (2 if zero == 3 else 0)


@pytest.mark.parametrize("recompute", ["recompute=full", "recompute=selective",
                                       "recompute=selective,recompute_modules=moe"])
def test_zero3_recompute_waits_for_the_backward_gather(recompute: str) -> None:
    """FSDP gathers a layer's parameters when its backward begins; the recomputed forward
    runs then, so its first op waits for that gather (and no extra gather is issued)."""
    model = uniform_model(2, 4, micro_batches=2)
    ctx, _, _ = lower_one(parse_layout(f"zero=3,{recompute},whole_model=false"),
                          uniform_trace(4, 2, 4, micro_batches=2), model,
                          free_comm_cluster(1, 4))
    ops = ctx.program.ops
    gathers = {(op.layer, op.micro_batch): i for i, op in enumerate(ops)
               if op.label == "zero3_gather" and op.direction == "bwd"}
    assert len(gathers) == 2 * 2
    for key, g in gathers.items():
        first = min(i for i, op in enumerate(ops) if op.label == "recompute"
                    and (op.layer, op.micro_batch) == key)
        assert g < first and g in ops[first].deps
    assert sum(op.label == "zero3_gather" for op in ops) == 2 * 2 * 2


@pytest.mark.parametrize("policy", ["swiftmoe", "laer_fsep", "hecate"])
def test_gpu_optimizer_policies_gather_the_dense_shard_over_dp(policy: str) -> None:
    """Under TP 2 a GPU-optimizer policy updates its rank's 1/(t·d) of the dense weights and
    all-gathers the TP shard over its DP group (ZeRO-1, the policies' own scheme); zero=0
    updates the whole TP shard and zero=3 keeps it sharded: no gather after the step."""
    model = uniform_model(2, 8, micro_batches=2)
    shard = 2 * model.dense_params / 2  # 2 MoE layers' dense weights, split over TP 2
    per_param = 2 * model.bytes_optim + model.bytes_grad + model.bytes_weight
    step_params = {}
    for zero in ("", ",zero=0", ",zero=3"):
        ctx, _, _ = lower_one(parse_layout(f"tp=2,sp=true{zero},whole_model=false"),
                              uniform_trace(4, 2, 8, micro_batches=2), model,
                              free_comm_cluster(1, 4), policy)
        gathers = [op for op in ctx.program.ops if op.label == "dense_params"]
        if zero:
            assert gathers == []
        else:
            (g,) = gathers
            assert [sorted(np.asarray(x).tolist()) for x in g.groups] == [[0, 2], [1, 3]]
            assert np.allclose(g.bytes_G, shard * model.bytes_weight)
        steps = [op for op in ctx.program.ops if op.phase == "optimizer"
                 and isinstance(op, Compute)]
        step_params[zero] = sum(np.asarray(op.bytes_R) for op in steps) / per_param
    assert np.allclose(step_params[",zero=0"] - step_params[""], shard / 2)
    assert np.allclose(step_params[",zero=3"], step_params[""])


def test_a2a_overlap_hides_all_to_all() -> None:
    model = load_model("smartmoe-gpt")
    cluster = load_cluster("a100-4x8-ib800").with_shape(2)
    trace = random_trace(1, layers=24, ranks=16, experts=32, tokens=2048, micro_batches=4)
    base = simulate(trace, model, cluster, "static_ep", progress=False,
                    layout=parse_layout("whole_model=false"))
    over = simulate(trace, model, cluster, "static_ep", progress=False,
                    layout=parse_layout("a2a_overlap=true,whole_model=false"))
    assert over.mean("step_time_s") < base.mean("step_time_s")
    assert over.mean("a2a_time_s") == pytest.approx(base.mean("a2a_time_s"))


# -- every policy runs under pipeline and tensor layouts ------------------------------------------
@pytest.mark.parametrize("policy", [p for p in available_policies() if p != "oracle_ilp"])
def test_policies_run_under_layouts(policy: str) -> None:
    model = uniform_model(4, 8, micro_batches=2)
    cluster = free_comm_cluster(2, 4)
    for text, ranks in (("pp=2", 4), ("tp=2,sp=true", 8)):
        trace = random_trace(2, layers=4, ranks=ranks, experts=8, micro_batches=2)
        s = simulate(trace, model, cluster, policy, progress=False, layout=parse_layout(text))
        assert len(s.rows) == 2 and all(r["step_time_s"] > 0 for r in s.rows)
        assert s.config["parallel"]["pp"] == parse_layout(text).pp


def test_laer_recompute_knob_follows_the_layout() -> None:
    model = uniform_model(4, 8, micro_batches=2)
    trace = random_trace(2, layers=4, ranks=8, experts=8, micro_batches=2)
    cluster = free_comm_cluster(2, 4)
    from moesim.policies.base import make_policy

    with pytest.raises(MoesimError, match="--parallel recompute=full"):
        simulate(trace, model, cluster, make_policy("laer_fsep", {"recompute": "true"}),
                 progress=False)
    full = simulate(trace, model, cluster, "laer_fsep", progress=False,
                    layout=parse_layout("recompute=full,whole_model=false"))
    none = simulate(trace, model, cluster, "laer_fsep", progress=False,
                    layout=parse_layout("recompute=none,whole_model=false"))
    assert full.config["policy"]["knobs"]["recompute"] is True
    assert full.mean("step_time_s") > none.mean("step_time_s")


def test_search_specs_take_layouts(tmp_path) -> None:
    from moesim.analysis.search_spec import config_key, describe, load_spec, normalize
    from moesim.analysis.simulate_adapter import simulate_summary

    spec = tmp_path / "s.toml"
    spec.write_text('[search]\ntraces = ["bundled"]\nmodels = ["smartmoe-gpt"]\n'
                    'clusters = ["a100-4x8-ib800@2"]\niterations = 2\n'
                    'parallel = ["tp=2,sp=true", "recompute=full"]\n'
                    '[policies.static_ep]\ncapacity_factor = "none"\n')
    configs = load_spec(spec)
    assert sorted(c["parallel"] for c in configs) == ["recompute=full", "tp=2,sp=true"]
    assert "--parallel tp=2,sp=true" in describe(next(c for c in configs
                                                      if c["parallel"].startswith("tp")))
    plain = normalize({"policy": "static_ep"})
    assert "parallel" not in plain  # a config without a layout keeps its old key
    assert config_key(plain) != config_key(normalize({"policy": "static_ep",
                                                      "parallel": "tp=2,sp=true"}))
    with pytest.raises(MoesimError, match="unknown key 'bogus'"):
        normalize({"policy": "static_ep", "parallel": "bogus=1"})
    summaries = [simulate_summary(c) for c in configs]
    assert all(np.isfinite(s["mean_step_s"]) for s in summaries)


def test_overload_is_taken_per_ep_group_under_a_layout() -> None:
    """Static EP with ep_size 2 on 4 ranks: two EP groups; a layout's overload factor is the
    hottest rank of each group over that group's balanced count."""
    counts = np.zeros((1, 1, 4, 4), dtype=np.int64)
    counts[0, 0, :, 0] = 16  # every token to expert 0, held by rank 0 and its replica rank 2
    from .simtoys import make_trace

    trace = make_trace(counts, 1)
    model = uniform_model(1, 4, tokens=16, top_k=1, micro_batches=1)
    s = simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout("ep=2,whole_model=false"))
    # each group routes its own 32 tokens to its copy of expert 0: 32 / 16 = 2 (one group of
    # four ranks would read 32 / 16 too, but a hot rank in an idle group could not hide)
    assert s.rows[0]["overload_max"] == pytest.approx(2.0)


def test_mla_up_proj_recompute_needs_mla() -> None:
    model, trace = uniform_model(2, 4, micro_batches=1), uniform_trace(4, 2, 4, micro_batches=1)
    with pytest.raises(MoesimError, match="needs an MLA model"):
        simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout("recompute=selective,recompute_modules=mla_up_proj"))
