"""Layout programs on real gloo processes equal the single-process whole-stack reference.

Each world size is one launch of :mod:`moesim.executor.selfcheck` ``--cases`` over many layouts
(programs lowered exactly as the simulator lowers them): every rank's outputs, input
gradients, dense gradients (before and after their sync) and expert gradients must equal the
float64 reference of the whole layer stack over all micro-batches. World 2: TP 2 (static EP,
SwiftMoE, LAER FSEP), PP 2 (1F1B over 4 micro-batches, interleaved, GPipe), recomputation,
ZeRO-1/3, the all-to-all overlap's fused steps, expert TP 2; world 4: TP 2 × EP 2,
PP 2 × EP 2, PP 2 × TP 2, the three policies under TP and PP, ZeRO-2/3, ETP 2 × EP 2 (EP
groups strided by etp), TP 2 × ETP 2, ETP 2 × EDP 2 (each shard's gradients all-reduced over
its EDP group), and expert TP with pipeline stages (1F1B, interleaved) and with full and
selective (``moe``, ``core_attn`` + ``moe_act``) recomputation, whose recomputed forwards
run the ETP all-gather / reduce-scatter again. Recomputation must also shrink the
activations a rank holds for its backward, and 1F1B must hold more on the first stage than
on the last.
"""

from __future__ import annotations

import types

import pytest

from moesim.errors import MoesimError
from moesim.executor import dense_block
from moesim.executor.capabilities import check_layout
from moesim.executor.interpreter import RankExecutor
from moesim.executor.moe_etp import is_etp_collective
from moesim.specs import load_model
from tests.executor.layoutcases import layout_case, run_cases

# name: (--parallel, policy, tokens per rank, micro-batches[, MoE layers])
CASES = {
    2: {
        "tp2": ("tp=2,sp=true", "static_ep", 64, 2),
        "tp2_swiftmoe": ("tp=2,sp=true", "swiftmoe", 64, 2),
        "tp2_laer": ("tp=2,sp=true", "laer_fsep:slots_per_rank=5", 64, 2),
        "tp2_full": ("tp=2,sp=true,recompute=full", "static_ep", 64, 2),
        "tp2_core_attn": ("tp=2,sp=true,recompute=selective", "static_ep", 64, 2),
        "tp2_moe": ("tp=2,sp=true,recompute=selective,recompute_modules=moe", "static_ep",
                    64, 2),
        "pp2": ("pp=2", "static_ep", 128, 4),
        "pp2_full": ("pp=2,recompute=full", "static_ep", 128, 4),
        "pp2_interleaved": ("pp=2,vpp=2,pp_schedule=interleaved", "static_ep", 128, 4, 4),
        "pp2_gpipe": ("pp=2,pp_schedule=gpipe", "static_ep", 128, 2),
        "pp2_overlap": ("pp=2,a2a_overlap=true", "static_ep", 128, 4),
        "tp2_overlap": ("tp=2,sp=true,a2a_overlap=true", "static_ep", 64, 4),
        "tp2_full_1": ("tp=2,sp=true,recompute=full,recompute_num_layers=1", "static_ep", 64,
                       2),
        "zero1": ("zero=1", "static_ep", 128, 2),
        "zero3": ("zero=3,recompute=selective", "static_ep", 128, 2),
        "zero3_full": ("zero=3,recompute=full", "static_ep", 128, 2),
        "zero3_moe": ("zero=3,recompute=selective,recompute_modules=moe", "static_ep", 128, 2),
        "zero1_laer": ("zero=1", "laer_fsep:slots_per_rank=5", 128, 2),
        "zero3_laer": ("zero=3", "laer_fsep:slots_per_rank=5", 128, 2),
        "tp2_zero0_swiftmoe": ("tp=2,sp=true,zero=0", "swiftmoe", 64, 2),
        "etp2": ("etp=2", "static_ep", 128, 2),
        "tp2_moe_act": ("tp=2,sp=true,recompute=selective,recompute_modules=moe_act",
                        "static_ep", 64, 2),
    },
    4: {
        "tp2_ep2": ("tp=2,sp=true,ep=2", "static_ep", 64, 2),
        "pp2_ep2": ("pp=2,ep=2", "static_ep", 128, 4),
        "pp2_tp2": ("pp=2,tp=2,sp=true", "static_ep", 64, 4),
        "tp2_swiftmoe": ("tp=2,sp=true", "swiftmoe", 64, 2),
        "tp2_laer": ("tp=2,sp=true", "laer_fsep", 64, 2),
        "pp2_swiftmoe": ("pp=2", "swiftmoe:slots_per_rank=5", 128, 4),
        "pp2_laer": ("pp=2", "laer_fsep:slots_per_rank=5", 128, 4),
        "zero2_tp2": ("tp=2,sp=true,zero=2", "static_ep", 64, 2),
        "zero3_pp2": ("pp=2,zero=3", "static_ep", 128, 4),
        "etp2_ep2": ("etp=2,ep=2", "static_ep", 128, 2),
        "tp2_etp2": ("tp=2,sp=true,etp=2", "static_ep", 64, 2),
        "etp2_edp2": ("etp=2,ep=1", "static_ep", 128, 2),
        # expert TP with pipeline stages and with recomputation
        "pp2_etp2": ("pp=2,etp=2", "static_ep", 128, 4),
        "pp2_etp2_interleaved": ("pp=2,vpp=2,pp_schedule=interleaved,etp=2", "static_ep",
                                 128, 4, 4),
        "etp2_full": ("etp=2,ep=2,recompute=full", "static_ep", 128, 2),
        "etp2_moe_act": ("etp=2,ep=2,recompute=selective,recompute_modules=moe_act",
                         "static_ep", 128, 2),
        "pp2_etp2_full": ("pp=2,etp=2,recompute=full", "static_ep", 128, 4),
        "tp2_etp2_moe": ("tp=2,sp=true,etp=2,recompute=selective,recompute_modules=moe",
                         "static_ep", 64, 2),
        "pp2_etp2_act": ("pp=2,etp=2,recompute=selective,recompute_modules=core_attn+moe_act",
                         "static_ep", 128, 4),
    },
}


