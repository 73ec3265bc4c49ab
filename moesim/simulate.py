"""``simulate``: replay a routing trace through a policy on a modelled cluster.

Per iteration: build the :class:`~moesim.policies.base.History` the policy may see (earlier
passes only; this iteration's counts too for oracle policies), ``policy.decide``, lower the
decision with this iteration's counts (:mod:`moesim.lowering`), cost every op
(:mod:`moesim.costmodel`), schedule (:mod:`moesim.engine`), check memory, and write an
:class:`~moesim.results.IterationRecord` (backend ``simulator``).

The seam the executor shares (public and stable; ``moesim.executor.plan`` and the worker use
it, so both backends fit, decide and record alike): :func:`prepare_inputs` (a layout's set-up,
then :func:`fit_inputs` = :func:`fit_trace` + :func:`fit_model`), :func:`layout_config`,
:func:`build_history` and :func:`decide_iteration` (the policy loop's inputs: History and the
per-iteration generator), :func:`run_config`, :func:`phase_times`, :func:`op_bytes`.

Shape legend: ``M`` passes of the iteration, ``L`` layers, ``F`` phases, ``R`` ranks, ``E``
experts, ``O`` ops, ``P`` physical slots, ``G`` destination ranks.

Summary columns (one row per iteration):

- ``step_time_s`` — the iteration's makespan: max over ranks of the last op's end.
- ``moe_time_s`` — max over ranks of the time the rank spent in ``route``, ``dispatch``,
  ``expert`` and ``combine`` ops (forward and backward, durations summed).
- ``a2a_time_s`` — max over ranks of the time in ``dispatch`` + ``combine`` all-to-alls.
- ``straggler_ratio`` — ``max_r x_r / mean_r x_r`` where ``x_r`` is rank ``r``'s expert-compute
  time over the iteration (all ``expert`` ops, forward and backward); 1 is perfectly balanced
  (1 when no rank computes).
- ``tokens_total`` / ``tokens_dropped`` — token assignments (top-k expanded) of the iteration
  and those dropped by capacity.
- ``peak_memory_bytes`` — max over ranks of the GPU memory model's total; ``peak_host_bytes``
  likewise for host memory; ``oom`` 1 when the plan does not fit (only with ``allow_oom``).
- ``relayout_bytes`` — bytes moved by ``relayout`` ops; ``planner_time_s`` — the policy's own
  planner time (``Decision.planner_time_s``).
- load and traffic metrics (overload factor, imbalance, hottest link, expert-load percentiles):
  :mod:`moesim.metrics` (``COLUMNS``), with the per-GPU-pair traffic ``traffic_FRR``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim import memory as memory_model
from moesim import validation
from moesim.costmodel import CostModel
from moesim.engine import schedule
from moesim.errors import MoesimError, OutOfMemoryError
from moesim.lowering import LoweringContext, lower_iteration_ctx, route_plan
from moesim.placement import Decision, Placement
from moesim.records import (  # noqa: F401  (re-exported: the executor's seam uses them)
    MOE_PHASES,
    PHASE_INDEX,
    build_record,
    ep_groups,
    expert_load,
    op_bytes,
    phase_times,
    summarize,
)
from moesim.results import IterationRecord, RunWriter
from moesim.specs import Cluster, ModelSpec, spec_to_dict
from moesim.traces.format import RoutingTrace


@dataclass
class SimSummary:
    """Result of :func:`simulate`: per-iteration summary rows and where they were written."""

    rows: list[dict]
    config: dict
    out_dir: Path | None = None
    run_rows: list[dict] | None = None  # every iteration of the run dir (after a resume too)
    stage_table: str = ""  # per-stage memory table of the peak iteration (layouts only)

    def whole_run(self) -> SimSummary:
        """The summary of every iteration in the run directory, earlier invocations too."""
        if self.run_rows is None:
            return self
        return dataclasses.replace(self, rows=self.run_rows)

    def column(self, name: str) -> np.ndarray:
        """One summary column over the simulated iterations."""
        return np.array([row[name] for row in self.rows], dtype=np.float64)

    def mean(self, name: str) -> float:
        col = self.column(name)
        return float(col.mean()) if len(col) else float("nan")


@dataclass
class _Run:
    """The loop's fixed inputs and its rolling state (previous decision, routing plan)."""

    trace: RoutingTrace
    model: ModelSpec
    cluster: Cluster
    policy: Any
    rng_seed: int
    allow_oom: bool
    cost: CostModel
    previous: Decision | None = None
    plan_for: Decision | None = None
    plan: Any = None
    cache: dict = field(default_factory=dict)
    timeline_iterations: frozenset = field(default_factory=frozenset)
    view: Cluster | None = None  # one pipeline stage's cluster (the cluster itself: no PP)
    layout_plan: Any = None
    stage_table: tuple[float, str] = (-1.0, "")  # (peak bytes, table) of the peak iteration


