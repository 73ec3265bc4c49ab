"""Decisions and programs for a trace slice: the policy loop both backends share.

:func:`iteration_programs` replays a trace through a policy exactly as
:func:`moesim.simulate.simulate` does — it calls the simulator's public
:func:`moesim.simulate.decide_iteration` (``History`` of earlier passes only, plus the current
iteration's for oracles; generator ``default_rng([seed, iteration])``), carrying the previous
decision from ``start`` on (``None`` at ``start``) — and lowers every iteration in
``[start, stop)`` with :func:`moesim.lowering.lower_iteration_ctx`, so both backends run the
same programs. Under a parallel layout it does what the simulator does: the policy decides on
the *view* cluster (one pipeline stage's ranks) and the lowering gets the
:class:`~moesim.stages.LayoutPlan` (both from :func:`moesim.simulate.prepare_inputs`).
:func:`fit_run_inputs` fits the trace and model as the simulator does
(:func:`moesim.simulate.fit_inputs`).

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts, ``M`` passes per iteration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import Program
from moesim.placement import Decision
from moesim.policies.base import Policy
from moesim.specs import Cluster, ModelSpec
from moesim.traces.format import RoutingTrace


@dataclass
class PlannedIteration:
    """One iteration to execute: its index, the policy's decision, the lowered program, its
    routing counts ``counts_MLRE``, (rank 0 only, never broadcast) the whole
    :class:`~moesim.lowering.LoweringContext` the iteration's record is built from, and the
    run's :class:`~moesim.stages.LayoutPlan` (None: the default layout)."""

    iteration: int
    decision: Decision
    program: Program
    counts_MLRE: np.ndarray
    context: Any = None
    layout_plan: Any = None


def parse_iterations(text: str | None, available: int) -> tuple[int, int]:
    """``"a:b"`` (either side optional) → ``(start, stop)`` clipped to the trace."""
    if not text:
        return 0, available
    try:
        a, _, b = text.partition(":")
        start = int(a) if a else 0
        stop = int(b) if b else (available if _ else start + 1)
    except ValueError:
        raise MoesimError(f"--iterations {text!r}: use start:stop, e.g. 0:4") from None
    if not 0 <= start < stop <= available:
        raise MoesimError(f"--iterations {text!r}: the trace has {available} iterations; "
                          f"choose 0 <= start < stop <= {available}")
    return start, stop


def fit_run_inputs(trace: RoutingTrace, model: ModelSpec, cluster: Cluster, seed: int = 0
                   ) -> tuple[RoutingTrace, ModelSpec]:
    """The trace and model an executor run uses, fitted exactly as the simulator fits them."""
    from moesim.simulate import fit_inputs

    return fit_inputs(trace, model, cluster, seed)


def iteration_programs(counts_TLRE: np.ndarray, passes_per_iteration: int, policy: Policy,
                       model: ModelSpec, cluster: Cluster, start: int, stop: int,
                       seed: int = 0, *, layout_plan: Any = None,
                       view: Cluster | None = None) -> Iterator[PlannedIteration]:
    """Decide and lower iterations ``start..stop-1`` (see the module docstring); ``view``:
    the cluster the policy decides on and the lowering routes over (default ``cluster``)."""
    from moesim.lowering import lower_iteration_ctx
    from moesim.simulate import decide_iteration

    view = view or cluster
    previous: Decision | None = None
    for it in range(start, stop):
        decision, current = decide_iteration(policy, counts_TLRE, passes_per_iteration, it,
                                             previous, model, view, seed)
        ctx = lower_iteration_ctx(policy, decision, previous, current, model, view,
                                  layout_plan=layout_plan)
        yield PlannedIteration(it, decision, ctx.program, np.asarray(current), ctx,
                               layout_plan)
        previous = decision
