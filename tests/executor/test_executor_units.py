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


def test_backend_choice_follows_gpus_per_local_rank(monkeypatch):
    """auto: NCCL only when every local rank has a GPU of its own, else gloo; an explicit
    nccl without enough GPUs is a one-line error naming the fix; the launcher passes it on."""
    from moesim.errors import MoesimError
    from moesim.executor import worker
    from moesim.executor.launch import _rank_env

    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker.torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("MOESIM_BACKEND", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert worker.choose_backend() == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert worker.choose_backend() == "gloo"
    assert worker.choose_backend("gloo") == "gloo"
    with pytest.raises(MoesimError, match="GPU per local rank.*--backend gloo"):
        worker.choose_backend("nccl")
    monkeypatch.setenv("MOESIM_BACKEND", "mpi")
    with pytest.raises(MoesimError, match="auto, nccl, gloo"):
        worker.choose_backend()
    assert _rank_env(0, 2, 29500, "gloo")["MOESIM_BACKEND"] == "gloo"


def test_chunked_adam_matches_one_call():
    """The host Adam in chunks (bounded temporaries) computes the same update as one call."""
    from moesim.executor.optim import Adam

    p0, g = torch.randn(10_000, dtype=torch.float64), torch.randn(10_000, dtype=torch.float64)
    whole, chunked = p0.clone(), p0.clone()
    a, b = Adam(1e-2), Adam(1e-2, chunk=999)
    for _ in range(3):
        a.step("k", whole, g)
        b.step("k", chunked, g)
    assert torch.equal(whole, chunked) and not torch.equal(whole, p0)
    assert len(b.state) == 11  # one state per chunk


def test_expert_sweep_reaches_a_micro_batchs_tokens():
    """Calibration measures up to the most rows a slot can get (every token of every rank),
    so a skewed trace's row counts are never extrapolated."""
    from moesim.executor.calibrate_bench import M_SWEEP, m_sweep

    assert m_sweep(load_model("tiny-cpu"), 2) == M_SWEEP
    gpu = m_sweep(load_model("small-gpu"), 1)
    assert gpu[:len(M_SWEEP)] == M_SWEEP and gpu[-1] == 16384


def test_kernel_warmup_runs_each_new_row_count_once(tmp_path, monkeypatch):
    """On CUDA the interpreter runs every expert row count an iteration brings for the first
    time once, untimed, on scratch buffers (here forced on CPU): each count once, the slots'
    gradients untouched."""
    import argparse

    import torch.distributed as dist

    from moesim.executor.interpreter import RankExecutor
    from moesim.executor.launch import free_port
    from moesim.executor.validate import load_named_trace
    from moesim.executor.worker import _planned
    from moesim.traces.io import save_trace

    model = load_model("tiny-cpu")
    trace = save_trace(load_named_trace("synth", 1, model, 2), tmp_path / "w1.npz")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ns = argparse.Namespace(trace=str(trace), model="tiny-cpu", policy="static_ep", knob=[],
                                cluster=None, iterations="0:2", seed=0, out=str(tmp_path / "x"),
                                timeline="none", warmup=0, check=False, timeout_s=60)
        _, _, items = _planned(ns, 1, False)
        ex = RankExecutor(model, 0, 1, torch.device("cpu"))
        assert not ex.warm_kernels  # CPU: nothing to load
        ex.warm_kernels = True
        seen: set[int] = set()
        for item in items:
            ex.prepare(item.program, item.iteration)
            counts = {len(r) for lp in ex.passes.values() for r in lp.slot_rows} - {0}
            assert counts <= ex._warm_m and ex._warm_m == seen | counts
            seen = set(ex._warm_m)
            assert all(float(g.abs().sum()) == 0 for gs in ex.slot_grads.values() for g in gs)
            ex.run(item.program)
        assert float(ex._warm_grad.abs().sum()) > 0
    finally:
        dist.destroy_process_group()


def test_collective_context_benchmark_prints_its_table():
    """`benchmarks/collective_context.py` runs 2 gloo ranks and prints one row per operation
    with a time and a factor for each context."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "benchmarks/collective_context.py", "--rounds", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    contexts = lines[0].count("matmul")
    rows = [ln for ln in lines if re.match(r"(token all-to-all|all-reduce)", ln)]
    assert contexts >= 2 and len(rows) == 3
    for row in rows:
        times = [float(x) for x in re.findall(r"([\d.]+) ms", row)]
        assert len(times) == contexts and all(t > 0 for t in times) and "(1.00x)" in row
