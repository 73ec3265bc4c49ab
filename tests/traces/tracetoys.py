"""Small RoutingTrace factory shared by the trace tests (imported, unlike conftest)."""

from __future__ import annotations

import numpy as np

from moesim.traces import RoutingTrace, TraceMeta


def make_trace(T: int = 4, L: int = 2, R: int = 3, E: int = 5, k: int = 2, N: int = 6,
               mb: int = 2, seed: int = 0, with_topk: bool = False) -> RoutingTrace:
    """A small valid trace drawn token by token (so per-token ids are available)."""
    rng = np.random.default_rng(seed)
    topk = np.argsort(rng.random((T, L, R, N, E)), axis=-1)[..., :k].astype(np.int32)
    counts = np.zeros((T, L, R, E), dtype=np.int64)
    for idx in np.ndindex(T, L, R):
        counts[idx] = np.bincount(topk[idx].ravel(), minlength=E)
    meta = TraceMeta(num_layers=L, num_ranks=R, num_experts=E, top_k=k, tokens_per_rank=N,
                     micro_batches_per_iteration=mb, iteration_stride=10, first_iteration=1,
                     model="tiny", source="test", license="MIT", extra={"note": [1, 2]})
    return RoutingTrace(counts, meta, topk if with_topk else None)
