"""A block-diagonal matrix kept by its blocks: what an all-to-all's bytes or a layer's routed
tokens look like when ranks exchange tokens only inside groups of consecutive ranks.

Shape legend: ``R`` rows, ``C`` columns of the whole matrix, ``B`` diagonal blocks, ``Kr`` /
``Kc`` rows / columns per block (``R = B·Kr``, ``C = B·Kc``), ``RK``: one row's entries inside
its own block (``local_RK[r, k]`` is entry ``(r, (r // Kr)·Kc + k)``).

Static EP with EDP replicas routes every source to its own EP group only (``ep_group``), so
one layer's ``[R, R]`` token matrix at 2048 GPUs with EP 256 is 8 blocks of ``256 × 256``:
an eighth of the dense matrix. :class:`BlockDiag` stores ``local_RK`` (the routed counts as
they are, no copy) and a ``scale`` (token bytes), and is a drop-in array for readers that
want a dense one (``np.asarray``, ufuncs, numpy functions, indexing, ``.T``, ``.sum``): they
get the dense matrix, materialised on demand. The cost model and the traffic metrics read the
blocks directly (:meth:`row_sums`, :meth:`col_sums`, :meth:`diagonal`, :meth:`blocks`), so
their cost grows with the blocks, not with ``R·C``. One block (``Kr = R``) is simply the dense
matrix, held lazily (the byte matrix is never multiplied out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # the one-pass integer sums (setup.py builds them where a compiler is present)
    from moesim import _block_sums as _block_sums_c
except ImportError:  # pragma: no cover - no compiler: numpy, one reduction at a time
    _block_sums_c = None
from numpy.lib.mixins import NDArrayOperatorsMixin


class BlockDiag(NDArrayOperatorsMixin):
    """``scale · blockdiag(local_RK)`` (or its transpose): see the module docstring.

    ``local_RK`` is ``[R, Kc]``; ``rows_per_block`` is ``Kr`` (``R`` when omitted: one block).
    Integer ``local_RK`` with an integer ``scale`` stays integer (int64) when materialised,
    as ``tokens * token_bytes`` does."""

    __array_priority__ = 100

    def __init__(self, local_RK: np.ndarray, scale: float | int = 1,
                 rows_per_block: int | None = None, transposed: bool = False,
                 batch: tuple[BlockBatch, tuple[int, ...]] | None = None) -> None:
        self.local_RK = local_RK
        self.batch = batch
        self.scale = scale
        self.kr = local_RK.shape[0] if rows_per_block is None else int(rows_per_block)
        self.transposed = transposed
        R, kc = local_RK.shape
        assert self.kr > 0 and R % self.kr == 0, (R, self.kr)
        self.num_blocks = R // self.kr
        self.kc = kc

    # -- array protocol ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        s = (self.num_blocks * self.kr, self.num_blocks * self.kc)
        return s[::-1] if self.transposed else s

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self._value_dtype()

    @property
    def T(self) -> BlockDiag:  # noqa: N802 (numpy's name)
        return BlockDiag(self.local_RK, self.scale, self.kr, not self.transposed, self.batch)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"BlockDiag({self.num_blocks} blocks of {self.kr}x{self.kc}, scale={self.scale}"
                f"{', transposed' if self.transposed else ''})")

    def _value_dtype(self) -> np.dtype:
        d = self.local_RK.dtype
        if d.kind in "iub" and isinstance(self.scale, (int, np.integer)):
            return np.dtype(np.int64)
        return np.result_type(d, np.float64)

    def dense(self, dtype: Any = None) -> np.ndarray:
        """The whole matrix (a new array)."""
        vt = self._value_dtype()
        out = np.zeros((self.num_blocks * self.kr, self.num_blocks * self.kc), dtype=vt)
        loc = self.local_RK.astype(vt, copy=False)
        for b in range(self.num_blocks):
            rows = slice(b * self.kr, (b + 1) * self.kr)
            out[rows, b * self.kc:(b + 1) * self.kc] = loc[rows] * self.scale
        if self.transposed:
            out = np.ascontiguousarray(out.T)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.dense(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(x) if isinstance(x, BlockDiag) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) if isinstance(x, BlockDiag) else x
                                  for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return func(*_densify(args), **_densify(kwargs))

    def __getitem__(self, index):
        return self.dense()[index]

    def __iter__(self):
        return iter(self.dense())

    def astype(self, dtype: Any, copy: bool = True) -> np.ndarray:
        return self.dense(dtype)

    def copy(self) -> np.ndarray:
        return self.dense()

    def tolist(self) -> list:
        return self.dense().tolist()

    def sum(self, axis: int | None = None, dtype: Any = None) -> Any:
        """Like ``ndarray.sum`` (from the blocks)."""
        if axis is None:
            return self._scaled(self.local_RK.sum(dtype=self._acc()))
        axis = axis % 2
        return self.row_sums() if axis == 1 else self.col_sums()

    # -- block-wise reductions (what the cost model and the metrics use) --------------------
    def _acc(self) -> np.dtype:
        return np.dtype(np.int64) if self.local_RK.dtype.kind in "iub" else np.dtype(np.float64)

    def _scaled(self, x: Any) -> Any:
        return x * self.scale if self.scale != 1 else x

    def _out_in(self) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled sums over each row / column of the untransposed matrix."""
        loc = self.local_RK
        out = loc.sum(axis=1, dtype=self._acc())
        inn = loc.reshape(self.num_blocks, self.kr, self.kc).sum(axis=1, dtype=self._acc())
        return out, inn.reshape(-1)

    def row_sums(self) -> np.ndarray:
        out, inn = self._out_in()
        return self._scaled(inn if self.transposed else out)

    def col_sums(self) -> np.ndarray:
        out, inn = self._out_in()
        return self._scaled(out if self.transposed else inn)

    def diagonal(self) -> np.ndarray:
        """The main diagonal (square matrices with square blocks only)."""
        assert self.kr == self.kc, "diagonal of non-square blocks"
        r = np.arange(self.local_RK.shape[0])
        return self._scaled(self.local_RK[r, r % self.kr].astype(self._acc(), copy=False))

    def blocks(self) -> np.ndarray:
        """The scaled blocks ``[B, Kr, Kc]`` of the untransposed matrix (a view when the scale
        is 1)."""
        return self._scaled(self.local_RK.reshape(self.num_blocks, self.kr, self.kc))


