"""The traces ``moesim validate`` runs: by name (a path, ``synth``, ``smartmoe[=DIR]``) and
fitted to the validation's world size and tiny model (:func:`prepare_trace`).

Split from :mod:`moesim.executor.validate`, which re-exports these names.
Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.specs import ModelSpec

# the real SmartMoE sample: ``$MOESIM_SMARTMOE_DIR``, else ``shared/`` beside the checkout
SMARTMOE_DIR = Path(os.environ.get("MOESIM_SMARTMOE_DIR") or Path(__file__).resolve().parents[2]
                    / "shared" / "data" / "smartmoe-trace")


def _merge(counts: np.ndarray, axis: int, groups: int, what: str) -> np.ndarray:
    """Sum consecutive blocks along ``axis`` into ``groups`` blocks."""
    n = counts.shape[axis]
    if n % groups:
        raise MoesimError(f"cannot regroup {n} {what} into {groups}; choose a divisor of {n}")
    shape = counts.shape[:axis] + (groups, n // groups) + counts.shape[axis + 1:]
    return counts.reshape(shape).sum(axis=axis + 1)


def _scale_rows(counts: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Scale every last-axis row to sum to ``total`` with no entry above ``cap`` (a token picks
    an expert at most once): water-filling, then exact integer row sums."""
    from moesim.traces.synth import fix_row_sums, waterfill

    x = counts.astype(np.float64) + 1e-9
    x = waterfill(x, float(total), float(cap))
    return fix_row_sums(np.floor(x).astype(np.int64), total, cap)


def prepare_trace(trace, world: int, model: ModelSpec):
    """Fit a trace to ``world`` ranks and ``model``'s shape (documented, lossy):

    ranks are regrouped by summing consecutive groups of ``R / world`` ranks; the first
    ``model.num_layers`` layers are kept; experts are merged by summing consecutive groups of
    ``E / model.num_experts``; each iteration keeps its first ``model.micro_batches`` passes;
    every (pass, layer, rank) row is scaled to ``model.tokens_per_rank · top_k`` assignments with
    no expert above ``tokens_per_rank`` (water-filling: merged experts can exceed what top-k
    routing allows), so the routing *shape* (skew, drift) is kept at the tiny model's size.
    """
    from moesim.traces.format import RoutingTrace

    meta = trace.meta
    if meta.top_k != model.top_k:
        raise MoesimError(f"trace top_k={meta.top_k} but model {model.name} has "
                          f"top_k={model.top_k}; use a model with the trace's top-k")
    M = min(meta.micro_batches_per_iteration, model.micro_batches)
    I = trace.num_iterations
    c = np.asarray(trace.counts_TLRE).reshape(I, meta.micro_batches_per_iteration,
                                              *trace.counts_TLRE.shape[1:])[:, :M]
    c = c.reshape(I * M, *c.shape[2:])[:, :model.num_layers]
    if c.shape[1] < model.num_layers:
        raise MoesimError(f"trace has {c.shape[1]} layers, model {model.name} needs "
                          f"{model.num_layers}")
    c = _merge(_merge(c, 2, world, "ranks"), 3, model.num_experts, "experts")
    c = _scale_rows(c, model.tokens_per_rank * model.top_k, model.tokens_per_rank)
    new = meta.replace(num_layers=model.num_layers, num_ranks=world,
                       num_experts=model.num_experts, tokens_per_rank=model.tokens_per_rank,
                       micro_batches_per_iteration=M, variable_k=False, rank_resolved=True,
                       source=f"{meta.source} (regrouped for {world} ranks, {model.name})")
    return RoutingTrace(c, new)


def load_named_trace(name: str, world: int, model: ModelSpec, iterations: int):
    """A trace by name (see the module docstring), fitted to ``world`` and ``model``."""
    from moesim.traces.io import load_trace

    if name == "synth":
        from moesim.traces.synth import SynthConfig, synthesize

        cfg = SynthConfig(num_layers=model.num_layers, num_ranks=world,
                          num_experts=model.num_experts, top_k=model.top_k,
                          tokens_per_rank=model.tokens_per_rank,
                          micro_batches_per_iteration=model.micro_batches,
                          num_iterations=max(iterations, 1), doc_tokens=64, skew_start=1.0)
        return synthesize(cfg, rng=world)
    if name.startswith("smartmoe"):
        from moesim.traces.importers import import_smartmoe

        directory = Path(name.partition("=")[2] or SMARTMOE_DIR)
        if not directory.is_dir():
            raise MoesimError(f"no SmartMoE trace at {directory}; pass smartmoe=DIR")
        trace = import_smartmoe(directory)
        return prepare_trace(trace.select_iterations(0, max(iterations, 1)), world, model)
    trace = load_trace(name)
    if trace.meta.num_ranks != world or trace.meta.num_experts != model.num_experts:
        trace = prepare_trace(trace, world, model)
    return trace
