"""The routing trace: who sent how many tokens to which expert, pass by pass.

Shape legend: ``T`` passes, ``L`` MoE layers, ``R`` source ranks, ``E`` logical experts,
``N`` tokens of one rank in one pass, ``K`` the most experts one token picks.

Schema version 1
----------------
A :class:`RoutingTrace` holds

- ``counts_TLRE`` — int64 ``[T, L, R, E]``: token assignments (top-k expanded) that source rank
  ``r``'s tokens made to expert ``e`` in layer ``l`` at pass ``t``. A *pass* is one micro-batch
  on every rank; ``micro_batches_per_iteration`` consecutive passes make one training iteration.
- ``topk_TLRNK`` (optional) — int32 ``[T, L, R, N, K]``: the experts each token picked, ``-1``
  padded where a token picked fewer than ``K`` (variable-k routing).
- ``meta`` — :class:`TraceMeta`, stored as JSON.

Invariants (checked by :func:`validate`): counts are finite non-negative integers; for fixed-k
traces every ``counts[t, l, r, :]`` sums to ``tokens_per_rank · top_k`` (for variable-k traces,
at most that); the metadata's sizes equal the array's; per-token ids, when present, reproduce the
counts exactly.

On disk
-------
``.npz`` (one file; read with ``allow_pickle=False``) holds arrays ``counts`` and optionally
``topk``, and a uint8 array ``meta_json``. The directory form (for traces larger than RAM) holds
``meta.json`` and raw ``counts.npy`` / ``topk.npy`` that are memory-mapped on load.

Example meta::

    {"schema_version": 1, "num_layers": 24, "num_ranks": 16, "num_experts": 32, "top_k": 2,
     "tokens_per_rank": 2048, "micro_batches_per_iteration": 4, "iteration_stride": 10,
     "first_iteration": 1, "variable_k": false, "rank_resolved": true,
     "hidden_size": 1024, "ffn_hidden_size": 4096, "model": "gpt-moe",
     "source": "SmartMoE-AE moe_trace", "license": "GPL-3.0"}

``rank_resolved`` is false for traces recorded as totals over ranks (SGLang ``stat``, EPLB
weights): they are stored with ``R = 1`` and :func:`moesim.traces.spread_over_ranks` splits
them when a simulation needs per-rank counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TraceMeta:
    """Trace metadata (see the module docstring)."""

    schema_version: int = SCHEMA_VERSION
    num_layers: int
    num_ranks: int
    num_experts: int
    top_k: int
    tokens_per_rank: int
    micro_batches_per_iteration: int = 1
    iteration_stride: int = 1
    first_iteration: int = 0
    variable_k: bool = False
    rank_resolved: bool = True
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    model: str = ""
    source: str = ""
    license: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RoutingTrace:
    """Routing counts (and optional per-token choices) with their metadata."""

    counts_TLRE: np.ndarray
    meta: TraceMeta
    topk_TLRNK: np.ndarray | None = None

    @property
    def num_passes(self) -> int:
        return int(self.counts_TLRE.shape[0])

    @property
    def num_iterations(self) -> int:
        return self.num_passes // self.meta.micro_batches_per_iteration

    def iteration_counts(self, iteration: int) -> np.ndarray:
        """Counts ``[passes, L, R, E]`` of one iteration (0-based index into this trace)."""
        mb = self.meta.micro_batches_per_iteration
        return self.counts_TLRE[iteration * mb:(iteration + 1) * mb]