def simulate(trace: RoutingTrace | str | Path, model: ModelSpec, cluster: Cluster,
             policy: Any, *, iterations: Iterable[int] | tuple[int, int] | None = None,
             rng_seed: int = 0, out_dir: str | Path | None = None,
             timeline_iterations: Iterable[int] = (), resume: bool = False,
             progress: bool = True, allow_oom: bool = False,
             on_iteration: Callable[[dict], None] | None = None,
             regroup: bool = False, layout: Any = None) -> SimSummary:
    """Simulate ``policy`` (a Policy or a registered name) on ``trace`` → :class:`SimSummary`.

    ``iterations``: trace iteration indices (``(start, stop)`` or any iterable; default all).
    ``regroup``: a per-rank trace whose rank count differs from the cluster's GPUs is regrouped
    to them (:func:`moesim.traces.regroup.regroup_ranks`, seeded by ``rng_seed``; recorded in
    the config's trace metadata and ``options.regroup``); without it such a trace is refused.
    ``out_dir``: write a RunResult there (``resume=True`` continues an interrupted run after its
    last written iteration, restoring the previous decision from the stored state).
    ``on_iteration`` gets each summary row as it is produced. Raises
    :class:`~moesim.errors.OutOfMemoryError` when the plan does not fit, unless ``allow_oom``.
    ``layout``: a :class:`~moesim.layout.ParallelLayout` (None: the default, every rank one
    stage with the policy's own EP and optimizer scheme).
    """
    trace_path = None if isinstance(trace, RoutingTrace) else str(trace)
    stop = int(iterations[1]) if isinstance(iterations, tuple) and len(iterations) == 2 \
        else None   # a regrouped trace needs no later iterations
    inputs = prepare_inputs(_load(trace, stop), model, cluster, _policy(policy), layout,
                            regroup=regroup, stop=stop, rng_seed=rng_seed)
    trace, model, policy, lplan = inputs.trace, inputs.model, inputs.policy, inputs.layout_plan
    its = _iterations(iterations, trace.num_iterations)
    validation.timeline_within([int(i) for i in timeline_iterations], its)
    validation.plan_size(policy, model.num_layers, cluster.world_size, model.num_experts)
    config = layout_config(run_config(trace, trace_path, model, cluster, policy, its, rng_seed,
                                      allow_oom), lplan, regroup)
    run = _Run(trace, model, cluster, policy, rng_seed, allow_oom, CostModel(cluster),
               timeline_iterations=frozenset(int(i) for i in timeline_iterations),
               view=inputs.view, layout_plan=lplan)
    writer = RunWriter(out_dir, config, "simulator", resume=resume) if out_dir else None
    if writer is not None and resume:
        its = _skip_done(run, writer, its)
    return _loop(run, its, writer, config, progress, on_iteration)


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
        config["parallel"] = _json_normal(layout_run.config_entry(layout_plan))
    return config


def _loop(run: _Run, its: list[int], writer: RunWriter | None, config: dict, progress: bool,
          on_iteration: Callable[[dict], None] | None) -> SimSummary:
    """Run the iterations; on any error the writer keeps what finished (status incomplete)."""
    from moesim.traces.stream import release_pages

    rows: list[dict] = []
    bar = ProgressBar(len(its), enabled=progress)
    try:
        for it in its:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                record, state = simulate_iteration(run, it)  # absurd inputs: checked next
            validation.finite_results(record.summary, it)
            release_pages(run.trace.counts_TLRE)   # a memory-mapped trace: one iteration resident
            rows.append(dict(record.summary, iteration=it))
            if writer is not None:
                writer.add(record, state=state)
            if on_iteration is not None:
                on_iteration(rows[-1])
            bar.update(1)
    except BaseException as exc:
        bar.close()
        if writer is not None:
            writer.finish("incomplete", error=f"{type(exc).__name__}: {exc}")
        raise
    bar.close()
    out = writer.finish() if writer is not None else None
    run_rows = writer.summaries if writer is not None else None
    return SimSummary(rows=rows, config=config, out_dir=out, run_rows=run_rows,
                      stage_table=run.stage_table[1])


def simulate_iteration(run: _Run, it: int) -> tuple[IterationRecord, dict]:
    """One iteration: decide, lower, cost, schedule, record. Returns ``(record, state)``."""
    mb = run.trace.meta.micro_batches_per_iteration
    view = run.view or run.cluster
    decision, counts = decide_iteration(run.policy, run.trace.counts_TLRE, mb, it,
                                        run.previous, run.model, view, run.rng_seed)
    ctx = lower_iteration_ctx(run.policy, decision, run.previous, counts, run.model,
                              view, plan=_plan(run, decision), cache=run.cache,
                              layout_plan=run.layout_plan)
    sched = schedule(ctx.program.ops, run.cost.durations(ctx.program), run.cluster.world_size)
    _keep_stage_table(run, ctx)
    oom = _check_memory(ctx, run, it)
    record = build_record(ctx, sched, it, oom, it in run.timeline_iterations,
                          run.layout_plan)
    run.previous = decision
    return record, decision_state(decision)


def _keep_stage_table(run: _Run, ctx: LoweringContext) -> None:
    """Under a layout, keep the per-stage memory table of the iteration that peaks."""
    stages = getattr(ctx, "stage_memory", None)
    if not stages:
        return
    peak = float(memory_model.peak_R(ctx.program.memory_bytes, ctx.program.num_ranks).max())
    if peak > run.stage_table[0]:
        from moesim.memory_stage import stage_memory_table

        run.stage_table = (peak, stage_memory_table(stages, run.cluster.gpu_memory_bytes))


def build_history(counts_TLRE: np.ndarray, passes_per_iteration: int, iteration: int,
                  previous: Decision | None, oracle: bool) -> Any:
    """The :class:`~moesim.policies.base.History` a policy sees at ``iteration``: the counts
    of every earlier pass, the decision in force before, and (oracles only) this iteration's
    counts ``[M, L, R, E]``, widened to int64 (a directory trace may store uint16 / int32;
    ``past_TLRE`` is a view in the stored type: sum it with ``dtype=np.int64``)."""
    from moesim.policies.base import History

    M = passes_per_iteration
    current = iteration_counts(counts_TLRE, M, iteration) if oracle else None
    return History(iteration=iteration, past_TLRE=counts_TLRE[:iteration * M],
                   passes_per_iteration=M, previous=previous,
                   current_TLRE=current)


def iteration_counts(counts_TLRE: np.ndarray, passes_per_iteration: int,
                     iteration: int) -> np.ndarray:
    """One iteration's counts ``[M, L, R, E]`` as int64, or int32 where the trace stores
    int32 (a copy only for narrower or unsigned types: every sum downstream accumulates in
    int64, and the routing's arithmetic stays within a pass's token count, so int32 needs no
    widening pass over the iteration)."""
    M = passes_per_iteration
    counts = counts_TLRE[iteration * M:(iteration + 1) * M]
    keep = np.dtype(np.int32) if np.asarray(counts[:0]).dtype == np.int32 else np.int64
    return np.asarray(counts, dtype=keep)


def decide_iteration(policy: Any, counts_TLRE: np.ndarray, passes_per_iteration: int,
                     iteration: int, previous: Decision | None, model: ModelSpec,
                     cluster: Cluster, seed: int) -> tuple[Decision, np.ndarray]:
    """``policy.decide`` for ``iteration`` with its :func:`build_history` and the generator
    ``default_rng([seed, iteration])``; returns the decision and the iteration's counts
    ``counts_MLRE``. Both backends call this, so they run the same decisions."""
    M = passes_per_iteration
    history = build_history(counts_TLRE, M, iteration, previous, policy.oracle)
    decision = policy.decide(history, model, cluster, np.random.default_rng([seed, iteration]))
    return decision, iteration_counts(counts_TLRE, M, iteration)


