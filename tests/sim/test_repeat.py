"""Batched iterations of a repeated structure (:mod:`moesim.repeat`) against the full path:
every record of a run, bit for bit, with and without batching."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from moesim import repeat
from moesim import simulate as sim
from moesim.engine import schedule_batch
from moesim.policies.base import make_policy, repeats_structure
from moesim.policies.static_ep import StaticEP
from moesim.specs import ModelSpec, load_cluster

from .simtoys import random_trace

MODEL = ModelSpec(name="toy8", num_layers=3, hidden_size=64, ffn_hidden_size=96,
                  num_experts=16, top_k=2, tokens_per_rank=96, micro_batches=2,
                  dense_flops_per_token=1e6, dense_params_per_layer=1000.0)


def _records(monkeypatch, policy, trace, batch: bool, **kw) -> list:
    """Every IterationRecord of one run (batched as the simulator chooses, or never)."""
    seen: list = []
    real = sim.build_record

    def keep(*args, **kwargs):
        rec = real(*args, **kwargs)
        seen.append(rec)
        return rec

    calls = []
    real_batch = repeat.simulate_batch

    def counted(t, run, items, *rest):
        calls.append(len(items))
        return real_batch(t, run, items, *rest)

    with monkeypatch.context() as m:
        m.setattr(sim, "build_record", keep)
        m.setattr(repeat, "simulate_batch", counted)
        if not batch:
            m.setattr(StaticEP, "repeats_structure", False)
        cluster = load_cluster("h100-32x8").with_shape(2, 4)
        sim.simulate(trace, MODEL, cluster, policy, progress=False, allow_oom=True, **kw)
    return seen, calls


def _assert_same(a, b) -> None:
    assert a.iteration == b.iteration
    assert a.summary.keys() == b.summary.keys()
    for k in a.summary:
        assert a.summary[k] == b.summary[k] or (np.isnan(a.summary[k])
                                                and np.isnan(b.summary[k])), k
    for name in ("busy_s_LFR", "start_s_LFR", "end_s_LFR", "expert_load_LE", "rank_tokens_LR",
                 "dropped_LR"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.memory_CR.keys() == b.memory_CR.keys()
    for k in a.memory_CR:
        np.testing.assert_array_equal(a.memory_CR[k], b.memory_CR[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(a.traffic_FRR), np.asarray(b.traffic_FRR))


@pytest.mark.parametrize("experts,knobs", [
    (16, {}), (16, {"ep_size": 4}), (16, {"capacity_factor": 1.0}),
    (16, {"ep_size": 8, "capacity_factor": 0.8}), (16, {"optimizer_on_host": True}),
    (8, {}), (8, {"capacity_factor": 1.0}), (4, {"ep_size": 4}), (2, {"ep_size": 2})])
def test_batched_run_equals_the_full_path(monkeypatch, experts, knobs):
    """Slots per rank 2 / 4 (numpy sums) and 1 (the C pass: EP 8 over two nodes, EP 4 = one
    node, EP 2 inside a node), dropless and with drops, EDP replicas, host optimizer."""
    trace = random_trace(9, layers=3, ranks=8, experts=experts, tokens=96, micro_batches=2,
                         seed=3)
    monkeypatch.setattr(sys.modules[__name__], "MODEL", MODEL.replace(num_experts=experts))
    fast, calls = _records(monkeypatch, make_policy("static_ep", knobs), trace, True)
    slow, none = _records(monkeypatch, make_policy("static_ep", knobs), trace, False)
    assert sum(calls) == 9 and not none  # all (0 lowered once more, as the template)
    assert len(fast) == len(slow) == 9
    for a, b in zip(fast, slow, strict=True):
        _assert_same(a, b)


@pytest.mark.parametrize("layout", [
    "pp=2", "pp=2,pp_schedule=interleaved,vpp=2", "tp=2,sp=true", "cp=2", "zero=3",
    "recompute=full", "recompute=selective,recompute_modules=core_attn+layernorm+moe_act",
    "pp=2,ep=2,recompute=full,a2a_overlap=true,zero=1", "pp=2,tp=2,sp=true,zero=1"])
def test_batched_layouts_equal_the_full_path(monkeypatch, layout):
    """Under parallel layouts: stage contexts' matrices and rows, recomputed expert
    activations, pipeline sends, per-stage memory."""
    from moesim.layout import parse_layout

    lay = parse_layout(layout)
    ranks = 8 // lay.pp
    trace = random_trace(6, layers=4, ranks=ranks, experts=8, tokens=96, micro_batches=2,
                         seed=4)
    monkeypatch.setattr(sys.modules[__name__], "MODEL", MODEL.replace(num_layers=4,
                                                                      num_experts=8))
    fast, calls = _records(monkeypatch, "static_ep", trace, True, layout=lay)
    slow, none = _records(monkeypatch, "static_ep", trace, False, layout=lay)
    assert sum(calls) == 6 and not none
    for a, b in zip(fast, slow, strict=True):
        _assert_same(a, b)


def test_expert_tensor_parallel_runs_are_not_batched(monkeypatch):
    from moesim.layout import parse_layout

    trace = random_trace(4, layers=3, ranks=8, experts=8, tokens=96, micro_batches=2)
    monkeypatch.setattr(sys.modules[__name__], "MODEL", MODEL.replace(num_experts=8))
    _, calls = _records(monkeypatch, "static_ep", trace, True, layout=parse_layout("etp=2"))
    assert calls == []


def test_small_batches_and_timelines_match(monkeypatch):
    """Batches cut at the size limit (2: iterations 0–1, 2–3, 5–6, then 7) and by a
    timeline iteration (4, which takes the full path)."""
    monkeypatch.setattr(repeat, "MAX_BATCH", 2)
    trace = random_trace(8, layers=3, ranks=8, experts=16, tokens=96, micro_batches=2, seed=5)
    fast, calls = _records(monkeypatch, "static_ep", trace, True, timeline_iterations=[4])
    slow, _ = _records(monkeypatch, "static_ep", trace, False, timeline_iterations=[4])
    assert calls == [2, 2, 2, 1] and fast[4].timeline and slow[4].timeline
    for a, b in zip(fast, slow, strict=True):
        _assert_same(a, b)


def test_only_policies_that_declare_it_are_batched(monkeypatch):
    class Subclass(StaticEP):  # inherits the hooks' code, not the declaration
        name = ""  # not registered

    assert repeats_structure(StaticEP()) and not repeats_structure(Subclass())
    assert not repeats_structure(make_policy("eplb"))
    trace = random_trace(5, layers=3, ranks=8, experts=16, tokens=96, micro_batches=2)
    _, calls = _records(monkeypatch, Subclass(), trace, True)
    assert calls == []


@pytest.mark.parametrize("policy,layout", [("laer_fsep", None), ("hecate", None),
                                           ("swiftmoe", None), ("static_ep", "pp=2,tp=2,sp=true"),
                                           ("static_ep", "pp=2,a2a_overlap=true")])
def test_schedule_batch_equals_one_schedule_per_iteration(monkeypatch, policy, layout):
    """Each iteration of a batch gets the times :func:`schedule` gives it alone, on real
    lowered programs (group collectives, send/recv batches, stage ops, several streams)."""
    from moesim.layout import parse_layout

    programs = []
    real = sim.schedule

    def spy(ops, durations, R, *a):
        programs.append((ops, durations, R))
        return real(ops, durations, R, *a)

    monkeypatch.setattr(sim, "schedule", spy)
    monkeypatch.setattr(StaticEP, "repeats_structure", False)  # every program scheduled alone
    trace = random_trace(2, layers=3, ranks=4 if layout else 8, experts=16, tokens=96,
                         micro_batches=2, seed=1)
    sim.simulate(trace, MODEL, load_cluster("h100-32x8").with_shape(2, 4), policy,
                 progress=False, allow_oom=True,
                 layout=parse_layout(layout) if layout else None)
    rng = np.random.default_rng(0)
    ops, durs, R = programs[-1]
    B = 3
    batched = [np.stack([np.asarray(d, float) * rng.uniform(0.5, 2.0) for _ in range(B)])
               for d in durs]
    got = schedule_batch(ops, batched, R, B)
    for b in range(B):
        want = real(ops, [d[b] for d in batched], R)
        one = got.iteration(b)
        assert all((x is None and y is None) or np.array_equal(x, y)
                   for x, y in zip(want.ranks_O, one.ranks_O, strict=True))
        for x, y in zip(want.start_O + want.end_O, one.start_O + one.end_O, strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_failing_iteration_in_a_batch_keeps_the_earlier_ones(monkeypatch, tmp_path):
    """As on the full path: iterations before the one that fails are reported and written."""
    from moesim.errors import OutOfMemoryError
    from moesim.results import load_run

    real = sim._check_memory

    def check(ctx, run, it):
        if it == 5:
            raise OutOfMemoryError("iteration 5: rank 0 does not fit (test)")
        return real(ctx, run, it)

    monkeypatch.setattr(sim, "_check_memory", check)
    seen: list[int] = []
    trace = random_trace(8, layers=3, ranks=8, experts=16, tokens=96, micro_batches=2)
    with pytest.raises(OutOfMemoryError):
        sim.simulate(trace, MODEL, load_cluster("h100-32x8").with_shape(2, 4), "static_ep",
                     progress=False, out_dir=tmp_path / "run",
                     on_iteration=lambda row: seen.append(row["iteration"]))
    assert seen == [0, 1, 2, 3, 4]
    run = load_run(tmp_path / "run")
    assert not run.complete and list(run.summary["iteration"]) == [0, 1, 2, 3, 4]