def _case(world: int, spec: tuple) -> dict:
    parallel, policy, tokens, mbs, *layers = spec
    fields = {"num_layers": layers[0]} if layers else {}
    return layout_case(parallel, world, policy, tokens, mbs, **fields)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[dict, dict]]:
    """One launch per world size: ``{world: (cases, report)}``."""
    out = {}
    for world, specs in CASES.items():
        cases = {name: _case(world, spec) for name, spec in specs.items()}
        if world == 2:
            cases["unnamed_etp_collective"] = _unnamed_etp_collective()
        out[world] = (cases, run_cases(cases, world, tmp_path_factory.mktemp(f"w{world}")))
    return out


def _unnamed_etp_collective() -> dict:
    """``etp=2,recompute=full`` with its recomputed ETP collectives relabelled: a token
    collective the dataflow does not know, which must be refused, not run on a buffer."""
    import dataclasses

    case = _case(2, ("etp=2,recompute=full", "static_ep", 128, 2))
    program = case["items"][0][1]
    ops = [dataclasses.replace(op, label="unknown")
           if is_etp_collective(op) and op.label == "recompute" else op for op in program.ops]
    case["items"] = [(0, dataclasses.replace(program, ops=ops))]
    return case


def _peaks(it: dict) -> list[float]:
    """Per-rank ``saved_peak_bytes`` of a report, in rank order."""
    return [it[f"saved_peak_bytes_r{r}"] for r in range(len(
        [k for k in it if k.startswith("saved_peak_bytes_r")]))]


def _report(runs, world: int, name: str) -> dict:
    result = runs[world][1][name]
    assert "error" not in result, result["error"]
    assert result["ok"], result
    (it,) = result["iterations"]
    return it


@pytest.mark.parametrize("world,name", [(w, n) for w, specs in CASES.items() for n in specs])
def test_layout_matches_the_whole_stack_reference(runs, world, name):
    it = _report(runs, world, name)
    assert it["complete"] and it["checked_passes"] > 0
    program = runs[world][0][name]["items"][0][1]
    mine = types.SimpleNamespace(rank=0)
    ran = sum(1 for op in program.ops if RankExecutor._takes_part(mine, op))
    assert it["ops_timed"] == ran  # every op rank 0 takes part in was run and timed


@pytest.mark.parametrize("world,name,base", [
    (2, "tp2_full", "tp2"), (2, "tp2_core_attn", "tp2"), (2, "tp2_moe", "tp2"),
    (2, "tp2_moe_act", "tp2"), (4, "etp2_full", "etp2_ep2"), (4, "etp2_moe_act", "etp2_ep2")])
