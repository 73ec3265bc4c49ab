"""The published layouts fit: LAER-MoE's Mixtral runs on 4 × 8 A100-80GB under its Megatron and
its FSEP layouts, and DeepSeek-V3 on 2048 H800 with PP 16, EP 64, ZeRO-1 — each simulates
without an out-of-memory flag and prints a per-stage memory table."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.layout import load_layout
from moesim.simulate import simulate
from moesim.specs import load_cluster, load_model

from .simtoys import make_trace

SEQ, BATCH = 8192, 128
LAER = (("mixtral-8x7b-e8k2", 32, "laer-megatron-e8k2", 8),
        ("mixtral-8x7b-e16k4", 24, "laer-megatron-e16k4", 4),
        ("mixtral-8x22b-e8k2", 18, "laer-megatron-e8k2", 8),
        ("mixtral-8x22b-e16k4", 14, "laer-megatron-e16k4", 4))


def skewed_trace(layers: int, ranks: int, experts: int, top_k: int, tokens: int,
                 micro_batches: int, seed: int = 0):
    """One iteration of skewed (Dirichlet 0.5) routing with exact row sums ``tokens · k``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(experts, 0.5), size=layers)
    counts = np.stack([np.stack([rng.multinomial(tokens * top_k, p[l], size=ranks)
                                 for l in range(layers)]) for _ in range(micro_batches)])
    return make_trace(counts.astype(np.int32), top_k, micro_batches)


@pytest.mark.parametrize("model_name, layers, megatron, tp", LAER)
@pytest.mark.parametrize("system", ["megatron", "fsep"])
def test_laer_runs_fit(model_name: str, layers: int, megatron: str, tp: int,
                       system: str) -> None:
    cluster = load_cluster("a100-4x8-ib800")
    W = cluster.world_size
    if system == "megatron":
        tokens, mb, layout, policy = SEQ // tp, BATCH // (W // tp), load_layout(megatron), \
            "static_ep"
    else:
        tokens, mb, layout, policy = SEQ * (BATCH // W) // 2, 2, load_layout("laer-fsep"), \
            "laer_fsep"
    model = load_model(model_name).replace(num_layers=layers, seq_len=SEQ)
    trace = skewed_trace(layers, W, model.num_experts, model.top_k, tokens, mb)
    s = simulate(trace, model, cluster, policy, progress=False, layout=layout)
    assert s.rows[0]["oom"] == 0 and s.rows[0]["peak_memory_bytes"] < cluster.gpu_memory_bytes
    assert "(fits)" in s.stage_table and "peak: stage 0" in s.stage_table


@pytest.mark.slow
def test_deepseek_v3_fits_on_2048_h800() -> None:
    cluster, layout = load_cluster("h800-256x8"), load_layout("deepseek-v3")
    model = load_model("deepseek-v3").replace(micro_batches=16)
    n = cluster.world_size // layout.pp
    trace = skewed_trace(model.num_layers, n, model.num_experts, model.top_k,
                         model.tokens_per_rank, 16)
    s = simulate(trace, model, cluster, "static_ep", progress=False, layout=layout)
    assert s.rows[0]["oom"] == 0
    table = s.stage_table.splitlines()
    assert len(table) == 1 + layout.pp + 1 and table[-1].endswith("(fits)")
    assert s.config["parallel"]["dp"] == 2048 // 16
