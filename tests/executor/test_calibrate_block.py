"""Calibration of the real attention block (``attention_block_eff``): the fit, the profile,
the cost model's use of it for a layout's dense ops, and the microbenchmark's output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moesim.costmodel import CostModel
from moesim.errors import MoesimError
from moesim.executor.calibrate_block import PASSES, fit_block, priced_flops, tp_sizes
from moesim.layout import ParallelLayout, parse_layout
from moesim.ops import Compute
from moesim.specs import HardwareProfile, load_model
from tests.sim.layouttoys import free_comm_cluster, lower_one, uniform_model, uniform_trace

PEAK, LAUNCH = 4e10, 2e-5
EFF = {("fwd", 256): 0.21, ("fwd", 512): 0.27, ("bwd", 256): 0.09, ("bwd", 512): 0.12,
       ("recompute", 256): 0.2, ("recompute", 512): 0.26}


def _rows(model) -> list[dict]:
    """Block timings made from known efficiencies (what the fit must give back)."""
    out = []
    for (p, n), eff in EFF.items():
        f = priced_flops(model, p)
        out.append({"kind": "attention_block", "pass": p, "tp": n // model.tokens_per_rank,
                    "rows": n, "flops": f, "t": LAUNCH + f / (PEAK * eff)})
    return out


def test_fit_recovers_known_efficiencies() -> None:
    model = load_model("tiny-cpu")
    curves = fit_block({"peak_flops": PEAK, "launch_s": LAUNCH}, _rows(model))
    assert sorted(curves) == sorted(PASSES)
    for p, curve in curves.items():
        assert [m for m, _ in curve] == [256.0, 512.0]
        for m, e in curve:
            assert e == pytest.approx(EFF[(p, int(m))], rel=1e-9)
    assert fit_block({"peak_flops": PEAK, "launch_s": LAUNCH}, []) == {}


def _cluster(curves, tp: int):
    base = free_comm_cluster(1, 2 * tp)
    hw = HardwareProfile(name="cal", peak_flops=PEAK, mem_bw_GBps=1e12, launch_s=LAUNCH,
                         collective_latency_s=0.0, gemm_eff_curve=((1.0, 0.5), (2.0, 0.5)),
                         dense_gemm_eff_curve=((1.0, 0.9), (4096.0, 0.9)),
                         attention_block_eff=curves)
    from dataclasses import replace

    return replace(base, hardware=hw)


@pytest.mark.parametrize("text", ["tp=2,sp=true,whole_model=false", "pp=2,whole_model=false",
                                  "pp=2,recompute=full,whole_model=false"])
def test_layout_dense_ops_cost_the_measured_block(text: str) -> None:
    """Every attention op a layout lowers is marked as the block and costs exactly the
    calibrated block time of its pass at its TP shard's rows; the default layout's ops stay
    FLOP-priced (the executor runs its stand-in there)."""
    model = uniform_model(2, 4, tokens=256, micro_batches=2, num_attention_heads=4)
    layout = parse_layout(text)
    curves = {p: tuple((float(n), EFF[(p, n)]) for n in (256, 512)) for p in PASSES}
    cluster = _cluster(curves, layout.tp)
    trace = uniform_trace(cluster.world_size // layout.pp, 2, 4, micro_batches=2, tokens=256)
    ctx, _, _ = lower_one(layout, trace, model, cluster)
    cm = CostModel(cluster)
    attn = [op for op in ctx.program.ops if isinstance(op, Compute) and op.kind == "attention"]
    assert attn and all(op.block == "attention" for op in attn)
    passes = set()
    for op in attn:
        p = "recompute" if op.label == "recompute" else op.direction
        passes.add(p)
        n = model.tokens_per_rank * layout.tp
        assert op.gemm_rows == n
        flops = priced_flops(model, p)
        want = LAUNCH + flops / (PEAK * EFF[(p, n)])
        got = cm.durations(type(ctx.program)(ops=[op], num_ranks=ctx.program.num_ranks))[0]
        assert np.allclose(got[got > 0], want, rtol=1e-9)
    assert passes == ({"fwd", "bwd", "recompute"} if "recompute" in text else {"fwd", "bwd"})
    plain, _, _ = lower_one(ParallelLayout(), uniform_trace(2, 2, 4, 2, 256), model,
                            _cluster(curves, 1))
    dense = [op for op in plain.program.ops if isinstance(op, Compute) and op.phase == "dense"]
    assert dense and all(op.block == "" for op in dense)


def test_profile_refuses_a_bad_block_table() -> None:
    with pytest.raises(MoesimError, match="attention_block_eff"):
        HardwareProfile(name="x", peak_flops=1e9, mem_bw_GBps=1.0,
                        attention_block_eff={"sideways": [[1, 0.5]]})
    with pytest.raises(MoesimError, match="gemm_eff_curve"):
        HardwareProfile(name="x", peak_flops=1e9, mem_bw_GBps=1.0,
                        attention_block_eff={"fwd": [[1, 1.5]]})


def test_profile_round_trip_carries_the_block(tmp_path) -> None:
    from moesim.executor.calibrate import fit_profile, write_profile
    from moesim.specs import load_cluster
    from tests.executor.test_calibrate_validate import _raw

    model = load_model("tiny-cpu")
    raw = _raw(model)
    raw["compute"] += _rows(model)
    fit = fit_profile(raw, model)
    hw = load_cluster(write_profile(fit, raw["meta"], tmp_path / "cal.toml")).hardware
    assert sorted(hw.attention_block_eff) == sorted(PASSES)
    peak, launch = fit["compute"]["peak_flops"], fit["compute"]["launch_s"]
    for row in _rows(model):  # the cost model's price of each pass is the measured time
        eff = dict(hw.attention_block_eff[row["pass"]])[float(row["rows"])]
        assert launch + row["flops"] / (peak * eff) == pytest.approx(row["t"], rel=1e-9)


def test_tp_sizes_follow_the_dataflow_checks() -> None:
    model = load_model("small-cpu")
    assert tp_sizes(model, 2) == (1, 2) and tp_sizes(model, 4) == (1, 2, 4)
    assert tp_sizes(uniform_model(1, 4, tokens=64, num_attention_heads=2), 4) == (1, 2)


BENCH = """
import json, os, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from moesim.executor.calibrate_block import bench_attention_block
from moesim.specs import load_model
print(json.dumps(bench_attention_block(load_model("tiny-cpu"), 0, 1, reps=2)))
dist.destroy_process_group()
"""


def test_block_microbenchmark_rows() -> None:
    """The real block runs on one gloo rank and yields one row per pass with its keys."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", BENCH], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PORT": str(port)}, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    model = load_model("tiny-cpu")
    assert [r["pass"] for r in rows] == list(PASSES)
    for r in rows:
        assert set(r) == {"kind", "pass", "tp", "rows", "flops", "t"}
        assert r["kind"] == "attention_block" and r["tp"] == 1
        assert r["rows"] == model.tokens_per_rank and r["t"] > 0
        assert r["flops"] == priced_flops(model, r["pass"])