def test_recompute_shrinks_the_saved_activations(runs, world, name, base):
    base = _peaks(_report(runs, world, base))
    rc = _peaks(_report(runs, world, name))
    assert all(r < b for r, b in zip(rc, base, strict=True)), (rc, base)


def test_pipeline_schedules_hold_what_they_should(runs):
    first, last = _peaks(_report(runs, 2, "pp2"))
    assert first > 1.5 * last  # stage 0 holds p - 0 = 2 micro-batches, stage 1 one
    _, gpipe_last = _peaks(_report(runs, 2, "pp2_gpipe"))
    assert gpipe_last > 1.5 * last  # GPipe: every forward first, so both micro-batches
    assert _peaks(_report(runs, 2, "pp2_full"))[0] < first
    # the all-to-all overlap's fused steps hold one more micro-batch (pipeline.py)
    assert _peaks(_report(runs, 2, "pp2_overlap"))[0] > 1.2 * first


@pytest.mark.parametrize("text,needle", [
    ("tp=2", "without sequence parallelism"),
    ("cp=2", "context parallelism"),
    ("recompute=selective,recompute_modules=layernorm", "selective recomputation"),
    ("etp=2,pp=2,recompute=selective,recompute_modules=mlp", "selective recomputation"),
])
def test_unsupported_layouts_are_refused_in_one_line(text, needle):
    with pytest.raises(MoesimError) as err:
        check_layout(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


ETP_CASES = [(2, "etp2"), (4, "etp2_ep2"), (4, "tp2_etp2"), (4, "etp2_edp2"), (4, "pp2_etp2"),
             (4, "pp2_etp2_interleaved"), (4, "etp2_full"), (4, "etp2_moe_act"),
             (4, "pp2_etp2_full"), (4, "tp2_etp2_moe"), (4, "pp2_etp2_act")]
# the MoE part's forward runs again before its backward, ETP collectives included
RECOMPUTES_MOE = ("etp2_full", "pp2_etp2_full", "tp2_etp2_moe")


@pytest.mark.parametrize("world,name", ETP_CASES)
def test_expert_tp_cases_run_the_etp_collectives_and_shards(runs, world, name):
    program = runs[world][0][name]["items"][0][1]
    labels = [op.label for op in program.ops]
    moe_passes = len(program.routes)
    # forward and backward: one all-gather and one reduce-scatter each per layer-pass
    assert labels.count("etp_all_gather") == labels.count("etp_reduce_scatter") \
        == 2 * moe_passes
    again = [op for op in program.ops if is_etp_collective(op) and op.label == "recompute"]
    assert len(again) == (2 * moe_passes if name in RECOMPUTES_MOE else 0)
    it = _report(runs, world, name)
    assert it["grad_w_local"] > 0  # the sharded expert gradients were compared
    if name == "etp2_edp2":  # each shard's EDP all-reduce was checked too
        assert it["grad_w_synced"] > 0
    # float32 against float64: well inside the tolerance, as the other expert-TP cases
    worst = max(it[k] for k in ("out", "grad_x", "grad_dense_local", "grad_dense_synced",
                                "grad_w_local", "grad_w_synced"))
    assert worst < 1e-5, (name, worst)


def test_a_token_collective_the_dataflow_does_not_know_is_refused(runs):
    result = runs[2][1]["unnamed_etp_collective"]
    assert not result["ok"]
    assert "a token collective that is not an ETP all-gather" in result["error"]


def test_expert_tp_under_pp_and_recompute_holds_what_it_should(runs):
    """1F1B under expert TP: the first stage holds more than the last; full recomputation
    holds less on the first stage."""
    first, last = _peaks(_report(runs, 4, "pp2_etp2"))[::2]
    assert first > 1.5 * last
    assert _peaks(_report(runs, 4, "pp2_etp2_full"))[0] < first


def _reference_payloads(program, model, world: int, pp: int, et: int, shard_of=None
                        ) -> list[dict]:
    """What every rank would hand the check if its dataflow were exact: the reference's own
    outputs (last stage), input gradients (first stage), dense gradients split over the DP
    ranks and expert-shard gradients (``shard_of(stage rank)``, default its own shard)."""
    from moesim.executor.flow_state import held_layers
    from moesim.executor.layout_reference import reference_flat, reference_stack
    from moesim.executor.moe_etp import shard_expert

    n = world // pp
    ref = reference_stack(program, model, n, 1, 0)
    shard_of = shard_of or (lambda src: src % et)
    out = []
    for r in range(world):
        stage, src = divmod(r, n)
        layers = held_layers(program, r)
        local = {(l, e, src % et): shard_expert(ref.expert_grads[(l, e)], model,
                                                shard_of(src), et).float()
                 for l in layers for e in range(model.num_experts)}
        out.append({"rank": r, "source": src, "etp": et, "tp_index": 0, "dp_index": src,
                    "layers": tuple(layers),
                    "outputs": {mb: o[src].float() for mb, o in ref.outputs.items()}
                    if stage == pp - 1 else {},
                    "input_grads": {mb: g[src].float() for mb, g in ref.input_grads.items()}
                    if stage == 0 else {},
                    "dense_local": reference_flat(ref, layers, 0, 1).float() / n,
                    "dense_synced": None, "experts_local": local, "experts_synced": {},
                    "saved_peak_bytes": 0})
    return out


def test_expert_tp_check_fails_on_a_wrong_shard():
    """The whole-stack check of sharded expert gradients can fail: payloads built from the
    reference itself pass, and the same payloads with rank 0 holding shard 1's gradient (or
    zeros) fail."""
    import torch

    from moesim.executor.layout_check import compare_stack

    case = _case(2, ("etp=2", "static_ep", 128, 2))
    program, model = case["items"][0][1], case["model"]
    good = compare_stack(_reference_payloads(program, model, 2, 1, 2), program, model, 2, 1, 0)
    assert good["ok"], good
    bad = compare_stack(_reference_payloads(program, model, 2, 1, 2, lambda r: 1 - r),
                        program, model, 2, 1, 0)
    assert not bad["ok"] and bad["grad_w_local"] > 0.1, bad
    whole = _reference_payloads(program, model, 2, 1, 2)
    for k in whole[0]["experts_local"]:
        whole[0]["experts_local"][k] = torch.zeros_like(whole[0]["experts_local"][k])
    assert not compare_stack(whole, program, model, 2, 1, 0)["ok"]


def test_expert_tp_pipeline_check_fails_on_a_wrong_gradient():
    """PP 2 × ETP 2 with full recomputation (world 4): the reference's own payloads pass;
    the check fails when a last-stage rank holds the other shard's expert gradient, when a
    first-stage rank's input gradients belong to the other micro-batch, and when one
    rank's dense gradient is off by 1 %."""
    from moesim.executor.layout_check import compare_stack

    case = _case(4, ("pp=2,etp=2,recompute=full", "static_ep", 128, 4))
    program, model = case["items"][0][1], case["model"]

    def check(payloads) -> dict:
        return compare_stack(payloads, program, model, 2, 1, 0)

    good = check(_reference_payloads(program, model, 4, 2, 2))
    assert good["ok"] and good["complete"], good
    swapped = _reference_payloads(program, model, 4, 2, 2, lambda src: 1 - src)
    wrong_shard = _reference_payloads(program, model, 4, 2, 2)
    wrong_shard[2]["experts_local"] = swapped[2]["experts_local"]  # stage 1, ETP index 0
    bad = check(wrong_shard)
    assert not bad["ok"] and bad["grad_w_local"] > 0.1, bad
    wrong_mb = _reference_payloads(program, model, 4, 2, 2)
    g = wrong_mb[0]["input_grads"]
    g[0], g[1] = g[1], g[0]
    bad = check(wrong_mb)
    assert not bad["ok"] and bad["grad_x"] > 0.1 and bad["grad_w_local"] == good["grad_w_local"]
    off = _reference_payloads(program, model, 4, 2, 2)
    off[3]["dense_local"] = off[3]["dense_local"] * 1.01
    bad = check(off)
    assert not bad["ok"] and bad["grad_dense_local"] > 1e-3, bad


def test_models_whose_flops_the_attention_would_not_do_are_refused():
    model = load_model("tiny-cpu")
    dense_block.check_model(model, 2, 128)
    for bad, why in ((model.replace(dense_flops_per_token=1e6), "dense_flops_per_token"),
                     (model, "whole sequences")):
        with pytest.raises(MoesimError, match=why):
            dense_block.check_model(bad, 2, 128 if bad is not model else 100)
