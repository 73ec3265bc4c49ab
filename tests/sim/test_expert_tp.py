"""Expert tensor parallelism in the simulator: Megatron-Core's expert rank order, the ETP
all-gather / reduce-scatter around every expert pass (hand-computed bytes), the expert GEMMs'
1/etp share, memory 1/etp, EDP gradient groups, the refusals, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import MoesimError
from moesim.expert_tp import expert_order
from moesim.layout import parse_layout
from moesim.layout_run import world_tokens
from moesim.ops import AllGather, AllToAll, ReduceScatter
from moesim.policies.base import make_policy
from moesim.simulate import simulate
from moesim.traces.io import save_trace

from .layouttoys import free_comm_cluster, lower_one, uniform_model, uniform_trace
from .simtoys import make_trace


def _ops(ctx, **match):
    return [(i, op) for i, op in enumerate(ctx.program.ops)
            if all(getattr(op, k) == v for k, v in match.items())]


def test_expert_order_is_megatrons_rank_generator() -> None:
    """``r = i + et·(j + ep·k)``: ETP groups consecutive, EP groups strided by ``et``; the
    policy's consecutive EP blocks of ``ep`` positions are Megatron's EP groups."""
    sigma = expert_order(8, 2, 2)  # n = 8, ep = 2, etp = 2, edp = 2
    assert sorted(sigma.tolist()) == list(range(8))
    blocks = [sorted(sigma[b * 2:(b + 1) * 2].tolist()) for b in range(4)]
    assert blocks == [[0, 2], [1, 3], [4, 6], [5, 7]]  # EP groups: stride etp
    assert expert_order(4, 1, 2).tolist() == [0, 1, 2, 3]  # ep = 1: EP groups of one rank


def test_etp_collectives_and_expert_gemms_hand_computed() -> None:
    """World 4, etp 2, ep 2 (so EDP 1), 4 experts top-2, 64 tokens per rank, every source
    sends 32 tokens to every expert. A rank (2 slots) receives 2 sources × 2 experts × 32 =
    128 tokens; its ETP group gathers 256: all-gather and reduce-scatter move
    ``256 · h · 2`` bytes per group, forward and backward; each slot's GEMM sees the group's
    128 rows with half the weights and FLOPs."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    ctx, sched, _ = lower_one(parse_layout("etp=2"), trace, model, free_comm_cluster(1, 4))
    tb = model.hidden_size * model.bytes_activation
    for direction in ("fwd", "bwd"):
        ag = _ops(ctx, label="etp_all_gather", layer=0, micro_batch=0, direction=direction)
        rs = _ops(ctx, label="etp_reduce_scatter", layer=0, micro_batch=0,
                  direction=direction)
        assert len(ag) == len(rs) == 1
        for _, op in ag + rs:
            assert [g.tolist() for g in op.groups] == [[0, 1], [2, 3]]
            assert np.all(op.bytes_G == 256 * tb)
        assert isinstance(ag[0][1], AllGather) and isinstance(rs[0][1], ReduceScatter)
        (ei, exp), = _ops(ctx, phase="expert", layer=0, micro_batch=0, direction=direction)
        passes = 1 if direction == "fwd" else 2
        assert exp.gemm_tokens_RS.tolist() == [[128, 128]] * 4
        assert exp.weight_bytes == model.expert_weight_bytes / 2
        assert exp.flops_per_token == model.expert_flops_per_token / 2
        np.testing.assert_allclose(exp.flops_R, 256 * model.expert_flops_per_token / 2 * passes)
        # the expert waits for the gather, the reduce-scatter for the expert
        assert ag[0][0] in exp.deps and ei in rs[0][1].deps
        assert np.all(sched.start_OR[ei] >= sched.end_OR[ag[0][0]] - 1e-15)
    a2a = [op for _, op in _ops(ctx, phase="dispatch", layer=0, micro_batch=0)
           if isinstance(op, AllToAll)]
    for op in a2a:  # EP groups {0, 2} and {1, 3}: the all-to-all names them through σ
        assert op.ranks.tolist() == [0, 2, 1, 3]
    # edp = 1: no expert gradient sync at all
    assert not _ops(ctx, label="expert_grads")


