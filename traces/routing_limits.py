"""Routing constraints real models use: group- and node-limited routing, variable top-k.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` the most experts one token picks, ``T``
passes, ``L`` layers, ``R`` ranks. Experts form contiguous groups: expert ``e`` is in group
``e // (E / groups)``.

- **Group-limited routing** (DeepSeek-V2 / V3): a token scores each group by the sum of its
  two highest expert affinities in the group (V3's rule; one when a group has one expert),
  keeps the ``topk_groups`` best groups, and picks its top-k experts among theirs.
- **Node-limited routing** (DeepSeek-V3: each token reaches at most ``M = 4`` nodes): the same
  rule with the groups being the nodes' experts under contiguous expert parallelism
  (``route_nodes`` nodes, ``node_limit`` = M), which is how DeepSeek-V3 implements it.
- **Variable top-k** ("Harder Tasks Need More Experts", Huang et al. 2024): a token takes
  experts in descending score order until their cumulative router probability (softmax of the
  scores over its allowed experts, at ``temperature``) reaches ``top_p``; at least ``min_k``,
  at most ``top_k``.

On recorded traces the group / node limit is a *reported* constraint: :func:`count_violations`
counts the tokens that reach more groups than allowed (it needs per-token choices, else a
one-line error), and ``moesim trace info --expert-groups G --topk-groups M`` prints the count
instead of failing, so a user can see how far a trace is from a model's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace


@dataclass(frozen=True, kw_only=True)
class RoutingOptions:
    """Per-token routing rule of synthesis (module docstring); the defaults are plain top-k."""

    expert_groups: int = 0
    topk_groups: int = 0
    node_limit: int = 0
    route_nodes: int = 0
    top_p: float = 0.0
    min_k: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if (self.expert_groups > 0) != (self.topk_groups > 0):
            raise ValueError("expert_groups and topk_groups go together (group-limited "
                             "routing); give both or neither")
        if (self.node_limit > 0) != (self.route_nodes > 0):
            raise ValueError("node_limit and route_nodes go together (node-limited routing); "
                             "give both or neither")
        if self.expert_groups and self.node_limit:
            raise ValueError("choose group-limited (expert_groups) or node-limited "
                             "(node_limit) routing, not both")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must lie in [0, 1] (got {self.top_p}); 0 = fixed top-k")
        if self.min_k < 1 or self.temperature <= 0:
            raise ValueError("min_k must be >= 1 and temperature > 0")

    @property
    def groups(self) -> tuple[int, int]:
        """``(number of groups, groups a token may use)``; ``(0, 0)`` when unlimited."""
        if self.node_limit:
            return self.route_nodes, self.node_limit
        return self.expert_groups, self.topk_groups

    @property
    def is_plain(self) -> bool:
        return self.groups == (0, 0) and self.top_p == 0

    def check(self, num_experts: int, top_k: int) -> None:
        """ValueError naming the fix when the rule cannot give ``top_k`` experts."""
        G, M = self.groups
        if G:
            if num_experts % G:
                raise ValueError(f"{G} groups do not divide {num_experts} experts; choose a "
                                 "divisor")
            if M > G or M * (num_experts // G) < top_k:
                raise ValueError(f"{M} of {G} groups hold fewer than top_k {top_k} experts "
                                 "(or more groups than exist); allow more groups")
        if self.min_k > top_k:
            raise ValueError(f"min_k {self.min_k} exceeds top_k {top_k}")


def _group_mask_NE(scores_NE: np.ndarray, groups: int, keep: int) -> np.ndarray:
    """True for the experts of each token's ``keep`` best groups (sum of top-2 affinities)."""
    N, E = scores_NE.shape
    aff = np.exp(scores_NE - scores_NE.max(axis=1, keepdims=True)).reshape(N, groups, -1)
    top = min(2, aff.shape[2])
    score_NG = -np.sort(-aff, axis=2)[:, :, :top].sum(axis=2)
    best = np.argpartition(-score_NG, keep - 1, axis=1)[:, :keep]
    mask_NG = np.zeros((N, groups), dtype=bool)
    np.put_along_axis(mask_NG, best, True, axis=1)
    return np.repeat(mask_NG, E // groups, axis=1)


def choose_experts(scores_NE: np.ndarray, top_k: int, options: RoutingOptions) -> np.ndarray:
    """Each token's experts ``[N, top_k]`` int32 by descending score under ``options``
    (``-1`` pads tokens that took fewer, with variable top-k). Experts scored ``-inf`` are
    never taken."""
    s = np.array(scores_NE, dtype=np.float64)
    G, M = options.groups
    if G:
        s = np.where(_group_mask_NE(s, G, M), s, -np.inf)
    top_NK = np.argpartition(-s, top_k - 1, axis=1)[:, :top_k]
    order = np.argsort(-np.take_along_axis(s, top_NK, axis=1), axis=1, kind="stable")
    top_NK = np.take_along_axis(top_NK, order, axis=1)
    if options.top_p > 0:
        z = s / options.temperature
        z = z - z.max(axis=1, keepdims=True)
        p_NE = np.exp(z)
        p_NE /= p_NE.sum(axis=1, keepdims=True)
        cum_NK = np.cumsum(np.take_along_axis(p_NE, top_NK, axis=1), axis=1)
        k_N = (cum_NK < options.top_p - 1e-12).sum(axis=1) + 1
        k_N = np.clip(k_N, options.min_k, top_k)
        top_NK = np.where(np.arange(top_k)[None, :] < k_N[:, None], top_NK, -1)
    return top_NK.astype(np.int32)


def groups_reached(topk_NK: np.ndarray, num_experts: int, groups: int) -> np.ndarray:
    """How many distinct groups each token's experts fall in, ``[N]`` (``-1`` ids ignored)."""
    size = num_experts // groups
    g = np.where(topk_NK >= 0, topk_NK // size, -1)
    g = np.sort(g, axis=-1)
    new = (g[..., 1:] != g[..., :-1]) & (g[..., 1:] >= 0)
    return (g[..., 0] >= 0).astype(np.int64) + new.sum(axis=-1)


def count_violations(trace: RoutingTrace, groups: int, limit: int) -> tuple[int, int]:
    """``(tokens reaching more than limit of groups groups, tokens)`` of a trace with per-token
    choices; TraceError (one line) for counts-only traces or groups that do not divide E."""
    E = trace.meta.num_experts
    if groups < 1 or E % groups or not 1 <= limit <= groups:
        raise TraceError(f"--expert-groups {groups} / --topk-groups {limit}: the groups must "
                         f"divide the trace's {E} experts and the limit lie in 1..groups")
    if trace.topk_TLRNK is None:
        raise TraceError("this trace holds counts only; checking a group / node limit needs "
                         "per-token choices (record with per-token ids, or synthesize with "
                         "`moesim trace synth --workload NAME --store-topk`)")
    topk = np.asarray(trace.topk_TLRNK)
    reached = groups_reached(topk.reshape(-1, topk.shape[-1]), E, groups)
    real = (topk.reshape(-1, topk.shape[-1]) >= 0).any(axis=1)
    return int((reached[real] > limit).sum()), int(real.sum())
