"""Load and traffic metrics of one iteration, shared by both backends' RunResults.

Shape legend: ``M`` passes (micro-batches) of the iteration, ``L`` MoE layers, ``R`` ranks,
``G`` EP groups, ``F`` phases (:data:`moesim.ops.PHASES`), ``E`` experts.

``tokens_MLR`` is the tokens each rank's expert slots compute in each (micro-batch, layer),
after the routing rule and capacity (what lands in a rank's dispatch buffer).

Summary columns (:func:`summary_columns`; one value per iteration):

- ``overload_mean`` / ``overload_max`` — the overload factor of Megatron-Core PR 4110: in each
  (micro-batch, layer, EP group) entry, the tokens on the group's most loaded rank over the
  balanced count per rank (the group's tokens / its size); mean and max over all entries
  (entries whose group received no tokens are left out; 1 when none remain).
- ``overload_cum_max`` — the cumulative forward/backward overload (PR 4110's
  ``max_cum_overload_factor``, what sizes the activations kept for backward): walk the
  iteration's expert passes in program order, adding a (micro-batch, layer)'s tokens at its
  forward and removing them at its backward; for each group, the peak over time of its most
  loaded rank's retained tokens over the peak of the balanced retained count. Max over groups.
- ``imbalance`` — ``(max − mean) / mean`` over a group's ranks of the tokens they computed over
  the whole iteration (micro-batches summed), averaged over layers (groups: max) — the
  definition TensorRT-LLM's EP load balancer and vLLM (PR 39178) report. Summing the
  micro-batches first makes it at most ``overload_mean − 1``.
- ``node_imbalance`` / ``intra_node_imbalance`` — ``(max − mean) / mean`` of the tokens per
  node, and the worst node's ``(max − mean) / mean`` over its own GPUs, per (micro-batch,
  layer), averaged. Loads balanced across nodes but not within one (DeepEP issue 343: a 2×
  slower dispatch) show as a low ``node_imbalance`` with a high ``intra_node_imbalance``.
- ``hottest_link_bytes`` / ``hottest_link_src`` / ``hottest_link_dst`` — the GPU pair that
  carried the most bytes over the iteration (all phases), from :func:`traffic_FRR`;
  ``intra_node_bytes`` / ``inter_node_bytes`` — all GPU-to-GPU bytes split by link kind.
- ``expert_balance_p50`` … ``_p95`` — percentiles across layers of each layer's max / mean
  tokens per expert (Megatron-LM issue 2398); ``expert_tokens_min`` / ``_max`` — the fewest and
  most tokens any expert of any layer received; ``expert_tokens_std`` — the mean over layers
  of the standard deviation of tokens per expert (:func:`expert_load_stats`).

Per-GPU-pair traffic (:func:`traffic_FRR`): bytes GPU ``i`` sends GPU ``j`` in each phase.
All-to-alls and send/recv batches give their matrices and transfers directly; group collectives
are attributed as NCCL's ring algorithms move them, each member sending to the next one of its
group (group order): all-reduce ``2(n−1)/n`` of the buffer, all-gather and reduce-scatter
``(n−1)/n``, broadcast and reduce a pipelined chain from / to the root (each link carries the
whole buffer). Per-rank totals so equal nccl-tests' bus bytes, the cost model's convention.
Host copies are not GPU-to-GPU traffic and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moesim.ops import (
    PHASES,
    AllToAll,
    GroupCollective,
    Op,
    SendRecv,
)
from moesim.traffic import Traffic
from moesim.traffic import _collective_edges as collective_edges

PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
BALANCE_PERCENTILES = (50, 75, 90, 95)
LOAD_COLUMNS = ("overload_mean", "overload_max", "overload_cum_max", "imbalance",
                "node_imbalance", "intra_node_imbalance")
TRAFFIC_COLUMNS = ("hottest_link_bytes", "hottest_link_src", "hottest_link_dst",
                   "intra_node_bytes", "inter_node_bytes")
EXPERT_COLUMNS = tuple(f"expert_balance_p{q}" for q in BALANCE_PERCENTILES) + (
    "expert_tokens_min", "expert_tokens_max", "expert_tokens_std")
COLUMNS = LOAD_COLUMNS + TRAFFIC_COLUMNS + EXPERT_COLUMNS


def all_ranks_group(world: int) -> list[np.ndarray]:
    """The default EP grouping: every rank in one group (TP = 1, EP = world)."""
    return [np.arange(world)]


def _groups(groups: Sequence[np.ndarray] | None, world: int) -> list[np.ndarray]:
    out = all_ranks_group(world) if groups is None else [np.asarray(g, dtype=np.int64)
                                                         for g in groups]
    assert all(len(g) for g in out), "an EP group has no ranks"
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanstat(fn, x: np.ndarray, empty: float) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else empty


def overload_factor_MLG(tokens_MLR: np.ndarray, groups: Sequence[np.ndarray] | None = None
                        ) -> np.ndarray:
    """Overload factor per (micro-batch, layer, EP group) ``[M, L, G]`` (NaN: group empty)."""
    t = np.asarray(tokens_MLR, dtype=np.float64)
    out = [_ratio(t[..., g].max(axis=-1), t[..., g].mean(axis=-1))
           for g in _groups(groups, t.shape[-1])]
    return np.stack(out, axis=-1)


def pass_order(ops: Sequence[Op], num_micro_batches: int, num_layers: int
               ) -> list[tuple[str, int, int]]:
    """``(direction, micro_batch, layer)`` of the iteration's expert passes in program order
    (first op of each); forward-then-backward per micro-batch when the ops carry none."""
    seen: dict[tuple[str, int, int], None] = {}
    for op in ops:
        if op.phase == "expert" and op.layer >= 0 and op.micro_batch >= 0 \
                and op.direction in ("fwd", "bwd"):
            seen.setdefault((op.direction, op.micro_batch, op.layer), None)
    if seen:
        return list(seen)
    return [(d, m, l) for m in range(num_micro_batches)
            for d, layers in (("fwd", range(num_layers)), ("bwd", range(num_layers - 1, -1, -1)))
            for l in layers]


def cumulative_overload(tokens_MLR: np.ndarray, order: Sequence[tuple[str, int, int]],
                        groups: Sequence[np.ndarray] | None = None) -> float:
    """Max over groups of peak retained tokens on the group's worst rank over the peak of the
    balanced retained count (module docstring); 1 when nothing is retained."""
    t = np.asarray(tokens_MLR, dtype=np.float64)
    held_R = np.zeros(t.shape[-1])
    steps = []
    for direction, m, l in order:
        held_R = held_R + t[m, l] if direction == "fwd" else held_R - t[m, l]
        steps.append(held_R)
    if not steps:
        return 1.0
    held_TR = np.stack(steps)
    best = np.nan
    for g in _groups(groups, t.shape[-1]):
        balanced = held_TR[:, g].mean(axis=1).max()
        if balanced > 0:
            best = np.fmax(best, held_TR[:, g].max() / balanced)
    return 1.0 if np.isnan(best) else float(best)


def imbalance(tokens_MLR: np.ndarray, groups: Sequence[np.ndarray] | None = None) -> float:
    """TensorRT-LLM / vLLM imbalance ``(max − mean) / mean`` of the iteration's tokens per rank,
    mean over layers, max over groups (0 when no rank computes anything)."""
    t_LR = np.asarray(tokens_MLR, dtype=np.float64).sum(axis=0)
    vals = [_nanstat(np.mean, _ratio(t_LR[:, g].max(axis=1), t_LR[:, g].mean(axis=1)) - 1, np.nan)
            for g in _groups(groups, t_LR.shape[-1])]
    return _nanstat(np.max, np.array(vals), 0.0)


def node_imbalance(tokens_MLR: np.ndarray, gpus_per_node: int) -> tuple[float, float]:
    """``(node_imbalance, intra_node_imbalance)`` (module docstring); ranks are laid out node
    by node, ``gpus_per_node`` consecutive ranks per node."""
    t = np.asarray(tokens_MLR, dtype=np.float64)
    M, L, R = t.shape
    n = max(1, min(int(gpus_per_node), R))
    if R % n:
        n = R  # a ragged last node: treat the world as one node
    by_node = t.reshape(M, L, R // n, n)
    node_ML = _ratio(by_node.sum(-1).max(-1), by_node.sum(-1).mean(-1)) - 1
    intra_MLN = _ratio(by_node.max(-1), by_node.mean(-1)) - 1
    with np.errstate(invalid="ignore"):
        intra_ML = np.where(np.isfinite(intra_MLN).any(-1),
                            np.nanmax(np.where(np.isfinite(intra_MLN), intra_MLN, -np.inf), -1),
                            np.nan)
    return _nanstat(np.mean, node_ML, 0.0), _nanstat(np.mean, intra_ML, 0.0)


# --------------------------------------------------------------------------------------------
# per-GPU-pair traffic


def add_op_traffic(out_RR: np.ndarray, op: Op) -> None:
    """Add the bytes ``op`` sends between GPUs to ``out_RR[src, dst]`` (self-traffic left out)."""
    if isinstance(op, AllToAll):
        B = np.asarray(op.bytes_RR, dtype=np.float64)
        if op.ranks is None:  # the whole world: a plain add (fancy indexing is 10x slower)
            out_RR += B
            out_RR.flat[::out_RR.shape[0] + 1] -= np.diagonal(B)
            return
        ranks = np.asarray(op.ranks)
        K = len(ranks)
        if K and ranks[-1] - ranks[0] == K - 1 and np.all(np.diff(ranks) == 1):
            sub = out_RR[ranks[0]:ranks[0] + K, ranks[0]:ranks[0] + K]  # a view (one stage)
            sub += B
            sub[np.diag_indices(K)] -= np.diagonal(B)
            return
        out_RR[np.ix_(ranks, ranks)] += B
        out_RR[ranks, ranks] -= np.diagonal(B)
    elif isinstance(op, SendRecv):
        src, dst = np.asarray(op.src_N, dtype=np.int64), np.asarray(op.dst_N, dtype=np.int64)
        keep = src != dst
        np.add.at(out_RR, (src[keep], dst[keep]), np.asarray(op.bytes_N, float)[keep])
    elif isinstance(op, GroupCollective):
        src, dst, val = collective_edges(op)
        np.add.at(out_RR, (src, dst), val)


def traffic_FRR(ops: Sequence[Op], world: int) -> np.ndarray:
    """Bytes each GPU sends each GPU per phase over the iteration, float64 ``[F, R, R]``
    (dense; :class:`moesim.traffic.Traffic` keeps it sparse)."""
    return Traffic.from_ops(ops, world).dense()


def hottest_links(traffic_RR: np.ndarray, most: int = 5) -> list[tuple[int, int, float]]:
    """The ``most`` GPU pairs that carried the most bytes: ``(src, dst, bytes)``, hottest first
    (pairs that carried nothing are left out)."""
    flat = np.asarray(traffic_RR, dtype=np.float64).ravel()
    if most < flat.size:  # a partial sort: candidates first, then order them (ties by index)
        cand = np.argpartition(-flat, most - 1)[:most]
        flat_top = flat[cand]
        cand = np.flatnonzero(flat >= flat_top.min())
    else:
        cand = np.arange(flat.size)
    top = cand[np.lexsort((cand, -flat[cand]))][:most]
    R = traffic_RR.shape[0]
    return [(int(i // R), int(i % R), float(flat[i])) for i in top if flat[i] > 0]


def link_split(traffic_RR: np.ndarray, gpus_per_node: int) -> tuple[float, float]:
    """``(intra_node_bytes, inter_node_bytes)`` of a traffic matrix (node-by-node ranks)."""
    R = traffic_RR.shape[0]
    node = np.arange(R) // max(1, int(gpus_per_node))
    same = node[:, None] == node[None, :]
    return float(traffic_RR[same].sum()), float(traffic_RR[~same].sum())


# --------------------------------------------------------------------------------------------
# expert load across layers


def expert_load_stats(load_LE: np.ndarray) -> dict[str, float]:
    """Percentiles across layers of max / mean tokens per expert, and the min / max / mean std
    of tokens per expert (module docstring); empty layers are left out of the balance."""
    load = np.asarray(load_LE, dtype=np.float64)
    balance_L = _ratio(load.max(axis=1), load.mean(axis=1))
    finite = balance_L[np.isfinite(balance_L)]
    out = {f"expert_balance_p{q}": float(np.percentile(finite, q)) if finite.size else 1.0
           for q in BALANCE_PERCENTILES}
    out.update(expert_tokens_min=float(load.min()) if load.size else 0.0,
               expert_tokens_max=float(load.max()) if load.size else 0.0,
               expert_tokens_std=float(load.std(axis=1).mean()) if load.size else 0.0)
    return out


def summary_columns(tokens_MLR: np.ndarray, load_LE: np.ndarray, ops: Sequence[Op],
                    traffic_RR: np.ndarray | Traffic, gpus_per_node: int,
                    groups: Sequence[np.ndarray] | None = None,
                    order: Sequence[tuple[str, int, int]] | None = None) -> dict[str, float]:
    """Every column of :data:`COLUMNS` for one iteration (module docstring).

    ``traffic_RR`` is the iteration's GPU-pair bytes summed over phases, or the iteration's
    :class:`~moesim.traffic.Traffic` (read sparse); ``groups`` the EP groups (default: all
    ranks one group); ``order``: :func:`pass_order` of ``ops`` where the caller has it."""
    t = np.asarray(tokens_MLR, dtype=np.float64)
    M, L, R = t.shape
    of = overload_factor_MLG(t, groups)
    node, intra = node_imbalance(t, gpus_per_node)
    if order is None:
        order = pass_order(ops, M, L)
    out = {"overload_mean": _nanstat(np.mean, of, 1.0), "overload_max": _nanstat(np.max, of, 1.0),
           "overload_cum_max": cumulative_overload(t, order, groups),
           "imbalance": imbalance(t, groups), "node_imbalance": node,
           "intra_node_imbalance": intra}
    if isinstance(traffic_RR, Traffic):
        (src, dst, top), intra_b, inter_b = traffic_RR.summary(gpus_per_node)
    else:
        links = hottest_links(traffic_RR, 1)
        src, dst, top = links[0] if links else (-1, -1, 0.0)
        intra_b, inter_b = link_split(traffic_RR, gpus_per_node)
    out.update(hottest_link_bytes=top, hottest_link_src=src, hottest_link_dst=dst,
               intra_node_bytes=intra_b, inter_node_bytes=inter_b)
    out.update(expert_load_stats(load_LE))
    return out


def iteration_metrics(tokens_MLR: np.ndarray, load_LE: np.ndarray, ops: Sequence[Op],
                      world: int, gpus_per_node: int,
                      groups: Sequence[np.ndarray] | None = None, *,
                      traffic: Traffic | None = None,
                      order: Sequence[tuple[str, int, int]] | None = None
                      ) -> tuple[dict[str, float], Traffic]:
    """``(summary columns, traffic)`` of one iteration: what both backends add to their
    :class:`~moesim.results.IterationRecord`; the traffic is a
    :class:`~moesim.traffic.Traffic`, which reads as the ``[F, R, R]`` array (``np.asarray``)
    when the record is written. ``traffic`` / ``order``: the iteration's traffic and
    :func:`pass_order` where the caller built them (:mod:`moesim.repeat`)."""
    if traffic is None:
        traffic = Traffic.from_ops(ops, world)
    cols = summary_columns(tokens_MLR, load_LE, ops, traffic, gpus_per_node, groups, order)
    return cols, traffic
