"""Pricing a whole program: the batched paths first, then every other op, with the durations
that ops may share computed once (:meth:`moesim.costmodel.CostModel.durations`).

An all-to-all whose matrix is another's transpose (combine vs dispatch: the same buffer, a
transposed view) is costed once — its time is symmetric under transposition (out and in swap)
— before each op's context factor; compute ops that share their read-only per-rank arrays
share their base duration too. Expert GEMMs and block all-to-alls are priced in batches
(:mod:`moesim.cost_batch`, bit-identical to the per-op path).
"""

from __future__ import annotations

import numpy as np

from moesim.blockmatrix import BlockDiag
from moesim.ops import AllToAll, Compute, Op, Program


def program_durations(cost, program: Program) -> tuple[list[np.ndarray], tuple[set, set]]:
    """Every op's :meth:`~moesim.costmodel.CostModel.duration`, and which ops the batched
    paths priced: ``(block all-to-all op indices, expert-GEMM op indices)``."""
    from moesim.cost_batch import block_all_to_all_times, expert_gemm_times

    memo: dict[tuple, np.ndarray] = {}
    gemm_t = expert_gemm_times(cost, program.ops)
    a2a_t = block_all_to_all_times(cost, program.ops)
    out = []
    for i, op in enumerate(program.ops):
        t = a2a_t.get(i)
        if t is not None:
            out.append(cost.finish_a2a(t, op))
            continue
        t = gemm_t.get(i)
        if t is not None:
            out.append(cost.finish_compute(t, op))
            continue
        key = _memo_key(op)
        if key is None:
            out.append(cost.duration(op))
            continue
        if key not in memo:
            memo[key] = cost._base(op)
        f = cost._factor(op)
        out.append(memo[key] * f if f != 1.0 else memo[key])
    return out, (set(a2a_t), set(gemm_t))


def _memo_key(op: Op) -> tuple | None:
    """A key under which ``op``'s duration may be shared within one program (every op is
    alive during the call, so ``id`` values are unique): all-to-alls by buffer
    (:func:`_matrix_key`); non-GEMM compute ops that share their (read-only) per-rank
    arrays by those arrays' identity and their block pass (the lowering reuses one array for
    every layer's attention, forward and recompute alike; a stage's ops share one read-only
    ranks array too); ``None`` for everything else."""
    if isinstance(op, AllToAll):
        key = _matrix_key(op.bytes_RR, op.ranks)
        return None if key is None else ("a2a", *key)
    if (type(op) is Compute and op.gemm_tokens_RS is None and _read_only(op.flops_R)
            and _read_only(op.bytes_R) and (op.ranks is None or _read_only(op.ranks))):
        return ("compute", id(op.flops_R), id(op.bytes_R), op.gemm_rows,
                None if op.ranks is None else id(op.ranks),
                op.block and (op.direction, op.label == "recompute"))
    return None


def _read_only(arr: object) -> bool:
    return isinstance(arr, np.ndarray) and not arr.flags.writeable


def _matrix_key(B: np.ndarray, ranks: np.ndarray | None) -> tuple | None:
    """Identity of an all-to-all's buffer that its transposed view shares: the owning array
    (``B`` itself, or the base ``B`` is the transpose of) and the member ranks; ``None`` (no
    sharing) for any other kind of view."""
    if isinstance(B, BlockDiag):  # its transpose shares the blocks
        return (id(B.local_RK), B.kr, B.scale,
                None if ranks is None else np.asarray(ranks).tobytes())
    if not isinstance(B, np.ndarray):
        return None
    base = B.base
    if base is None:
        owner = B
    elif (isinstance(base, np.ndarray) and base.base is None and base.ndim == 2
          and base.shape == B.shape[::-1] and base.strides == B.strides[::-1]):
        owner = base
    else:
        return None
    return id(owner), None if ranks is None else tuple(np.asarray(ranks).tolist())
