"""The golden schedule cases: small programs whose every op start/end per rank and whole
iteration record were captured from the engine before the scale work of issue 16
(``make_golden.py`` writes them to ``schedules.npz``; ``tests/sim/test_golden.py`` checks the
simulator still produces them).

A case is ``(name, policy, knobs, layout text, dense layers, nodes)``: a tiny model on 2 or 4
nodes × 4 GPUs of a real preset (so intra- and inter-node links and the GEMM curve all matter), with
skewed random traces of 3 iterations × 2 micro-batches (relayouts and re-plans happen).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from unittest import mock

import numpy as np

from moesim import simulate as sim
from moesim.layout import parse_layout
from moesim.policies.base import make_policy
from moesim.specs import ModelSpec, load_cluster

from ..simtoys import random_trace

ITERATIONS = 3
POLICIES = ("static_ep", "swiftmoe", "eplb", "laer_fsep", "hecate", "flexmoe", "smartmoe",
            "fastermoe", "fastermoe_oracle")
LAYOUTS = ("pp=2", "pp=2,pp_schedule=gpipe", "pp=2,pp_schedule=interleaved,vpp=2",
           "tp=2,sp=true", "tp=2,ep=1", "cp=2", "zero=1", "zero=3", "recompute=full",
           "recompute=full,recompute_num_layers=1", "recompute=selective",
           "recompute=selective,recompute_modules=core_attn+layernorm+moe_act",
           "a2a_overlap=true", "pp=2,a2a_overlap=true", "ep=4", "pp=2,tp=2,sp=true,zero=1",
           "pp=2,ep=2,recompute=full,a2a_overlap=true,zero=1")

TIMELINE_CASES = ("default/static_ep", "default/laer_fsep", "layout/pp=2,a2a_overlap=true")


def model(dense_layers: int = 0, vocab: int = 0) -> ModelSpec:
    """4 MoE layers, 8 experts top-2, 64 tokens per rank (attention heads for TP/CP)."""
    return ModelSpec(name="golden", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                     num_experts=8, top_k=2, seq_len=64, tokens_per_rank=64, micro_batches=2,
                     num_attention_heads=4, num_kv_heads=2, num_dense_layers=dense_layers,
                     vocab_size=vocab)


def cases() -> list[tuple[str, str, dict, str | None, int, int]]:
    """``(name, policy, knobs, layout text, dense layers, nodes)`` of every golden case
    (nodes of 4 GPUs)."""
    out = [(f"default/{p}", p, {}, None, 0, 2) for p in POLICIES]
    out.append(("default/static_ep_cf1", "static_ep", {"capacity_factor": "1.0"}, None, 0, 2))
    out.append(("default/static_ep_ep4", "static_ep", {"ep_size": "4"}, None, 0, 2))
    out.append(("default/swiftmoe_cf1", "swiftmoe", {"capacity_factor": "1.0"}, None, 0, 2))
    out += [(f"layout/{t}", "static_ep", {}, t, 1, 2) for t in LAYOUTS]
    out += [(f"pp2/{p}", p, {}, "pp=2,whole_model=false", 0, 2) for p in POLICIES]
    out += [(f"tp2/{p}", p, {}, "tp=2,sp=true", 0, 2) for p in POLICIES[:5]]
    out += [(f"16gpu/{p}", p, {}, None, 0, 4) for p in POLICIES[:5]]
    out += [("16gpu/static_ep_cf1", "static_ep", {"capacity_factor": "1.0"}, None, 0, 4),
            ("16gpu/pp=2,ep=4", "static_ep", {}, "pp=2,ep=4,zero=1", 1, 4),
            ("16gpu/pp=4,a2a_overlap", "static_ep", {}, "pp=4,a2a_overlap=true,"
             "recompute=full", 1, 4)]
    return out


def trace_ranks(layout: str | None, nodes: int) -> int:
    lay = parse_layout(layout)
    return 4 * nodes // lay.pp


@contextmanager
def capturing():
    """Yield a list that collects ``(start_OR, end_OR, record)`` of every simulated iteration
    and its ops' keys (wraps :func:`moesim.simulate.build_record`, which gets each
    iteration's schedule)."""
    got: list = []
    real = sim.build_record

    def spy(ctx, sched, *args, **kw):
        record = real(ctx, sched, *args, **kw)
        got.append((np.array(sched.start_OR, dtype=np.float64),
                    np.array(sched.end_OR, dtype=np.float64), record, _op_keys(ctx)))
        return record

    with mock.patch.object(sim, "build_record", spy):
        yield got


def _op_keys(ctx) -> list[str]:
    return [f"{type(op).__name__}/{op.phase}/{op.direction}/{op.stream}/{op.layer}/"
            f"{op.micro_batch}/{op.label}/{op.deps}" for op in ctx.program.ops]


def run_case(case: tuple) -> list:
    """Simulate one case (timeline of iteration 1 included); the captured iterations."""
    _, policy, knobs, layout, dense, nodes = case
    lay = parse_layout(layout) if layout else None
    trace = random_trace(ITERATIONS, layers=4, ranks=trace_ranks(layout, nodes), experts=8,
                         tokens=64, top_k=2, micro_batches=2, seed=7)
    cluster = load_cluster("h100-32x8").with_shape(nodes, 4)
    with capturing() as got:
        sim.simulate(trace, model(dense, 512 if dense else 0), cluster,
                     make_policy(policy, knobs), progress=False, allow_oom=True,
                     timeline_iterations=(1,), layout=lay)
    return got


def flatten(name: str, got: list) -> dict[str, np.ndarray]:
    """The npz entries of one case's captured iterations."""
    out: dict[str, np.ndarray] = {}
    for it, (start, end, rec, keys) in enumerate(got):
        p = f"{name}/{it}/"
        out[p + "start_OR"], out[p + "end_OR"] = start, end
        out[p + "ops"] = np.array(hashlib.sha256("\n".join(keys).encode()).hexdigest())
        summary = {k: v for k, v in rec.summary.items() if k != "planner_time_s"}  # wall time
        out[p + "summary"] = np.array(json.dumps(summary, sort_keys=True))
        for field in ("busy_s_LFR", "start_s_LFR", "end_s_LFR", "expert_load_LE",
                      "rank_tokens_LR", "dropped_LR"):
            out[p + field] = np.asarray(getattr(rec, field))
        out[p + "traffic_FRR"] = np.asarray(rec.traffic_FRR, dtype=np.float64)
        for comp, arr in rec.memory_CR.items():
            out[p + "memory/" + comp] = np.asarray(arr, dtype=np.float64)
        if rec.timeline is not None and name in TIMELINE_CASES:
            out[p + "timeline"] = np.array(json.dumps(rec.timeline, sort_keys=True))
    return out
