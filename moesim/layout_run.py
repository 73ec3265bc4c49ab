"""A run under a parallel layout: what the simulator (and the executor) sets up around it.

:func:`prepare` checks the layout against the cluster, model, trace and policy before anything
is written, and returns the :class:`~moesim.stages.LayoutPlan` and the *view* cluster — one
pipeline stage's ranks, which is what a policy places experts over and what the trace's source
ranks must match (a trace recorded at another scale must be regrouped first, explicitly:
``moesim trace regroup --ranks N``). :func:`world_tokens` lifts a stage view's per-layer arrays
to world ranks for the RunResult; :func:`config_entry` is what ``config.json`` records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.layout import ParallelLayout
from moesim.specs import Cluster, ModelSpec
from moesim.stages import LayoutPlan, plan_layout, view_cluster


def prepare(layout: ParallelLayout | None, model: ModelSpec, cluster: Cluster, policy: Any,
            micro_batches: int) -> tuple[LayoutPlan | None, Cluster, Any]:
    """``(plan, view cluster, policy)``; ``plan`` None for the default layout (the cluster is
    then its own view). The policy comes back with its EP size set from the layout where it
    has an ``ep_size`` knob; a policy that cannot run under the layout is refused."""
    policy = _with_recompute(policy, layout)
    if layout is None or layout.is_default:
        return None, cluster, policy
    if (layout.recompute == "selective" and "mla_up_proj" in layout.recompute_modules
            and not model.is_mla):
        raise MoesimError(f"parallel layout: recompute_modules=mla_up_proj needs an MLA model "
                          f"(kv_lora_rank > 0); {model.name} has none, drop it")
    n = cluster.world_size // layout.pp if cluster.world_size % layout.pp == 0 else 0
    if layout.etp > 1:
        policy = _with_etp(policy, layout, n)
    policy = _with_ep(policy, layout, n, model.num_experts)
    ep = getattr(policy.config, "ep_size", None)
    spans = ep is None or ep == n
    if layout.etp > 1 and n and ep and n % (ep * layout.etp):
        raise MoesimError(f"parallel layout: ep·etp = {ep}·{layout.etp} does not divide the "
                          f"{n} ranks per stage; choose ep and etp whose product divides it")
    plan = plan_layout(layout, cluster, model, micro_batches, policy_spans_stage=spans)
    return plan, view_cluster(cluster, plan.stage_ranks), policy


def _with_recompute(policy: Any, layout: ParallelLayout | None) -> Any:
    """A policy whose planner weighs recomputation (LAER's ``recompute`` knob: compute weight
    4 instead of 3) follows the layout's: set from ``recompute=full``, and refused when it
    claims a recomputation the run does not do."""
    if not (dataclasses.is_dataclass(policy.config) and hasattr(policy.config, "recompute")):
        return policy
    full = layout is not None and layout.recompute == "full"
    if policy.config.recompute and not full:
        raise MoesimError(f"{policy.name}: recompute=true weighs the planner for full "
                          "activation recomputation, which this run does not do; pass "
                          "--parallel recompute=full instead (it sets the knob and "
                          "recomputes)")
    if full and not policy.config.recompute:
        return type(policy)(dataclasses.replace(policy.config, recompute=True))
    return policy


def _with_etp(policy: Any, layout: ParallelLayout, n: int) -> Any:
    """Expert tensor parallelism splits each expert over a fixed ETP group, which static EP's
    fixed contiguous placement follows (:mod:`moesim.expert_tp`); policies that replicate,
    move or shard experts per rank are refused. Without an ``ep`` the EP size is
    ``n / etp`` (Megatron-Core's EP = ranks per stage / ETP when EDP = 1)."""
    if policy.name != "static_ep":
        raise MoesimError(f"{policy.name}: etp={layout.etp} splits every expert over a fixed "
                          "ETP group, but this policy replicates or moves experts per rank; "
                          "use --policy static_ep, or etp=1")
    if policy.config.optimizer_on_host:
        raise MoesimError("static_ep: optimizer_on_host is not modelled with etp > 1; drop "
                          "--knob optimizer_on_host or use etp=1")
    if n and n % layout.etp:
        raise MoesimError(f"parallel layout: etp={layout.etp} does not divide the {n} ranks per "
                          "stage; choose an etp that divides world / pp")
    if layout.ep is None and policy.config.ep_size is None and n:
        return type(policy)(dataclasses.replace(policy.config, ep_size=n // layout.etp))
    return policy


def _with_ep(policy: Any, layout: ParallelLayout, n: int, num_experts: int) -> Any:
    """Give ``policy`` the layout's ``ep`` (its ``ep_size`` knob), or refuse the layout."""
    fields = {f.name for f in dataclasses.fields(policy.config)} \
        if dataclasses.is_dataclass(policy.config) else set()
    if layout.ep is None or n == 0:
        return policy
    if "ep_size" in fields:
        knob = policy.config.ep_size
        if knob is not None and knob != layout.ep:
            raise MoesimError(f"{policy.name}: --knob ep_size={knob} contradicts the layout's "
                              f"ep={layout.ep}; give one of them")
        return type(policy)(dataclasses.replace(policy.config, ep_size=layout.ep))
    if layout.ep * layout.etp != n:
        raise MoesimError(f"{policy.name} places experts over every rank of a pipeline stage "
                          f"(ep = {n // layout.etp} here); it cannot run with ep={layout.ep}. "
                          "Drop ep from --parallel, or use static_ep")
    return policy


def config_entry(plan: LayoutPlan) -> dict:
    """The layout and what it resolved to, for RunResult's config."""
    lay, W = plan.layout, plan.world
    return {**lay.fields(), "world": W, "dp": lay.dp(W), "ranks_per_stage": plan.stage_ranks,
            "stages": [{"ranks": [s.first_rank, s.first_rank + s.num_ranks],
                        "layers": [list(c) for c in s.chunks]} for s in plan.stages]}


def world_tokens(ctx: Any, plan: LayoutPlan | None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens_MLR, dropped_MLR)`` over world ranks: tokens each rank's experts compute and
    tokens each source dropped, per micro-batch and MoE layer (zero on the stages that do not
    hold the layer). With ETP a rank's tokens are those the dispatch delivered to it (its
    ETP group's GEMMs compute the group's sum), put back from expert order."""
    S = ctx.placement.slots_per_rank
    rows_MLR = ctx.rows_MLP.reshape(*ctx.rows_MLP.shape[:2], -1, S).sum(axis=3)
    if plan is None or (plan.layout.pp == 1 and plan.layout.etp == 1):
        return rows_MLR, ctx.dropped_MLR
    M, L, n = rows_MLR.shape
    if plan.layout.etp > 1:
        ctx_sigma = ctx.stage_contexts[0].expert_ranks
        rows_MLR = _stage_order(rows_MLR, ctx_sigma)
        dropped_MLR = _stage_order(ctx.dropped_MLR, ctx_sigma)
        if plan.layout.pp == 1:
            return rows_MLR, dropped_MLR
    else:
        dropped_MLR = ctx.dropped_MLR
    tokens = np.zeros((M, L, plan.world), dtype=rows_MLR.dtype)
    dropped = np.zeros((M, L, plan.world), dtype=ctx.dropped_MLR.dtype)
    for st in plan.stages:
        moe = list(st.moe_layers)
        tokens[:, moe, st.first_rank:st.first_rank + n] = rows_MLR[:, moe]
        dropped[:, moe, st.first_rank:st.first_rank + n] = dropped_MLR[:, moe]
    return tokens, dropped


def _stage_order(arr_MLR: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Expert-order positions (last axis) put at their stage ranks ``sigma``."""
    out = np.empty_like(arr_MLR)
    out[..., sigma] = arr_MLR
    return out


def check_trace_ranks(trace_ranks: int, plan: LayoutPlan | None) -> None:
    """A layout's stage has ``world / pp`` token sources; the trace must have as many."""
    if plan is not None and trace_ranks != plan.stage_ranks:
        raise MoesimError(f"the trace has {trace_ranks} source ranks but each pipeline stage "
                          f"of this layout has {plan.stage_ranks} (world {plan.world} / pp "
                          f"{plan.layout.pp}); pass --regroup, or regroup it first: moesim trace "
                          f"regroup --ranks {plan.stage_ranks}")
