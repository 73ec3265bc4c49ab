"""Constants and trace helpers of the simulator tests (fixtures in ``conftest.py``).

A tiny hand-checkable set-up: a constant GEMM efficiency of 0.5, 2 nodes × 2 GPUs with
10 GB/s NVLink and 1 GB/s NICs. ``tests/sim`` is a package so that its modules never shadow
another folder's top-level ``conftest`` module.
"""

from __future__ import annotations

import numpy as np

from moesim.traces.format import RoutingTrace, TraceMeta

PEAK, MEM_BW, LAUNCH, EFF, NCCL_LAT = 1e12, 100e9, 1e-6, 0.5, 1e-6
INTRA_BW, INTRA_LAT, INTER_BW, INTER_LAT = 10e9, 1e-6, 1e9, 5e-6


def make_trace(counts_TLRE: np.ndarray, top_k: int, micro_batches: int = 1) -> RoutingTrace:
    """A RoutingTrace around raw counts (tokens per rank = row sum / k)."""
    counts = np.asarray(counts_TLRE, dtype=np.int64)
    T, L, R, E = counts.shape
    meta = TraceMeta(num_layers=L, num_ranks=R, num_experts=E, top_k=top_k,
                     tokens_per_rank=int(counts[0, 0, 0].sum()) // top_k,
                     micro_batches_per_iteration=micro_batches)
    return RoutingTrace(counts, meta)


def random_trace(iterations: int, layers: int = 2, ranks: int = 4, experts: int = 4,
                 tokens: int = 64, top_k: int = 2, micro_batches: int = 2,
                 seed: int = 0) -> RoutingTrace:
    """A skewed multinomial trace with exact row sums ``tokens · top_k``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(experts), size=layers)
    counts = np.stack([[rng.multinomial(tokens * top_k, p[l], size=ranks)
                        for l in range(layers)] for _ in range(iterations * micro_batches)])
    return make_trace(counts, top_k, micro_batches)
