"""The routing trace: who sent how many tokens to which expert, pass by pass.

Shape legend: ``T`` passes, ``L`` MoE layers, ``R`` source ranks, ``E`` logical experts,
``N`` tokens of one rank in one pass, ``K`` the most experts one token picks.

Schema version 1
----------------
A :class:`RoutingTrace` holds

- ``counts_TLRE`` — integers ``[T, L, R, E]`` (int64 in memory; a directory trace maps the
  stored type, see below): token assignments (top-k expanded) that source rank
  ``r``'s tokens made to expert ``e`` in layer ``l`` at pass ``t``. A *pass* is one micro-batch
  on every rank; ``micro_batches_per_iteration`` consecutive passes make one training iteration.
- ``topk_TLRNK`` (optional) — int32 ``[T, L, R, N, K]``: the experts each token picked, ``-1``
  padded where a token picked fewer than ``K`` (variable-k routing).
- ``meta`` — :class:`TraceMeta`, stored as JSON.

Invariants (checked by :func:`validate`): counts are finite non-negative integers; for fixed-k
traces every ``counts[t, l, r, :]`` sums to ``tokens_per_rank · top_k`` (for variable-k traces,
at most that); the metadata's sizes equal the array's; the number of passes is a multiple of
``micro_batches_per_iteration``; per-token ids, when present, lie in ``[-1, E)``, never repeat
within a token, and reproduce the counts exactly.

``variable_k`` means "a row may sum to *less* than ``tokens_per_rank · top_k``": tokens that
picked fewer than ``top_k`` experts, or passes with fewer tokens (inference batches, padding,
dropped tokens). Counts alone cannot tell these apart, so one flag covers both; ``top_k`` is then
the most experts one token picks and ``tokens_per_rank`` the most tokens a rank sends.

On disk
-------
``.npz`` (one compressed file; read with ``allow_pickle=False``) holds arrays ``counts`` and
optionally ``topk``, and a uint8 array ``meta_json`` (UTF-8 JSON); its counts are int64. The
directory form (for traces larger than RAM) holds ``meta.json`` and raw ``counts.npy`` /
``topk.npy`` that are memory-mapped on load. Its counts are stored in the narrowest of uint16,
int32 and int64 that holds ``tokens_per_rank · top_k`` (no count exceeds its row's sum), so a
DeepSeek-V3-shaped trace (4096 tokens × top-8) takes 2 bytes per count; directories written
before this hold int64, and every integer type loads. Readers widen what they take to int64
where it is unsigned or narrower than int32 (:func:`moesim.simulate.iteration_counts`, which
keeps int32 as it is; the policies' history sums use :func:`moesim.policies.base.sum_counts`).
Both forms are written atomically by :func:`moesim.traces.save_trace` and read (then
validated) by :func:`moesim.traces.load_trace`; ``meta.extra`` is free-form JSON (importers
record e.g. ``dropped_zero_layers``, the synthesizer its ``synth_config``).

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

    def replace(self, **changes) -> TraceMeta:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


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

    def select_iterations(self, start: int | None, stop: int | None) -> RoutingTrace:
        """The iterations ``start:stop`` (0-based indices into this trace) as a new trace.

        Slices are views (no copy); ``first_iteration`` moves to the first kept iteration.
        """
        mb = self.meta.micro_batches_per_iteration
        start, stop, _ = slice(start, stop).indices(self.num_iterations)
        stop = max(stop, start)
        topk = None if self.topk_TLRNK is None else self.topk_TLRNK[start * mb:stop * mb]
        first = self.meta.first_iteration + start * self.meta.iteration_stride
        return RoutingTrace(self.counts_TLRE[start * mb:stop * mb],
                            self.meta.replace(first_iteration=first), topk)

    def iteration_numbers(self) -> np.ndarray:
        """Training-iteration number of each iteration in this trace, int64 ``[I]``."""
        m = self.meta
        return m.first_iteration + m.iteration_stride * np.arange(self.num_iterations)
