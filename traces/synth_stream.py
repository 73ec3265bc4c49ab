"""Synthetic traces larger than memory: :mod:`moesim.traces.synth`'s generator written to a
directory trace a chunk of passes at a time.

:func:`synthesize_to_dir` draws the generative model of :func:`moesim.traces.synthesize`
(per-layer popularity, dynamics, document and rank tilts, top-k cap, systematic rounding; the
same per-layer plan, :func:`~moesim.traces.synth.layer_cell_plan`) and hands each chunk of
passes to :class:`moesim.traces.io.TraceDirWriter`, so memory stays bounded by one chunk
(``max_cells`` counts, at least one pass) plus the per-layer plans (``[T, E]`` and ``[R, E]``
floats), whatever the number of iterations. The counts of each (pass, layer) come from
:mod:`moesim.traces.synth_kernel` (a C loop, or the same numbers in numpy): the log-normal
factor of a cell is drawn on a 65536-point grid (the sum of two 256-point normal grids, tails at
±4.1 σ) and normalised to mean one exactly, its random bits come from a counter-based generator
(SplitMix64), and rows over the top-k cap are water-filled as in ``synthesize``. So its draws
(not its statistics) differ from ``synthesize`` for the same seed, and they depend on neither
``workers`` nor ``max_cells``; each layer's plan and key come from its own generator spawned from
``rng``. Layers run on ``workers`` threads (the C loop releases the GIL), and a chunk is written
by a writer thread while the next one is drawn, without the writer's row check: every row
sums to ``N·k`` by construction (the kernel's last count is ``N·k`` minus the others; tested),
and every load of the trace validates it. Counts are stored in the narrowest type that
holds ``N·k`` (uint16 for DeepSeek-V3's 4096 × 8; see :func:`moesim.traces.io.count_dtype`).

``meta.extra["sampler"]`` is ``"stream-v2"`` for these traces (``"stream"`` was the first
streaming sampler, 16-bit normals from numpy's generator: other numbers, same statistics).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moesim.errors import MoesimError
from moesim.traces.io import TraceDirWriter
from moesim.traces.synth import (
    SynthConfig,
    layer_cell_plan,
    layer_log_popularity_IE,
    synth_meta,
)
from moesim.traces.synth_kernel import draw_counts, factor_table_EQ

SAMPLER = "stream-v2"
CHUNK_CELLS = 1 << 25     # counts per chunk handed to the writer (64 MiB of uint16)


class LayerPlan(NamedTuple):
    """What one layer's counts are drawn from: per-pass log-normal sd and log share ``[T, E]``,
    the rank tilt factor ``ρ = exp(rank tilt)`` ``[R, E]`` and the layer's generator key."""

    sd_TE: np.ndarray
    log_share_TE: np.ndarray
    rho_RE: np.ndarray
    key: int


def layer_plan(config: SynthConfig, rng: np.random.Generator) -> LayerPlan:
    """One layer's :class:`LayerPlan`, drawn from the layer's own generator ``rng``: the
    in-memory model's popularity and cell plan (:func:`~moesim.traces.synth.layer_cell_plan`),
    whose shift ``log a − sd²/2`` gives back the log share ``log a``, then a 64-bit key."""
    sd_TE, shift_TE, rank_RE = layer_cell_plan(config, layer_log_popularity_IE(config, rng),
                                               rng)
    sd64 = sd_TE.astype(np.float64)
    log_share_TE = shift_TE + sd64 * sd64 / 2
    key = int(rng.integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True))
    return LayerPlan(sd_TE, log_share_TE, np.exp(rank_RE, dtype=np.float32), key)


def synthesize_to_dir(config: SynthConfig, path: str | os.PathLike, *,
                      rng: np.random.Generator | int | None = None, workers: int | None = None,
                      max_cells: int = CHUNK_CELLS) -> Path:
    """Draw a synthetic trace straight into the directory ``path`` (atomically, see
    :class:`~moesim.traces.io.TraceDirWriter`); deterministic given ``config`` and ``rng``
    (an int seed or a Generator; ``None`` is seed 0). Returns ``path``."""
    c = config
    if c.per_token:
        raise MoesimError("per-token traces are small by construction (per_token=True); write "
                          "them with synthesize() and save_trace, or drop per_token")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    layer_rngs = rng.spawn(c.num_layers)
    L, R, E, T = c.num_layers, c.num_ranks, c.num_experts, c.num_passes
    step = max(1, max_cells // (L * R * E))
    workers = max(1, min(workers or os.cpu_count() or 1, 8, L))
    meta = synth_meta(c, sampler=SAMPLER)
    with (ThreadPoolExecutor(max_workers=workers) as pool,
          ThreadPoolExecutor(max_workers=1) as disk,
          TraceDirWriter(path, meta, T, sync_each=True) as writer):
        plans = list(pool.map(lambda l: layer_plan(c, layer_rngs[l]), range(L)))
        written = None
        buffers = [np.empty((min(T, step), L, R, E), dtype=writer.dtype) for _ in range(2)]
        for i, t0 in enumerate(range(0, T, step)):   # two buffers, reused: no fresh pages
            chunk_TLRE = buffers[i % 2][:min(T, t0 + step) - t0]
            list(pool.map(lambda l, t0=t0, chunk=chunk_TLRE: _draw_layer(
                c, plans[l], t0, chunk[:, l]), range(L)))
            if written is not None:
                written.result()               # one chunk in flight, the other being drawn
            written = disk.submit(writer.write, chunk_TLRE, check=False)   # exact rows
        if written is not None:
            written.result()
    return Path(path)


def _draw_layer(config: SynthConfig, plan: LayerPlan, t0: int, out_TRE: np.ndarray) -> None:
    """One layer's counts for passes ``t0 … t0 + len(out)`` into ``out_TRE``, pass by pass."""
    c = config
    total, cap = c.tokens_per_rank * c.top_k, c.tokens_per_rank
    for t in range(out_TRE.shape[0]):
        tab_EQ = factor_table_EQ(plan.sd_TE[t0 + t], plan.log_share_TE[t0 + t])
        draw_counts(tab_EQ, plan.rho_RE, plan.key, (t0 + t) * c.num_ranks, total, cap,
                    out_TRE[t])