def test_etp_routes_each_ranks_own_tokens_in_stage_order() -> None:
    """A skewed trace: every stage rank receives exactly what its EP group's sources send its
    experts (hand computation in stage coordinates), and the dispatch matrix agrees."""
    rng = np.random.default_rng(3)
    n, E, M = 8, 4, 2
    counts = rng.integers(0, 40, size=(M, 1, n, E)).astype(np.int64)
    trace = make_trace(counts, 2, M)
    model = uniform_model(1, E, micro_batches=M)
    ctx, _, _ = lower_one(parse_layout("etp=2,ep=2"), trace, model, free_comm_cluster(1, 8))
    et, ep, S = 2, 2, E // 2
    tokens_MLR, _ = world_tokens(ctx, _plan(parse_layout("etp=2,ep=2"), model, n))
    tb = model.token_bytes
    for mb in range(M):
        want = np.zeros(n, dtype=np.int64)
        B = np.zeros((n, n))
        for r in range(n):
            i, j, k = r % et, (r // et) % ep, r // (et * ep)
            for jj in range(ep):
                src = i + et * (jj + ep * k)
                sent = counts[mb, 0, src, j * S:(j + 1) * S].sum()
                want[r] += sent
                B[src, r] = sent * tb
        assert tokens_MLR[mb, 0].tolist() == want.tolist()
        (_, disp), = [(i, op) for i, op in _ops(ctx, phase="dispatch", micro_batch=mb,
                                                 direction="fwd") if isinstance(op, AllToAll)]
        got = np.zeros((n, n))
        got[np.ix_(disp.ranks, disp.ranks)] = np.asarray(disp.bytes_RR)
        np.testing.assert_array_equal(got, B)
        (_, ag), = _ops(ctx, label="etp_all_gather", micro_batch=mb, direction="fwd")
        np.testing.assert_array_equal(ag.bytes_G, want.reshape(-1, et).sum(axis=1) * tb)


def _plan(layout, model, n: int):
    from moesim import layout_run
    from moesim.simulate import _policy

    return layout_run.prepare(layout, model, free_comm_cluster(1, n), _policy("static_ep"),
                              2)[0]


def test_etp_memory_and_edp_gradient_groups() -> None:
    """tp 2 + SP, etp 2, ep 1 on 4 ranks (EDP 2): every rank holds all 4 experts at half
    width — expert weights and grads half of etp=1's, optimizer state equal (half the
    parameters over half the EDP) — and each expert's shard syncs over its EDP group
    ({0, 2} and {1, 3}), half an expert's gradient each."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    cluster = free_comm_cluster(1, 4)
    two, _, _ = lower_one(parse_layout("tp=2,sp=true,etp=2,ep=1"), trace, model, cluster)
    one, _, _ = lower_one(parse_layout("tp=2,sp=true,ep=1"), trace, model, cluster)
    expert_params = 2 * 4 * model.params_per_expert  # layers × slots × P
    for key, per in (("weights", model.bytes_weight), ("grads", model.bytes_grad)):
        diff = one.program.memory_bytes[key] - two.program.memory_bytes[key]
        np.testing.assert_allclose(diff, expert_params / 2 * per)
    np.testing.assert_allclose(one.program.memory_bytes["optimizer"],
                               two.program.memory_bytes["optimizer"])
    grads = [op for _, op in _ops(two, label="expert_grads")]
    assert len(grads) == 2 * 4  # per layer, one round per expert
    for op in grads:
        assert [g.tolist() for g in op.groups] == [[0, 2], [1, 3]]
        assert np.all(op.bytes_G == model.params_per_expert * model.bytes_grad / 2)
    ref = [op for _, op in _ops(one, label="expert_grads")]
    assert len(ref) == len(grads) and all(len(op.groups) == 1 for op in ref)  # {0,1,2,3}


def test_etp_conserves_expert_work_and_adds_its_collectives() -> None:
    """etp=2 against etp=1 at the same EP size: the same expert FLOPs per rank and the same
    expert durations (work is split, not lost), four ETP collectives per layer-pass (none at
    etp=1), EDP gradient sync only where EDP > 1, and every other op the same."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    cluster = free_comm_cluster(1, 4)
    two, _, d2 = lower_one(parse_layout("etp=2,ep=2"), trace, model, cluster)
    one, _, d1 = lower_one(parse_layout("ep=2"), trace, model, cluster)
    e2 = [(i, op) for i, op in _ops(two, phase="expert")]
    e1 = [(i, op) for i, op in _ops(one, phase="expert")]
    assert len(e1) == len(e2)
    for (i2, a), (i1, b) in zip(e2, e1, strict=True):
        np.testing.assert_allclose(a.flops_R, b.flops_R)
        np.testing.assert_allclose(d2[i2], d1[i1])
    assert sum(op.label.startswith("etp_") for op in two.program.ops) == 4 * 2 * 2
    assert not any(op.label.startswith("etp_") for op in one.program.ops)
    # etp=1, ep=2 on 4 ranks has EDP 2 (expert grads synced); etp=2, ep=2 has EDP 1 (none)
    assert _ops(one, label="expert_grads") and not _ops(two, label="expert_grads")

    def rest(ctx):
        return [(op.phase, op.direction, op.layer, op.micro_batch) for op in ctx.program.ops
                if not op.label.startswith(("etp_", "expert_"))]

    assert rest(one) == rest(two)


def test_etp_full_recompute_reruns_the_etp_collectives() -> None:
    """etp 2, ep 2, recompute=full: before each layer-pass's backward the recomputed forward
    runs its own ETP all-gather and reduce-scatter (label ``recompute``) with the forward's
    groups and bytes, around a recomputed expert op with the forward's FLOPs; the backward's
    combine waits for the recomputed combine, and the backward ETP pair is unchanged."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    ctx, _, _ = lower_one(parse_layout("etp=2,ep=2,recompute=full"), trace, model,
                          free_comm_cluster(1, 4))
    tb = model.hidden_size * model.bytes_activation
    for mb in range(2):
        for layer in range(2):
            at = dict(layer=layer, micro_batch=mb, direction="fwd")
            (gi, ag), = [(i, op) for i, op in _ops(ctx, label="recompute", phase="dispatch", **at)
                         if isinstance(op, AllGather)]
            (ri, rs), = [(i, op) for i, op in _ops(ctx, label="recompute", phase="combine", **at)
                         if isinstance(op, ReduceScatter)]
            (_, fwd_ag), = _ops(ctx, label="etp_all_gather", **at)
            for op in (ag, rs):
                assert [g.tolist() for g in op.groups] == [[0, 1], [2, 3]]
                np.testing.assert_array_equal(op.bytes_G, fwd_ag.bytes_G)
                assert np.all(op.bytes_G == 256 * tb)
            (ei, exp), = _ops(ctx, label="recompute", phase="expert", **at)
            (_, fwd_exp), = _ops(ctx, label="", phase="expert", **at)
            np.testing.assert_allclose(exp.flops_R, fwd_exp.flops_R)
            assert gi in exp.deps and ei in rs.deps
            (ci, _), = [(i, op) for i, op in _ops(ctx, label="recompute", phase="combine", **at)
                        if isinstance(op, AllToAll)]
            assert ri in ctx.program.ops[ci].deps
            (_, cb), = [(i, op) for i, op in _ops(ctx, phase="combine", layer=layer,
                                                   micro_batch=mb, direction="bwd")
                        if isinstance(op, AllToAll)]
            assert ci in cb.deps
            assert len(_ops(ctx, label="etp_all_gather", layer=layer, micro_batch=mb,
                            direction="bwd")) == 1


def test_etp_moe_act_recompute_ops_and_memory_use_the_gathered_shard() -> None:
    """Selective ``moe_act`` under etp 2: the recompute op covers every gathered row (256
    per rank) at ``F/et`` (4 FLOPs and 3 gated intermediates per element), and the
    activations it saves are exactly those rows' activation outputs, ``b_act · F/et`` per
    row per layer (one micro-batch held: no pipeline)."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    cluster = free_comm_cluster(1, 4)
    act, _, _ = lower_one(parse_layout("etp=2,ep=2,recompute=selective,recompute_modules="
                                       "moe_act"), trace, model, cluster)
    base, _, _ = lower_one(parse_layout("etp=2,ep=2"), trace, model, cluster)
    f, b = model.ffn_hidden_size / 2, model.bytes_activation
    ops = [op for _, op in _ops(act, label="recompute")]
    assert len(ops) == 2 * 2 and all(op.phase == "expert" and op.kind == "other" for op in ops)
    for op in ops:
        np.testing.assert_allclose(op.flops_R, 256 * 4.0 * f)
        np.testing.assert_allclose(op.bytes_R, 256 * 3 * f * b)
    saved = base.program.memory_bytes["activations"] - act.program.memory_bytes["activations"]
    np.testing.assert_allclose(saved, 2 * 256 * b * f)


def test_etp_under_pp_uses_each_stages_own_groups() -> None:
    """pp 2, etp 2 on 4 ranks (ep 1 per stage), with full recomputation: every ETP
    collective, forward, recomputed and backward, runs over its stage's ranks ({0, 1} on
    stage 0, {2, 3} on stage 1)."""
    model = uniform_model(2, 4, micro_batches=4)
    trace = uniform_trace(2, 2, 4, micro_batches=4)
    ctx, _, _ = lower_one(parse_layout("pp=2,etp=2,recompute=full"), trace, model,
                          free_comm_cluster(1, 4))
    etp = [op for op in ctx.program.ops if (op.phase, type(op)) in
           (("dispatch", AllGather), ("combine", ReduceScatter))]
    assert len(etp) == 2 * 4 * 3 * 2  # layers × micro-batches × (fwd, recompute, bwd) × 2
    for op in etp:
        assert [g.tolist() for g in op.groups] == [[0, 1] if op.layer == 0 else [2, 3]]


@pytest.mark.parametrize("policy, knobs, needle", [
    ("laer_fsep", {}, "use --policy static_ep, or etp=1"),
    ("swiftmoe", {}, "use --policy static_ep, or etp=1"),
    ("static_ep", {"optimizer_on_host": True}, "optimizer_on_host is not modelled"),
    ("static_ep", {"ep_size": 4}, "ep·etp = 4·2 does not divide"),
])
def test_etp_refusals(policy: str, knobs: dict, needle: str) -> None:
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    with pytest.raises(MoesimError) as exc:
        simulate(trace, model, free_comm_cluster(1, 4), make_policy(policy, knobs),
                 progress=False, layout=parse_layout("etp=2"))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_etp_not_dividing_the_stage_is_refused() -> None:
    """etp=3 on 4 ranks: a one-line error naming etp, not a TypeError from an unset EP."""
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    with pytest.raises(MoesimError) as exc:
        simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout("etp=3"))
    assert "etp=3 does not divide the 4 ranks" in str(exc.value) and "\n" not in str(exc.value)


