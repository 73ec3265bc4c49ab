"""A run's inputs, as both backends fit them: the trace loaded and fitted to the cluster, the
model fitted to the trace, the layout planned (:func:`prepare_inputs`), the iterations
selected, and the configuration ``config.json`` stores (:func:`run_config`,
:func:`layout_config`).

Split from :mod:`moesim.simulate`, which re-exports every public name here (the executor's seam:
``moesim.executor.plan`` and the worker import them from there or here alike).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim import validation
from moesim.errors import MoesimError
from moesim.specs import Cluster, ModelSpec, spec_to_dict
from moesim.traces.format import RoutingTrace


@dataclass(frozen=True)
class RunInputs:
    """What :func:`prepare_inputs` fits for a run: the trace and model as the run sees them,
    the policy (EP size and recompute knob set from the layout), the layout plan (None: the
    default layout) and the view cluster the policy decides on (one pipeline stage's ranks)."""

    trace: RoutingTrace
    model: ModelSpec
    policy: Any
    layout_plan: Any
    view: Cluster


def prepare_inputs(trace: RoutingTrace, model: ModelSpec, cluster: Cluster, policy: Any,
                   layout: Any = None, *, regroup: bool = False, stop: int | None = None,
                   rng_seed: int = 0) -> RunInputs:
    """A run's set-up under ``layout`` (both backends call this): the layout checked and
    planned (:func:`moesim.layout_run.prepare`), the trace regrouped to the view's ranks when
    ``regroup`` (only its first ``stop`` iterations, when given), its source ranks checked
    against one stage's, then fitted (:func:`fit_inputs`)."""
    from moesim import layout_run

    lplan, view, policy = layout_run.prepare(layout, model, cluster, policy,
                                             trace.meta.micro_batches_per_iteration)
    if regroup and trace.meta.rank_resolved and trace.meta.num_ranks != view.world_size:
        from moesim.traces.regroup import regroup_ranks

        if stop is not None:
            trace = trace.select_iterations(0, min(stop, trace.num_iterations))
        trace = regroup_ranks(trace, view.world_size, rng_seed)
    if lplan is not None and trace.meta.rank_resolved:
        layout_run.check_trace_ranks(trace.meta.num_ranks, lplan)
    trace, model = fit_inputs(trace, model, view, rng_seed)
    return RunInputs(trace=trace, model=model, policy=policy, layout_plan=lplan, view=view)


def layout_config(config: dict, layout_plan: Any, regroup: bool) -> dict:
    """``config`` (of :func:`run_config`) with the run's regroup option and its layout
    (:func:`moesim.layout_run.config_entry`), as ``config.json`` records them."""
    from moesim import layout_run

    if regroup:
        config["options"]["regroup"] = True
    if layout_plan is not None:
        config["parallel"] = json_normal(layout_run.config_entry(layout_plan))
    return config


def load_run_trace(trace: RoutingTrace | str | Path, stop: int | None = None) -> RoutingTrace:
    """The trace (a path is loaded; a directory trace is read only up to iteration ``stop``,
    which is all the run and its policy's history see)."""
    if isinstance(trace, RoutingTrace):
        return trace
    path = Path(trace)
    if not path.exists():
        raise MoesimError(f"no trace file {str(path)!r}; check the path (or run `moesim trace "
                          "synth` to make one)")
    from moesim.traces import io as trace_io

    return trace_io.load_trace(path, stop_iteration=stop)


def resolve_policy(policy: Any) -> Any:
    """A policy object: a registered name is made (:func:`moesim.policies.base.make_policy`)."""
    from moesim.policies.base import make_policy

    return make_policy(policy) if isinstance(policy, str) else policy


def fit_inputs(trace: RoutingTrace, model: ModelSpec, cluster: Cluster, seed: int = 0
               ) -> tuple[RoutingTrace, ModelSpec]:
    """The trace and model a run uses: :func:`fit_trace` then :func:`fit_model` (both
    backends call this, so they see the same tokens per rank and micro-batches)."""
    trace = fit_trace(trace, cluster, seed)
    return trace, fit_model(model, trace)


def fit_trace(trace: RoutingTrace, cluster: Cluster, seed: int = 0) -> RoutingTrace:
    """Spread rank-aggregated traces over the world (seeded); reject a rank-count mismatch."""
    meta, world = trace.meta, cluster.world_size
    if not meta.rank_resolved and meta.num_ranks != world:
        from moesim import traces

        return traces.spread_over_ranks(trace, world, rng=seed)
    if meta.num_ranks != world:
        nodes = meta.num_ranks / cluster.gpus_per_node
        fix = (f"pass --nodes {int(nodes)}" if nodes == int(nodes) else
               "use a cluster whose GPU count equals the trace's ranks")
        fix += (f", or regroup the trace to {world} ranks (moesim simulate --regroup, or "
                f"moesim trace regroup --ranks {world})")
        raise MoesimError(f"the trace has {meta.num_ranks} ranks but cluster {cluster.name} has "
                          f"{world} GPUs ({cluster.num_nodes} nodes x {cluster.gpus_per_node}); "
                          f"{fix}")
    return trace


def fit_model(model: ModelSpec, trace: RoutingTrace) -> ModelSpec:
    """The model with the trace's tokens per rank and micro-batches; shapes must agree."""
    meta = trace.meta
    for name, ours, theirs in (("num_layers", model.num_layers, meta.num_layers),
                               ("num_experts", model.num_experts, meta.num_experts),
                               ("top_k", model.top_k, meta.top_k)):
        if ours != theirs:
            raise MoesimError(f"model {model.name} has {name}={ours} but the trace has "
                              f"{theirs}; choose a model preset matching the trace")
    return model.replace(tokens_per_rank=meta.tokens_per_rank,
                         micro_batches=meta.micro_batches_per_iteration)


def select_iterations(iterations: Any, available: int) -> list[int]:
    """The trace iteration indices a run covers: all (None), ``(start, stop)`` or an iterable;
    each must lie within the trace's ``available`` iterations."""
    if iterations is None:
        its = list(range(available))
    elif isinstance(iterations, tuple) and len(iterations) == 2:
        its = validation.iterations_within(iterations, available)
    else:
        its = [int(i) for i in iterations]
    bad = [i for i in its if not 0 <= i < available]
    if bad:
        raise MoesimError(f"iteration {bad[0]} is outside the trace's 0..{available - 1}; "
                          "choose --iterations within it")
    if not its:
        raise MoesimError(f"no iterations selected (the trace has {available}); widen "
                          "--iterations")
    return its


def run_config(trace: RoutingTrace, trace_path: str | None, model: ModelSpec,
               cluster: Cluster, policy: Any, its: list[int], rng_seed: int,
               allow_oom: bool) -> dict:
    """The full configuration stored in ``config.json``."""
    knobs = dataclasses.asdict(policy.config) if dataclasses.is_dataclass(policy.config) else {}
    return json_normal({
        "model": spec_to_dict(model), "cluster": spec_to_dict(cluster),
        "policy": {"name": policy.name, "knobs": knobs,
                   **_resolved(policy, model, cluster)},
        "trace": {"path": trace_path, "meta": trace.meta.to_dict()},
        "options": {"rng_seed": rng_seed, "allow_oom": allow_oom},
        "iterations": [its[0], its[-1] + 1] if its == list(range(its[0], its[-1] + 1))
        else its,
    })


def _resolved(policy: Any, model: ModelSpec, cluster: Cluster) -> dict:
    """``{"resolved": {...}}`` when the policy resolves knobs by topology, else ``{}``."""
    fn = getattr(policy, "resolved_knobs", None)
    out = fn(model, cluster) if fn is not None else {}
    return {"resolved": out} if out else {}


def json_normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists), so a resumed run's config compares
    equal to the stored one."""
    return json.loads(json.dumps(jsonable(obj)))


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy arrays and scalars as Python lists and numbers, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj
