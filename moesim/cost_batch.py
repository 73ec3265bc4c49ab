"""The cost model's batched paths: one program's ops priced a batch at a time, exactly.

:meth:`moesim.costmodel.CostModel.durations` calls these before its per-op loop. Both give
each op bit for bit what :meth:`~moesim.costmodel.CostModel.duration` would (the same
elementwise steps on the same values, the same per-row reductions), only without a few dozen
small array operations per op; ops they do not take fall through to the per-op path.

- :func:`expert_gemm_times`: expert-GEMM ops (``gemm_tokens_RS``) with the same slot-array
  shape, passes, weight bytes and FLOPs per token are stacked ``[N, R, S]``.
- :func:`block_all_to_all_times`: all-to-alls whose matrix is a view of a
  :class:`~moesim.blockmatrix.BlockBatch` are timed per (batch, scale, orientation) over all
  its (micro-batch, layer) matrices ``[M, L, K]`` at once.

Shape legend: ``N`` stacked ops, ``R`` ranks, ``S`` slots, ``M`` passes, ``L`` layers, ``K``
members of an all-to-all.
"""

from __future__ import annotations

import numpy as np

from moesim.blockmatrix import BlockBatch, BlockDiag
from moesim.costmodel import GB, CostModel
from moesim.ops import AllToAll, Compute, Op


def expert_gemm_times(cost: CostModel, ops: list[Op]) -> dict[int, np.ndarray]:
    """``_expert_gemms`` seconds ``[R]`` of every expert-GEMM op (by op index) whose weight
    bytes or FLOPs per token are given (the others derive them per op and stay per op):
    ``Σ_slots [max(p·w/bw, p·m·f/(peak·eff(m))) + launch]`` over a stack of same-shape ops."""
    batches: dict[tuple, list] = {}
    for i, op in enumerate(ops):
        if type(op) is not Compute or op.gemm_tokens_RS is None:
            continue
        m_RS = np.asarray(op.gemm_tokens_RS, dtype=np.float64)
        w, f = op.weight_bytes, op.flops_per_token
        if w <= 0 and f <= 0 or m_RS.ndim != 2:
            continue
        batches.setdefault((m_RS.shape, float(op.gemm_passes), w, f), []).append((i, m_RS))
    out = {}
    for (_, p, w, f), items in batches.items():
        t_NR = gemm_stack_times(cost, np.stack([m for _, m in items]), p, w, f)
        out.update((i, t_NR[n]) for n, (i, _) in enumerate(items))
    return out


def gemm_stack_times(cost: CostModel, m_XRS: np.ndarray, passes: float, weight_bytes: float,
                     flops_per_token: float, m_int: np.ndarray | None = None) -> np.ndarray:
    """``Σ_slots [max(p·w/bw, p·m·f/(peak·eff(m))) + launch]`` ``[..., R]`` of a stack of
    same-shape expert-GEMM row arrays ``[..., R, S]`` (float64), the per-op formula
    elementwise; ``m_int``: the same rows as integers, when they are (efficiency by table)."""
    hw, p, w, f = cost.hw, passes, weight_bytes, flops_per_token
    curve = "bwd" if p >= 2 else ""
    eff = cost.efficiency(m_XRS, curve) if m_int is None else cost.count_efficiency(m_int, curve)
    flop_t = p * m_XRS * f / (hw.peak_flops * eff)
    slot_t = np.maximum(p * w / (hw.mem_bw_GBps * GB), flop_t) + hw.launch_s
    return np.where(m_XRS > 0, slot_t, 0.0).sum(axis=-1)


def a2a_latency_times(cost: CostModel, tmax: np.ndarray, spans: np.ndarray, members: int
                      ) -> np.ndarray:
    """A block all-to-all's seconds from its slowest member's transfer time and whether it
    crosses nodes (arrays alike): ``tmax`` plus the all-to-all latency of ``members``."""
    return tmax + cost._latency(spans, "all_to_all", members)


def block_all_to_all_times(cost: CostModel, ops: list[Op]) -> dict[int, np.ndarray]:
    """``all_to_all`` seconds (as ``[1]``, before overhead and context factor) of every
    all-to-all whose matrix is a :class:`~moesim.blockmatrix.BlockBatch` view on consecutive
    ranks starting at a node boundary (by op index): the slowest member's transfer time of
    its matrix, taken from its batch's ``[M, L]`` table, plus the op's latency. Dense
    matrices, scattered ranks and single-member ops are left to the per-op path."""
    g = cost.cluster.gpus_per_node
    bw = cost._links["all_to_all"][0]
    tables: dict[tuple, tuple] = {}
    firsts: dict[int, tuple] = {}
    out: dict[int, np.ndarray] = {}
    for i, op in enumerate(ops):
        B = getattr(op, "bytes_RR", None)
        if type(op) is not AllToAll or not isinstance(B, BlockDiag) or B.batch is None:
            continue
        first = _contiguous_first(op.ranks, firsts)
        if first is None or B.kr != B.kc or first % g:
            continue
        batch, index = B.batch
        key = (id(batch), B.scale, B.transposed)
        hit = tables.get(key)
        if hit is None or hit[0] is not batch:  # the entry keeps ``batch`` alive
            hit = tables[key] = (batch, batch_times(B, batch, g, bw))
        if hit[1] is None:
            continue
        tmax_ML, spans_ML, K = hit[1]
        if K <= 1:
            continue
        out[i] = np.array([float(a2a_latency_times(cost, tmax_ML[index],
                                                   bool(spans_ML[index]), K))])
    return out


def batch_times(B: BlockDiag, batch: BlockBatch, g: int, bw: tuple
                 ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per matrix of ``batch`` (scaled and oriented as ``B``): the slowest member's transfer
    seconds ``max(max(intra_out, intra_in)/bw_intra, max(inter_out, inter_in)/bw_inter)``,
    whether any bytes cross nodes, and the member count (None: blocks and nodes do not nest)."""
    io = batch.io(g)
    if io is None:
        return None
    if B.transposed:
        io = (io[1], io[0], io[3], io[2])
    io = [np.asarray(B._scaled(x), dtype=np.float64) for x in io]
    intra = np.maximum(io[0], io[1]) / bw[0]
    inter = np.maximum(io[2], io[3]) / bw[1]
    return np.maximum(intra, inter).max(axis=-1), inter.any(axis=-1), io[0].shape[-1]


def _contiguous_first(ranks: np.ndarray | None, memo: dict[int, tuple]) -> int | None:
    """The first of an all-to-all's member ranks when they are consecutive (0 for all ranks
    or none), None otherwise, as the cost model's ``_block_io`` tests them; memoised per
    ``ranks`` object (the entry keeps it alive, so its ``id`` stays unique)."""
    if ranks is None:
        return 0
    hit = memo.get(id(ranks))
    if hit is None or hit[0] is not ranks:
        r = np.asarray(ranks)
        ok = not len(r) or (r[-1] - r[0] == len(r) - 1 and not np.any(np.diff(r) != 1))
        hit = memo[id(ranks)] = (ranks, (int(r[0]) if len(r) else 0) if ok else None)
    return hit[1]
