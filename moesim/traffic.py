"""One iteration's GPU-pair traffic, kept sparse: block-diagonal all-to-all bytes plus a list
of point-to-point edges, never an ``[F, R, R]`` array unless someone asks for one.

Shape legend: ``F`` phases (:data:`moesim.ops.PHASES`), ``R`` ranks (world), ``K`` ranks per
diagonal block, ``N`` edges.

:class:`Traffic` holds what :func:`moesim.metrics.traffic_FRR` defines (bytes GPU ``i`` sends
GPU ``j`` per phase; self-traffic left out) as

- ``blocks[K]`` — ``[F, R, K]``: row ``r``'s bytes to the ``K`` ranks of its own aligned block
  of ``K`` ranks (the all-to-alls held as :class:`~moesim.blockmatrix.BlockDiag`; every
  layer's dispatch and combine that the same phases use alike is summed once, in integers);
- ``edges`` — ``(phase, src_N, dst_N, bytes_N)`` in program order: send/recv batches, the ring
  and chain edges of group collectives, and any all-to-all not held in aligned blocks.

It is an array to numpy (``np.asarray(traffic)`` is the dense ``[F, R, R]``, what
``traffic.npz`` stores), and :meth:`Traffic.summary` gives the hottest link and the intra- /
inter-node split from the sparse form, so a 2048-GPU iteration costs what moves, not
``F·R²``. Dense sums add the same numbers in another order than one dense add per op: equal
to rounding (1e-16 relative).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from moesim.blockmatrix import BlockDiag
from moesim.ops import (
    PHASES,
    AllGather,
    AllReduce,
    AllToAll,
    Broadcast,
    GroupCollective,
    Op,
    Reduce,
    ReduceScatter,
    SendRecv,
)

PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}


class Traffic:
    """Per-phase GPU-pair bytes of one iteration (module docstring)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.blocks: dict[int, np.ndarray] = {}
        self._phases: set[int] = set()  # phases the blocks hold (the others stay zero)
        self.edges: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    @classmethod
    def from_ops(cls, ops: Sequence[Op], world: int) -> Traffic:
        """The traffic of a program's ``ops`` (all-to-alls held as blocks summed block-wise)."""
        out, groups = cls.edges_and_blocks(ops, world)
        out.fill_blocks([(sig, [B.local_RK for B in mats]) for sig, mats in groups])
        return out

    @classmethod
    def edges_and_blocks(cls, ops: Sequence[Op], world: int
                         ) -> tuple[Traffic, list[tuple[tuple, list[BlockDiag]]]]:
        """``(traffic of every op not held in aligned blocks, block groups)``: each group's
        signature ``(uses, shape, K, scale, first)`` (``uses``: ``((phase, transposed),
        times)`` pairs) with its distinct matrices, in program order; :meth:`fill_blocks`
        adds them. Matrices that the same phases use alike are summed once."""
        out = cls(world)
        uses: dict[tuple, list] = {}
        firsts: dict[int, tuple] = {}  # id(ranks) -> (ranks, first): a stage's ops share one
        rings: dict[int, tuple] = {}  # id(groups) -> (groups, ring layout)
        for op in ops:
            k = PHASE_INDEX[op.phase]
            B = getattr(op, "bytes_RR", None)
            first = _first_rank_memo(op.ranks, firsts) if isinstance(B, BlockDiag) else None
            if first is None or B.kr != B.kc or first % B.kr:
                if isinstance(op, GroupCollective):
                    out.add_edges(k, *_collective_edges(op, rings))
                else:
                    out.add_op(k, op)
                continue
            entry = uses.setdefault((id(B.local_RK), B.kr, B.scale, first), [B, first, []])
            entry[2].append((k, B.transposed))
        groups: dict[tuple, list[BlockDiag]] = {}
        for B, first, used in uses.values():
            sig = (tuple(sorted(Counter(used).items())), B.local_RK.shape, B.kr, B.scale, first)
            groups.setdefault(sig, []).append(B)
        return out, list(groups.items())

    def fill_blocks(self, groups: list[tuple[tuple, list[np.ndarray]]]) -> None:
        """Add :meth:`edges_and_blocks`' groups, each given as its signature and its
        matrices' local blocks ``[R, K]`` (summed in integers, then added per use)."""
        for (used, _, kr, scale, first), mats in groups:
            total = BlockDiag(_sum_mats(mats), scale, kr)
            rows: dict[bool, np.ndarray] = {}  # the scaled rows, each orientation once
            for (k, transposed), n in used:
                if transposed not in rows:
                    rows[transposed] = _block_rows(total.T if transposed else total)
                self._add_rows(k, kr, first, rows[transposed], n)

    # -- building ---------------------------------------------------------------------------
    def add_blocks(self, phase: int, B: BlockDiag, first: int, times: int = 1) -> None:
        """``times · B`` (square blocks aligned at ``first``) into phase ``phase``."""
        self._add_rows(phase, B.kr, first, _block_rows(B), times)

    def _add_rows(self, phase: int, K: int, first: int, val: np.ndarray, times: int) -> None:
        loc = self.blocks.get(K)
        if loc is None:
            loc = self.blocks[K] = np.zeros((len(PHASES), self.world, K))
        self._phases.add(phase)
        rows = loc[phase, first:first + val.shape[0]]
        rows += val * times if times != 1 else val

    def add_edges(self, phase: int, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray
                  ) -> None:
        """Point-to-point bytes ``src → dst`` (self edges dropped)."""
        keep = src != dst
        if keep.any():
            self.edges.append((phase, src[keep], dst[keep], np.asarray(nbytes, float)[keep]))

    def add_op(self, phase: int, op: Op) -> None:
        """Any op's GPU-to-GPU bytes (compute and host copies move none)."""
        if isinstance(op, AllToAll):
            B = np.asarray(op.bytes_RR, dtype=np.float64)
            ranks = np.arange(B.shape[0]) if op.ranks is None else np.asarray(op.ranks)
            i, j = np.nonzero(B)
            self.add_edges(phase, ranks[i], ranks[j], B[i, j])
        elif isinstance(op, SendRecv):
            self.add_edges(phase, np.asarray(op.src_N, np.int64), np.asarray(op.dst_N, np.int64),
                           np.asarray(op.bytes_N, float))
        elif isinstance(op, GroupCollective):
            self.add_edges(phase, *_collective_edges(op))

    # -- reading ----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(PHASES), self.world, self.world)

    @property
    def ndim(self) -> int:
        return 3

    def dense(self) -> np.ndarray:
        """``[F, R, R]`` float64."""
        F, R = len(PHASES), self.world
        out = np.zeros((F, R, R))
        for K, loc in self.blocks.items():
            for b in range(R // K):
                rows = slice(b * K, (b + 1) * K)
                out[:, rows, rows] += loc[:, rows]
        idx = np.arange(R)
        out[:, idx, idx] = 0.0  # self traffic (the blocks' diagonals)
        for phase, src, dst, val in self.edges:
            np.add.at(out[phase], (src, dst), val)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.dense()
        return out if dtype is None else out.astype(dtype, copy=False)

    def summary(self, gpus_per_node: int) -> tuple[tuple[int, int, float], float, float]:
        """``((src, dst, bytes) of the hottest link, intra-node bytes, inter-node bytes)`` of
        the iteration summed over phases (``(-1, -1, 0.0)`` when nothing moved); ties go to
        the lowest ``src · R + dst``, as :func:`moesim.metrics.hottest_links` orders them."""
        R, g = self.world, max(1, int(gpus_per_node))
        if len(self.blocks) > 1:  # blocks of several sizes: the dense total is simplest
            from moesim.metrics import hottest_links, link_split

            total = self.dense().sum(axis=0)
            top = hottest_links(total, 1)
            return (top[0] if top else (-1, -1, 0.0)), *link_split(total, g)
        keys, vals = self._edge_totals()
        flat_parts, val_parts = [], []
        intra = inter = 0.0
        for K, loc in self.blocks.items():
            # [R, K]; phases no op touched are zero, and adding zeros changes no sum
            tot = loc[sorted(self._phases)].sum(axis=0) if self._phases else loc.sum(axis=0)
            diag, flat, same = _block_layout(R, K, g)
            tot = tot.reshape(-1)
            tot[diag] = 0.0  # self traffic
            inside = (keys // R) // K == (keys % R) // K
            if inside.any():
                pos = (keys[inside] // R) * K + (keys[inside] % R) % K
                np.add.at(tot, pos, vals[inside])
                keys, vals = keys[~inside], vals[~inside]
            intra += float(tot[same].sum())
            inter += float(tot[~same].sum())
            flat_parts.append(flat)
            val_parts.append(tot)
        same_e = (keys // R) // g == (keys % R) // g
        intra += float(vals[same_e].sum())
        inter += float(vals[~same_e].sum())
        flat = np.concatenate(flat_parts + [keys])
        val = np.concatenate(val_parts + [vals])
        if not val.size or val.max() <= 0:
            return (-1, -1, 0.0), intra, inter
        best = flat[val == val.max()].min()
        return (int(best // R), int(best % R), float(val.max())), intra, inter

    def _edge_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct edges ``src · R + dst`` and their bytes over all phases."""
        if not self.edges:
            return np.zeros(0, np.int64), np.zeros(0)
        key = np.concatenate([s.astype(np.int64) * self.world + d for _, s, d, _ in self.edges])
        val = np.concatenate([v for *_, v in self.edges])
        uniq, inv = np.unique(key, return_inverse=True)
        return uniq, np.bincount(inv.reshape(-1), weights=val, minlength=len(uniq))


def first_rank(ranks: np.ndarray | None) -> int | None:
    """The first of contiguous ``ranks`` (0 for all ranks), None if they are not."""
    if ranks is None:
        return 0
    r = np.asarray(ranks)
    if len(r) == 0 or r[-1] - r[0] != len(r) - 1 or np.any(np.diff(r) != 1):
        return None
    return int(r[0])


def _first_rank_memo(ranks: np.ndarray | None, memo: dict[int, tuple]) -> int | None:
    """:func:`first_rank`, memoised per ``ranks`` object (the entry keeps it alive, so its
    ``id`` stays unique while ``memo`` lives)."""
    if ranks is None:
        return 0
    hit = memo.get(id(ranks))
    if hit is None or hit[0] is not ranks:
        hit = memo[id(ranks)] = (ranks, first_rank(ranks))
    return hit[1]


def _ring_layout(groups: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """``(members, next member in the ring, members per group)`` of a ragged grouping
    (each member's ring neighbour is the next member of its group, the last wrapping to
    the first), and each member's group size ``n``."""
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    members = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    start = np.repeat(np.cumsum(sizes) - sizes, sizes)
    n = np.repeat(sizes, sizes)
    pos = np.arange(len(members)) - start
    nxt = members[start + (pos + 1) % np.maximum(n, 1)]
    return sizes, members, nxt, n


@functools.lru_cache(maxsize=8)
def _block_layout(R: int, K: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of ``[R, K]`` block rows, flattened: the self-traffic cells, each cell's dense index
    ``src · R + dst``, and whether its pair is on one node (nodes of ``g`` ranks)."""
    r = np.arange(R)[:, None]
    col = (r // K) * K + np.arange(K)[None, :]
    out = (r[:, 0] * K + r[:, 0] % K, (r * R + col).reshape(-1),
           ((r // g) == (col // g)).reshape(-1))
    for a in out:
        a.setflags(write=False)
    return out


def _block_rows(B: BlockDiag) -> np.ndarray:
    """``B``'s scaled blocks as rows ``[R, K]`` (each row: its bytes to its own block)."""
    blocks = B.blocks()
    if B.transposed:
        blocks = blocks.transpose(0, 2, 1)
    return blocks.reshape(-1, B.kr)


def _sum_mats(mats: list[np.ndarray]) -> np.ndarray:
    """Sum of same-shape matrices (int64 for integers: exact)."""
    acc = np.array(mats[0], dtype=np.int64 if mats[0].dtype.kind in "iub" else np.float64)
    for m in mats[1:]:
        acc += m
    return acc


def _collective_edges(op: GroupCollective, rings: dict[int, tuple] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(src, dst, bytes)`` of a group collective as NCCL's algorithms move it: rings (each
    member to the next of its group) for all-reduce ``2(n−1)/n``, all-gather and
    reduce-scatter ``(n−1)/n``; a pipelined chain from / to the root for broadcast / reduce
    (each link the whole buffer). ``rings`` (optional) memoises the ring layout per
    ``groups`` object (ops of one program share their groupings)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if not len(op.groups):
        return empty
    if not isinstance(op, (Broadcast, Reduce)):
        assert isinstance(op, (AllReduce, AllGather, ReduceScatter, GroupCollective))
        factor = 2.0 if isinstance(op, AllReduce) else 1.0
        size_G = np.asarray(op.bytes_G, dtype=np.float64)
        hit = None if rings is None else rings.get(id(op.groups))
        if hit is None or hit[0] is not op.groups:
            hit = (op.groups, _ring_layout(op.groups))
            if rings is not None:
                rings[id(op.groups)] = hit
        sizes, members, nxt, n = hit[1]
        val = factor * np.repeat(size_G, sizes) * (n - 1) / np.maximum(n, 1)
        keep = (n >= 2) & (val > 0)
        return members[keep], nxt[keep], val[keep]
    roots = getattr(op, "roots_G", None)
    src, dst, val = [], [], []
    for g, members in enumerate(op.groups):
        members = np.asarray(members, dtype=np.int64)
        n, size = len(members), float(op.bytes_G[g])
        if n < 2 or size <= 0:
            continue
        root = int(roots[g]) if roots is not None and len(roots) > g else int(members[0])
        chain = np.roll(members, -int(np.flatnonzero(members == root)[0]))
        s, d = chain[:-1], chain[1:]
        if isinstance(op, Reduce):
            s, d = d[::-1], s[::-1]
        src.append(s)
        dst.append(d)
        val.append(np.full(len(s), size))
    if not src:
        return empty
    return np.concatenate(src), np.concatenate(dst), np.concatenate(val)