def _densify(obj: Any) -> Any:
    if isinstance(obj, BlockDiag):
        return obj.dense()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_densify(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _densify(v) for k, v in obj.items()}
    return obj


def block_io(B: BlockDiag, gpus_per_node: int, first_rank: int
             ) -> tuple[np.ndarray, ...] | None:
    """``(intra_out, intra_in, inter_out, inter_in)`` per member of a square all-to-all
    matrix held as blocks, self traffic excluded (the cost model's
    :func:`~moesim.costmodel._intra_inter_io`), or None when nodes and blocks do not line up
    (the caller then materialises). Members are ranks ``first_rank …`` in order."""
    if B.kr != B.kc or first_rank % gpus_per_node:
        return None
    if B.batch is not None:
        batch, index = B.batch
        io = batch.io(gpus_per_node)
        if io is None:
            return None
        io = tuple(x[index] for x in io)
    else:
        io = _unscaled_io(B.local_RK[None], B.kr, gpus_per_node)
        if io is None:
            return None
        io = tuple(x[0] for x in io)
    if B.transposed:
        io = (io[1], io[0], io[3], io[2])
    return tuple(B._scaled(x) for x in io)


def _unscaled_io(local_XRK: np.ndarray, K: int, g: int, in_XR: np.ndarray | None = None
                 ) -> tuple[np.ndarray, ...] | None:
    """``(intra_out, intra_in, inter_out, inter_in)`` int64 ``[X, R]`` of a stack of
    block-diagonal matrices (blocks of ``K``, nodes of ``g`` ranks), self traffic excluded;
    None when blocks and nodes do not nest. ``in_XR``: the column sums when the caller has
    them (the routed rows per rank), sparing a pass over the matrices (the C pass of
    :func:`block_sums` takes them on the way)."""
    if K % g and g % K:
        return None
    sums = block_sums(local_XRK, K, g)
    if sums is not None:
        return io_from_sums(*sums[:5], K, g)
    X, R, _ = local_XRK.shape
    acc = np.int64 if local_XRK.dtype.kind in "iub" else np.float64
    out_all = local_XRK.sum(axis=2, dtype=acc)
    in_all = (local_XRK.reshape(X, R // K, K, K).sum(axis=2, dtype=acc).reshape(X, R)
              if in_XR is None else np.asarray(in_XR, dtype=acc))
    r = np.arange(R)
    diag = local_XRK[:, r, r % K].astype(acc, copy=False)
    node_out = node_in = None
    if K % g == 0:  # blocks of whole nodes: the intra-node pairs are the blocks' node blocks
        n = K // g
        b6 = local_XRK.reshape(X, R // K, n, g, n, g)
        node_out = np.einsum("yxaiaj->yxai", b6).reshape(X, R).astype(acc)
        node_in = np.einsum("yxaiaj->yxaj", b6).reshape(X, R).astype(acc)
    return io_from_sums(out_all, in_all, diag, node_out, node_in, K, g)


def io_from_sums(row_XR: np.ndarray, col_XR: np.ndarray, diag_XR: np.ndarray,
                 node_row_XR: np.ndarray | None, node_col_XR: np.ndarray | None, K: int,
                 g: int) -> tuple[np.ndarray, ...]:
    """:func:`_unscaled_io` from the matrices' row, column, diagonal and own-node sums
    (blocks inside nodes, ``g % K == 0``: every pair is intra-node, no node sums needed)."""
    out_all, in_all = row_XR - diag_XR, col_XR - diag_XR
    if K % g == 0:
        intra_out, intra_in = node_row_XR - diag_XR, node_col_XR - diag_XR
    else:
        intra_out, intra_in = out_all, in_all
    return intra_out, intra_in, out_all - intra_out, in_all - intra_in


def block_sums_available() -> bool:
    """Whether the one-pass C sums are built."""
    return _block_sums_c is not None


def block_sums(local_XRQ: np.ndarray, K: int, g: int, group: int = 0, *, slots: int = 1,
               acc_rows: np.ndarray | None = None, acc_count: int = 0
               ) -> tuple[np.ndarray | None, ...] | None:
    """``(row, col, diag, node_row, node_col, totals, slot_cols)`` of a stack of integer block
    matrices in one C pass (``moesim._block_sums``): int64 ``[X, R]`` row and column sums,
    diagonal, sums over the source's own node's destinations and the destination's own
    node's sources (nodes of ``g`` ranks, when ``K`` is a multiple of ``g``); ``totals``: with
    ``group`` > 0 the sum of each run of ``group`` consecutive matrices ``[X / group, R, K]``,
    with ``acc_rows`` the sum of the matrices sharing a row (``[acc_count, R, K]``; < 0
    skips), else None. With ``slots`` S > 1 the matrices are per destination slot
    (``[X, R, K·S]``, a rank's entry the sum of its S slots'), and ``slot_cols`` are the
    column sums per slot ``[X, R·S]`` (None for S = 1: ``col``). None when the kernel is not
    built or the matrices are not int32 / int64."""
    if _block_sums_c is None or local_XRQ.dtype not in (np.int32, np.int64) \
            or local_XRQ.ndim != 3 or local_XRQ.shape[2] != K * slots:
        return None
    X, R, _ = local_XRQ.shape
    tok = np.ascontiguousarray(local_XRQ)
    out = [np.zeros((X, R), np.int64) for _ in range(5)]
    if group:
        acc_rows, acc_count = np.arange(X, dtype=np.int64) // group, -(-X // group)
    totals = None if acc_rows is None else np.zeros((acc_count, R, K), np.int64)
    rows = np.zeros(0, np.int64) if acc_rows is None else np.ascontiguousarray(acc_rows,
                                                                               np.int64)
    slot_cols = np.zeros((X, R * slots), np.int64) if slots > 1 else None
    _block_sums_c.sums(tok, R, K, slots, g, rows, *out, slot_cols, totals)
    return (*out, totals, slot_cols)


class BlockBatch:
    """The in-block matrices of every (micro-batch, layer) of one lowering, ``local_MLRK``,
    which their :class:`BlockDiag` views point back to (``batch=(self, (mb, layer))``), so
    the cost model's per-rank sums run once over all of them (a few array operations per
    iteration instead of a few per all-to-all). ``col_sums_MLR``: the matrices' column sums
    if known (tokens each rank receives: the routed rows of its slots)."""

    def __init__(self, local_MLRK: np.ndarray, rows_per_block: int,
                 col_sums_MLR: np.ndarray | None = None) -> None:
        self.local_MLRK = local_MLRK
        self.kr = rows_per_block
        self.col_sums_MLR = col_sums_MLR
        self._io: dict[int, Any] = {}

    @classmethod
    def known(cls, io_by_g: dict[int, tuple[np.ndarray, ...]], rows_per_block: int
              ) -> BlockBatch:
        """A batch known only by its :meth:`io` sums (their matrices never built)."""
        out = cls(None, rows_per_block)
        out._io = dict(io_by_g)
        return out

    def io(self, gpus_per_node: int) -> tuple[np.ndarray, ...] | None:
        """Unscaled ``(intra_out, intra_in, inter_out, inter_in)`` ``[M, L, R]`` (None when
        blocks and nodes do not nest)."""
        if gpus_per_node not in self._io:
            M, L, R, K = self.local_MLRK.shape
            cols = None if self.col_sums_MLR is None else self.col_sums_MLR.reshape(M * L, R)
            io = _unscaled_io(self.local_MLRK.reshape(M * L, R, K), self.kr, gpus_per_node,
                              cols)
            self._io[gpus_per_node] = None if io is None else tuple(
                x.reshape(M, L, R) for x in io)
        return self._io[gpus_per_node]
