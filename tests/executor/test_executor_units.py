"""Single-process tests of the executor's pieces: forced routing, reference layer, groups,
records and the validation comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesim.executor.groups import program_groups
from moesim.executor.reference import reference_layer
from moesim.executor.replay import expert_weights, ffn, layer_inputs
from moesim.ops import AllReduce, AllToAll, LayerRoute, Program
from moesim.specs import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-cpu")


def _route(R: int = 2, S: int = 4, seed: int = 0) -> LayerRoute:
    rng = np.random.default_rng(seed)
    return LayerRoute(kept_RP=rng.integers(0, 20, size=(R, R * S)),
                      dropped_R=rng.integers(0, 5, size=R),
                      phy2log_P=np.arange(R * S) % 8, slots_per_rank=S)


def test_forced_routing_gives_exact_counts(model):
    route = _route()
    for r in range(2):
        inp = layer_inputs(route, r, model, iteration=3, micro_batch=1, layer=0)
        got = np.bincount(inp.slot_A[inp.slot_A >= 0], minlength=8)
        assert (got == route.kept_RP[r]).all()
        assert (inp.slot_A < 0).sum() == route.dropped_R[r]
        assert inp.x_NH.shape == (-(-len(inp.slot_A) // model.top_k), model.hidden_size)


def test_inputs_and_weights_are_deterministic(model):
    route = _route()
    a = layer_inputs(route, 1, model, 2, 0, 1)
    b = layer_inputs(route, 1, model, 2, 0, 1)
    c = layer_inputs(route, 1, model, 3, 0, 1)
    assert torch.equal(a.x_NH, b.x_NH) and (a.slot_A == b.slot_A).all()
    assert not torch.equal(a.x_NH, c.x_NH)
    assert torch.equal(expert_weights(model, 1, 5), expert_weights(model, 1, 5))
    assert not torch.equal(expert_weights(model, 1, 5), expert_weights(model, 0, 5))


def test_reference_matches_a_per_token_loop(model):
    """The reference equals the most literal MoE: loop over tokens and their assignments."""
    route = _route(seed=1)
    ref = reference_layer(route, model, 0, 0, 0)
    for r in range(2):
        inp = layer_inputs(route, r, model, 0, 0, 0)
        out = torch.zeros_like(inp.x_NH, dtype=torch.float64)
        for j, slot in enumerate(inp.slot_A):
            if slot < 0:
                continue  # dropped: contributes nothing (the residual carries the token)
            e = int(route.phy2log_P[slot])
            t = int(inp.token_A[j])
            w = expert_weights(model, 0, e).double()
            out[t] += inp.gate_A[j].double() * ffn(inp.x_NH[t:t + 1].double(), w, model)[0]
        assert torch.allclose(out, ref.out[r], rtol=1e-10, atol=1e-10)


def test_reference_dropped_tokens_output_zero(model):
    route = LayerRoute(kept_RP=np.zeros((2, 8), dtype=np.int64), dropped_R=np.array([6, 4]),
                       phy2log_P=np.arange(8), slots_per_rank=4)
    ref = reference_layer(route, model, 0, 0, 0)
    assert all(float(o.abs().max()) == 0.0 for o in ref.out)
    assert all(float(g.abs().max()) == 0.0 for g in ref.grad_x)


def test_program_groups_are_deterministic_and_deduplicated():
    prog = Program(num_ranks=4)
    prog.add(AllReduce(phase="grad_sync", direction="step", groups=(np.array([2, 0]),
                                                                    np.array([1, 3])),
                       bytes_G=np.ones(2)))
    prog.add(AllReduce(phase="grad_sync", direction="step",
                       groups=(np.array([0, 2]), np.arange(4)), bytes_G=np.ones(2)))
    prog.add(AllToAll(phase="relayout", direction="step", ranks=np.array([3, 1]),
                      bytes_RR=np.ones((2, 2))))
    assert program_groups(prog) == [(0, 2), (1, 3)]


@pytest.mark.parametrize("gated", [True, False])
def test_hand_written_ffn_backward_matches_autograd(model, gated):
    from moesim.executor.replay import ffn_backward, ffn_forward

    m = model.replace(gated=gated)
    w = expert_weights(m, 0, 3).double()
    x = torch.randn(7, m.hidden_size, dtype=torch.float64)
    dy = torch.randn(7, m.hidden_size, dtype=torch.float64)
    y, saved = ffn_forward(x, w, m)
    grad_w = torch.zeros_like(w)
    dx = ffn_backward(dy, saved, w, grad_w, m)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ya = ffn(xa, wa, m)
    gx, gw = torch.autograd.grad(ya, (xa, wa), dy)
    assert torch.allclose(y, ya.detach(), atol=1e-10)
    assert torch.allclose(dx, gx, atol=1e-10) and torch.allclose(grad_w, gw, atol=1e-10)


def test_rank_env_sets_malloc_defaults_but_keeps_the_users(monkeypatch):
    """Ranks get the launcher's glibc malloc settings (heap-served tensors, no per-tensor
    mmap), torchrun's variables and one intra-op thread; a value the user exported wins."""
    from moesim.executor.launch import MALLOC_ENV, _rank_env

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    env = _rank_env(1, 2, 29500)
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "2", "29500")
    assert env["OMP_NUM_THREADS"] == "1"


def test_host_benchmark_sizes_reach_the_models_optimizer_shard():
    from moesim.executor.calibrate_bench import _host_sizes

    small, tiny = load_model("small-cpu"), load_model("tiny-cpu")
    shard = small.expert_params_per_layer * small.num_layers / 2
    assert _host_sizes(tiny, 2) == [2**14, 2**16, 2**18, 2**20]
    sizes = _host_sizes(small, 2)
    assert sizes[:4] == [2**14, 2**16, 2**18, 2**20] and sizes[-1] >= shard > sizes[-2]
    assert _host_sizes(load_model("deepseek-v3"), 1)[-1] == 2**24       # capped
