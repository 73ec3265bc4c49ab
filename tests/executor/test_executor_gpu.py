"""GPU (CUDA + NCCL) tests of the executor: the same programs, on CUDA tensors. Skipped cleanly
when no GPU is visible."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)"),
]


def _world() -> int:
    return min(2, torch.cuda.device_count())


def test_nccl_handmade_program_matches_reference(tmp_path):
    """On NCCL with one rank per GPU (2 if there are 2 GPUs, else 1 rank: no collectives
    span devices but the same code paths run)."""
    from exec_handmade import handmade_program

    from moesim.executor.launch import launch
    from moesim.specs import load_model

    world = _world()
    if world < 2:
        pytest.skip("the hand-built program needs 2 GPUs")
    model = load_model("tiny-cpu")
    progs = tmp_path / "p.pkl"
    progs.write_bytes(pickle.dumps({"model": model,
                                    "items": [(0, handmade_program(model, world))]}))
    report = tmp_path / "r.json"
    launch(["--programs", str(progs), "--report", str(report)], world, tmp_path / "run",
           hang_timeout_s=120, module="moesim.executor.selfcheck")
    result = json.loads(report.read_text())["programs"]
    assert result["ok"], result


def test_cuda_expert_ffn_matches_cpu():
    """The expert FFN and its hand-written backward agree between CUDA and CPU."""
    from moesim.executor.replay import expert_weights, ffn_backward, ffn_forward
    from moesim.specs import load_model

    model = load_model("tiny-cpu")
    w = expert_weights(model, 0, 1)
    x, dy = torch.randn(33, model.hidden_size), torch.randn(33, model.hidden_size)
    outs = []
    for dev in ("cpu", "cuda"):
        y, saved = ffn_forward(x.to(dev), w.to(dev), model)
        gw = torch.zeros_like(w, device=dev)
        dx = ffn_backward(dy.to(dev), saved, w.to(dev), gw, model)
        outs.append([t.cpu() for t in (y, dx, gw)])
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_one_gpu_run_on_nccl(tmp_path):
    """`moesim run` with one NCCL rank: CUDA tensors, CUDA-event timing, a complete run."""
    from moesim.cli import main
    from moesim.executor.validate import load_named_trace
    from moesim.results import load_run
    from moesim.specs import load_model
    from moesim.traces.io import save_trace

    trace = save_trace(load_named_trace("synth", 1, load_model("tiny-cpu"), 2),
                       tmp_path / "w1.npz")
    out = tmp_path / "run"
    assert main(["run", "--world-size", "1", "--backend", "nccl", "--trace", str(trace),
                 "--model", "tiny-cpu", "--iterations", "0:2", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.complete and run.config["executor"]["dist_backend"] == "nccl"
    assert run.config["executor"]["device"] == "cuda"
