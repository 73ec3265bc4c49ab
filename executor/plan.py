"""Decisions and programs for a trace slice: the policy loop both backends share.

:func:`iteration_programs` replays a trace through a policy exactly as
:func:`moesim.simulate.simulate` does — ``History`` of earlier passes only (plus the current
iteration's for oracles), a generator ``default_rng([seed, iteration])`` per iteration, the
previous decision carried from ``start`` on (``None`` at ``start``) — and lowers every iteration
in ``[start, stop)`` with :func:`moesim.lowering.lower_iteration`, so both backends run the
same programs.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts, ``M`` passes per iteration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError
from moesim.ops import Program
from moesim.placement import Decision
from moesim.policies.base import History, Policy
from moesim.specs import Cluster, ModelSpec


@dataclass
class PlannedIteration:
    """One iteration to execute: its index, the policy's decision, the lowered program and
    its routing counts ``counts_MLRE``."""

    iteration: int
    decision: Decision
    program: Program
    counts_MLRE: np.ndarray


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


def iteration_programs(counts_TLRE: np.ndarray, passes_per_iteration: int, policy: Policy,
                       model: ModelSpec, cluster: Cluster, start: int, stop: int,
                       seed: int = 0) -> Iterator[PlannedIteration]:
    """Decide and lower iterations ``start..stop-1`` (see the module docstring)."""
    from moesim.lowering import lower_iteration

    previous: Decision | None = None
    M = passes_per_iteration
    for it in range(start, stop):
        current = counts_TLRE[it * M:(it + 1) * M]
        history = History(iteration=it, past_TLRE=counts_TLRE[:it * M], passes_per_iteration=M,
                          previous=previous,
                          current_TLRE=current if policy.oracle else None)
        decision = policy.decide(history, model, cluster, np.random.default_rng([seed, it]))
        program = lower_iteration(policy, decision, previous, current, model, cluster)
        yield PlannedIteration(it, decision, program, np.asarray(current))
        previous = decision
