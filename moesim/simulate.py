"""``simulate``: replay a routing trace through a policy on a modelled cluster.

Per iteration: build the :class:`~moesim.policies.base.History` the policy may see (earlier
passes only; this iteration's counts too for oracle policies), ``policy.decide``, lower the
decision with this iteration's counts (:mod:`moesim.lowering`), cost every op
(:mod:`moesim.costmodel`), schedule (:mod:`moesim.engine`), check memory, and write an
:class:`~moesim.results.IterationRecord` (backend ``simulator``).

The seam the executor shares (public and stable; ``moesim.executor.plan`` and the worker use
it, so both backends fit, decide and record alike), re-exported here from the modules that hold
it: :func:`prepare_inputs` (a layout's set-up, then :func:`fit_inputs` = :func:`fit_trace` +
:func:`fit_model`), :func:`layout_config`, :func:`run_config` (:mod:`moesim.run_inputs`);
:func:`build_history` and :func:`decide_iteration` (the policy loop's inputs: History and the
per-iteration generator), :func:`decision_state` / :func:`restore_decision` (resume)
(:mod:`moesim.decide_step`); :func:`phase_times`, :func:`op_bytes` (:mod:`moesim.records`).

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim import layered, repeat, validation
from moesim import memory as memory_model
from moesim.costmodel import CostModel
from moesim.decide_step import (  # noqa: F401  (re-exported: the executor's seam uses them)
    build_history,
    decide_iteration,
    decision_state,
    iteration_counts,
    restore_decision,
)
from moesim.engine import schedule
from moesim.errors import OutOfMemoryError
from moesim.lowering import (  # noqa: F401  (lower_iteration_ctx re-exported for benchmarks)
    LoweringContext,
    attach_memory,
    lower_iteration_ctx,
    route_plan,
    routed_context,
)
from moesim.placement import Decision
from moesim.progress import ProgressBar
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
from moesim.run_inputs import (  # noqa: F401  (re-exported: the executor's seam uses them)
    RunInputs,
    fit_inputs,
    fit_model,
    fit_trace,
    json_normal,
    jsonable,
    layout_config,
    load_run_trace,
    prepare_inputs,
    resolve_policy,
    run_config,
    select_iterations,
)
from moesim.specs import Cluster, ModelSpec
from moesim.traces.format import RoutingTrace

_policy = resolve_policy   # the old private name, which tests' toy loops still use


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
    template: Any = None  # a repeated structure (moesim.repeat.Template), once captured
    batched: tuple = (set(), set())  # the last lowering's batch-priced ops (cost model)


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
    inputs = prepare_inputs(load_run_trace(trace, stop), model, cluster, resolve_policy(policy),
                            layout, regroup=regroup, stop=stop, rng_seed=rng_seed)
    trace, model, policy, lplan = inputs.trace, inputs.model, inputs.policy, inputs.layout_plan
    its = select_iterations(iterations, trace.num_iterations)
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


def _loop(run: _Run, its: list[int], writer: RunWriter | None, config: dict, progress: bool,
          on_iteration: Callable[[dict], None] | None) -> SimSummary:
    """Run the iterations; on any error the writer keeps what finished (status incomplete).

    Iterations that repeat a captured program structure (:mod:`moesim.repeat`) wait in
    ``pending`` and are simulated a batch at a time; the rest one by one, in order."""
    from moesim.traces.stream import release_pages

    rows: list[dict] = []
    pending: list[tuple[int, Decision, np.ndarray]] = []
    bar = ProgressBar(len(its), enabled=progress)

    def emit(it: int, record: IterationRecord, state: dict) -> None:
        validation.finite_results(record.summary, it)
        release_pages(run.trace.counts_TLRE)   # a memory-mapped trace: one iteration resident
        rows.append(dict(record.summary, iteration=it))
        if writer is not None:
            writer.add(record, state=state)
        if on_iteration is not None:
            on_iteration(rows[-1])
        bar.update(1)

    def flush() -> None:
        if pending:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for (it, _, _), (record, state) in zip(pending, _simulate_pending(run, pending),
                                                       strict=True):
                    emit(it, record, state)
            pending.clear()

    try:
        for it in its:
            decision, counts = _decide(run, it)
            if run.template is not None and it not in run.timeline_iterations \
                    and run.template.fits(decision, run.previous):
                pending.append((it, decision, counts))
                run.previous = decision
                if len(pending) >= run.template.batch:
                    flush()
                continue
            flush()
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                ctx, durations = _lower(run, decision, counts)
                if it not in run.timeline_iterations and _capture(run, ctx, durations):
                    pending.append((it, decision, counts))  # the batch simulates it too
                    run.previous = decision
                    continue
                record, state = _finish(run, it, ctx, durations)
            emit(it, record, state)
        flush()
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


def _decide(run: _Run, it: int) -> tuple[Decision, np.ndarray]:
    """The policy's decision for ``it`` after ``run.previous``, and the iteration's counts."""
    return decide_iteration(run.policy, run.trace.counts_TLRE,
                            run.trace.meta.micro_batches_per_iteration, it, run.previous,
                            run.model, run.view or run.cluster, run.rng_seed)


def _simulate_pending(run: _Run, pending: list) -> Iterator[tuple[IterationRecord, dict]]:
    """The pending iterations of the captured structure, as one batch."""
    _plan(run, pending[0][1])
    return repeat.simulate_batch(run.template, run, pending, routed_context,
                                 lambda ctx: _attach_memory(run, ctx), _check_memory,
                                 build_record, decision_state)


def _attach_memory(run: _Run, ctx: LoweringContext) -> None:
    """A batched iteration's memory, as its full lowering attaches it (under a layout: per
    stage, keeping the peak iteration's stage table)."""
    if run.layout_plan is None:
        attach_memory(ctx)
        return
    layered.stage_contexts(ctx, run.layout_plan)
    layered.attach_layout_memory(ctx, run.layout_plan)
    _keep_stage_table(run, ctx)


def simulate_iteration(run: _Run, it: int, decided: tuple[Decision, np.ndarray] | None = None
                       ) -> tuple[IterationRecord, dict]:
    """One iteration by the full path: decide (unless ``decided`` gives the decision and
    counts), lower, cost, schedule, record. Returns ``(record, state)``."""
    decision, counts = decided if decided is not None else _decide(run, it)
    ctx, durations = _lower(run, decision, counts)
    return _finish(run, it, ctx, durations)


def _lower(run: _Run, decision: Decision, counts: np.ndarray
           ) -> tuple[LoweringContext, list[np.ndarray]]:
    """The iteration lowered (after ``run.previous``) and its ops' durations."""
    ctx = lower_iteration_ctx(run.policy, decision, run.previous, counts, run.model,
                              run.view or run.cluster, plan=_plan(run, decision),
                              cache=run.cache, layout_plan=run.layout_plan)
    durations, run.batched = run.cost.durations_batched(ctx.program)
    return ctx, durations


def _capture(run: _Run, ctx: LoweringContext, durations: list[np.ndarray]) -> bool:
    """Keep the lowered iteration as the run's template where its structure repeats
    (:func:`moesim.repeat.capture`); True when the iteration itself then goes to a batch."""
    t = run.template
    if t is None or not t.fits(ctx.decision, ctx.previous):
        run.template = t = repeat.capture(run.policy, ctx, durations, run.batched,
                                          run.layout_plan)
    return t is not None and t.fits(ctx.decision, ctx.previous)


def _finish(run: _Run, it: int, ctx: LoweringContext, durations: list[np.ndarray]
            ) -> tuple[IterationRecord, dict]:
    """Schedule and record a lowered iteration; ``run.previous`` becomes its decision."""
    sched = schedule(ctx.program.ops, durations, run.cluster.world_size)
    _keep_stage_table(run, ctx)
    oom = _check_memory(ctx, run, it)
    record = build_record(ctx, sched, it, oom, it in run.timeline_iterations,
                          run.layout_plan)
    run.previous = ctx.decision
    return record, decision_state(ctx.decision)


def _keep_stage_table(run: _Run, ctx: LoweringContext) -> None:
    """Under a layout, keep the per-stage memory table of the iteration that peaks."""
    stages = getattr(ctx, "stage_memory", None)
    if not stages:
        return
    peak = float(memory_model.peak_R(ctx.program.memory_bytes, ctx.program.num_ranks).max())
    if peak > run.stage_table[0]:
        from moesim.memory_stage import stage_memory_table

        run.stage_table = (peak, stage_memory_table(stages, run.cluster.gpu_memory_bytes))


def _plan(run: _Run, decision: Decision) -> Any:
    """The routing plan, rebuilt only when the placement or routing rule changed."""
    if not repeat.same_routing(run.plan_for, decision):
        run.plan = route_plan(decision, run.view or run.cluster)
        run.cache = {}
        run.template = None
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
# resume


def _skip_done(run: _Run, writer: RunWriter, its: list[int]) -> list[int]:
    """Drop iterations already written and restore the decision in force after them."""
    last = writer.resume_after()
    if last is None:
        return its
    state = writer.last_state()
    if state:
        run.previous = restore_decision(state)
    return [i for i in its if i > last]