def test_etp_under_tp_needs_sp() -> None:
    model = uniform_model(2, 4, micro_batches=2)
    trace = uniform_trace(4, 2, 4, micro_batches=2)
    with pytest.raises(MoesimError, match="needs sp=true"):
        simulate(trace, model, free_comm_cluster(1, 4), "static_ep", progress=False,
                 layout=parse_layout("tp=2,etp=2,ep=1"))


def test_cli_simulates_expert_tp(tmp_path, capsys) -> None:
    """``moesim simulate --parallel tp=2,sp=true,etp=2,pp=2`` runs and records the layout."""
    trace_path = tmp_path / "t.npz"
    save_trace(uniform_trace(4, 4, 4, micro_batches=2), trace_path)
    model_path = tmp_path / "m.toml"
    model_path.write_text("\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in (
        ("name", "uniform"), ("num_layers", 4), ("hidden_size", 64), ("ffn_hidden_size", 128),
        ("num_experts", 4), ("top_k", 2), ("seq_len", 64), ("tokens_per_rank", 64),
        ("micro_batches", 2))) + "\n")
    from moesim.results import load_run

    assert main(["simulate", "--trace", str(trace_path), "--model", str(model_path),
                 "--nodes", "1", "--parallel", "tp=2,sp=true,etp=2,pp=2", "--out",
                 str(tmp_path / "run"), "--timeline", "0", "--quiet"]) == 0
    run = load_run(tmp_path / "run")
    assert run.complete and run.config["parallel"]["etp"] == 2
    assert "static_ep [tp=2,sp=true,pp=2,etp=2" in capsys.readouterr().out
