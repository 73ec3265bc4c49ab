"""The policy step both backends share: the :class:`~moesim.policies.base.History` a policy
sees (:func:`build_history`), one iteration's counts (:func:`iteration_counts`), the decision
with its per-iteration generator (:func:`decide_iteration`), and the JSON state that restores a
decision when a run resumes (:func:`decision_state`, :func:`restore_decision`).

Split from :mod:`moesim.simulate`, which re-exports these names.

Shape legend: ``T`` passes of the trace, ``M`` passes of the iteration, ``L`` layers, ``R``
ranks, ``E`` experts, ``P`` physical slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.placement import Decision, Placement
from moesim.run_inputs import jsonable
from moesim.specs import Cluster, ModelSpec


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
    return iterations_counts(counts_TLRE, passes_per_iteration, iteration, 1)


def iterations_counts(counts_TLRE: np.ndarray, passes_per_iteration: int, first: int,
                      count: int) -> np.ndarray:
    """Iterations ``first … first + count − 1``'s counts ``[count·M, L, R, E]``, as
    :func:`iteration_counts` gives each (a view of the trace where its dtype allows)."""
    M = passes_per_iteration
    counts = counts_TLRE[first * M:(first + count) * M]
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


def decision_state(decision: Decision) -> dict:
    """JSON-ready state that restores ``decision`` on resume (arrays become lists)."""
    p = decision.placement
    return {"phy2log": p.phy2log_LP.tolist(), "num_ranks": p.num_ranks,
            "slots_per_rank": p.slots_per_rank, "num_experts": p.num_experts,
            "routing": decision.routing, "slot_capacity": decision.slot_capacity,
            "planner_time_s": decision.planner_time_s, "info": jsonable(decision.info)}


def restore_decision(state: dict) -> Decision:
    """Inverse of :func:`decision_state` (``info`` arrays come back as lists)."""
    placement = Placement(np.array(state["phy2log"], dtype=np.int64), state["num_ranks"],
                          state["slots_per_rank"], state["num_experts"])
    return Decision(placement=placement, routing=state["routing"],
                    slot_capacity=state["slot_capacity"],
                    planner_time_s=state["planner_time_s"], info=dict(state["info"]))