def _plan(run: _Run, decision: Decision) -> Any:
    """The routing plan, rebuilt only when the placement or routing rule changed."""
    prev = run.plan_for
    same = prev is decision or (
        prev is not None and prev.routing == decision.routing
        and prev.info.get("ep_size") == decision.info.get("ep_size")
        and prev.placement.phy2log_LP.shape == decision.placement.phy2log_LP.shape
        and prev.placement.slots_per_rank == decision.placement.slots_per_rank
        and np.array_equal(prev.placement.phy2log_LP, decision.placement.phy2log_LP))
    if not same:
        run.plan = route_plan(decision, run.view or run.cluster)
        run.cache = {}
    run.plan_for = decision
    return run.plan


def _check_memory(ctx: LoweringContext, run: _Run, it: int) -> bool:
    """True when the plan does not fit; raises unless ``allow_oom``."""
    c = run.cluster
    peak_R = memory_model.peak_R(ctx.program.memory_bytes, ctx.program.num_ranks)
    r = int(np.argmax(peak_R))
    if peak_R[r] <= c.gpu_memory_bytes:
        return False
    if not run.allow_oom:
        where = f"rank {r}"
        if run.layout_plan is not None:
            where += f" (pipeline stage {r // run.layout_plan.stage_ranks})"
        raise OutOfMemoryError(
            f"iteration {it}: {where} needs {peak_R[r] / 2**30:.1f} GiB but a GPU of "
            f"{c.name} has {c.gpu_memory_GiB:.1f} GiB; use more GPUs (--nodes), fewer slots "
            "or replicas, a smaller model, or pass allow_oom to record it anyway")
    return True


# --------------------------------------------------------------------------------------------
# inputs, config, resume


def _load(trace: RoutingTrace | str | Path, stop: int | None = None) -> RoutingTrace:
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


def _policy(policy: Any) -> Any:
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




def _iterations(iterations: Any, available: int) -> list[int]:
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
    return _json_normal({
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


def _json_normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists), so a resumed run's config compares
    equal to the stored one."""
    return json.loads(json.dumps(_jsonable(obj)))


def decision_state(decision: Decision) -> dict:
    """JSON-ready state that restores ``decision`` on resume (arrays become lists)."""
    p = decision.placement
    return {"phy2log": p.phy2log_LP.tolist(), "num_ranks": p.num_ranks,
            "slots_per_rank": p.slots_per_rank, "num_experts": p.num_experts,
            "routing": decision.routing, "slot_capacity": decision.slot_capacity,
            "planner_time_s": decision.planner_time_s, "info": _jsonable(decision.info)}


def restore_decision(state: dict) -> Decision:
    """Inverse of :func:`decision_state` (``info`` arrays come back as lists)."""
    placement = Placement(np.array(state["phy2log"], dtype=np.int64), state["num_ranks"],
                          state["slots_per_rank"], state["num_experts"])
    return Decision(placement=placement, routing=state["routing"],
                    slot_capacity=state["slot_capacity"],
                    planner_time_s=state["planner_time_s"], info=dict(state["info"]))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj


def _skip_done(run: _Run, writer: RunWriter, its: list[int]) -> list[int]:
    """Drop iterations already written and restore the decision in force after them."""
    last = writer.resume_after()
    if last is None:
        return its
    state = writer.last_state()
    if state:
        run.previous = restore_decision(state)
    return [i for i in its if i > last]


# --------------------------------------------------------------------------------------------
# progress


class ProgressBar:
    """A small stderr progress bar (no dependency): ``[#####.....] 50/100  12.3 it/s``;
    redraws at most 10 times a second; silent when disabled or for runs of < 2 items."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30) -> None:
        self.total, self.width, self.done = total, width, 0
        self.enabled = enabled and total > 1
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            filled = int(self.width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.t0, 1e-9)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
                             f"{self.done}/{self.total}  {rate:.1f} it/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
