"""Durations of ops: GPU compute from a roofline with a GEMM-efficiency curve, collectives α–β.

Shape legend: ``R`` ranks (world), ``S`` slots per rank, ``G`` groups of a collective, ``K``
members of an all-to-all, ``N`` point-to-point transfers. Times in seconds, ``*_GBps`` in 1e9
bytes/s.

Compute (``Compute``), multiplied by ``hardware.cores_shared_by`` (CPU ranks sharing cores):

- expert GEMMs (``gemm_tokens_RS``): ``Σ_slots with m>0 [max(p·w / mem_bw, p·m·f /
  (peak · eff(m))) + launch]`` with ``m`` rows, ``w`` one expert's weight bytes, ``f`` FLOPs per
  token, ``p = gemm_passes`` (1 forward; 2 backward: dgrad + wgrad, each reading the weight);
- anything else: ``max(bytes / mem_bw, flops / (peak · eff)) + launch`` with ``eff =
  eff(gemm_rows)`` for GEMM-shaped work and ``elementwise_eff`` otherwise.

``eff`` is ``hardware.gemm_eff_curve``; expert backward passes use
``backward_gemm_eff_curve`` and non-expert GEMM-shaped work ``dense_gemm_eff_curve`` where the
profile has them (calibrated CPU profiles do; the GPU presets use one curve).
An op that is a whole attention block (``Compute.block == "attention"``: a parallel layout's
attention forward, backward and full recompute) takes ``eff`` from
``hardware.attention_block_eff[pass]`` (pass ``recompute`` for ops labelled so, else the op's
direction) where the profile has that pass: ``moesim calibrate`` measures it on the block itself
at the TP shard sizes, so the op costs what the block costs in isolation.

Collectives follow nccl-tests' definitions (``doc/PERFORMANCE.md`` in NVIDIA/nccl-tests): for a
collective of size ``S`` bytes taking ``t``, ``algbw = S / t`` and ``busbw = algbw · factor``
with factor ``2(n−1)/n`` for all-reduce, ``(n−1)/n`` for all-gather, reduce-scatter and
all-to-all, ``1`` for broadcast and reduce. A link level is described by its measured busbw, so

    ``t = latency + factor · S / busbw``

where ``busbw`` is the intra-node level's when the group sits in one node and the inter-node
per-GPU NIC level's when it spans nodes (a hierarchical collective is limited by its slowest
level), and ``latency = hardware.collective_latency_s + level.latency_s``. Groups of one rank
cost nothing. A level may give one collective kind its own ``busbw`` and ``latency``
(``LinkLevel.per_kind``: ``all_to_all``, ``all_reduce``, ``all_gather``, ``reduce_scatter``,
``broadcast``, ``reduce``, ``send_recv``); they replace the level's for ops of that kind only,
and the bus factors still apply. A per-kind entry may add ``latency_per_peer_s`` per member
beyond the first (``latency + (n − 1) · latency_per_peer``); for send/recv ``n`` is the rank's
number of transfers (the larger of its sends and receives; gloo pays per message).

All-to-all from its bytes matrix ``B[K, K]``: per rank, bytes out and in over NVLink
(same-node peers) and over the NIC (other nodes), self-traffic free; rank time =
``max(intra_out, intra_in) / intra_bw`` vs ``max(inter_out, inter_in) / inter_bw``, the larger
of the two, plus latency; the op ends when its slowest rank does. This is nccl-tests' model: in
a uniform all-to-all of ``S`` bytes per rank within one node each rank sends ``S(n−1)/n`` to its
peers, so ``t = S(n−1)/n / busbw``, i.e. ``busbw = (S/t)·(n−1)/n = algbw·(n−1)/n``.

``SendRecv``: per rank, the same four directions over its own transfers. ``HostCompute``:
``bytes / host_optimizer_GBps``. ``HostCopy``: ``host.latency + bytes / host.bw`` (PCIe).

Every op's duration gets ``hardware.op_overhead_s`` on top (0 in the GPU presets; the CPU
executor's per-op interpreter time in a calibrated CPU profile), and is then multiplied by its
context factor (:func:`context_factor`; 1 unless the profile has ``context_factors``, which
``moesim calibrate`` measures in a short training run: small collectives and host work take
longer between heavy compute than in isolated microbenchmarks).
"""

from __future__ import annotations

import numpy as np

from moesim.blockmatrix import BlockDiag, block_io
from moesim.op_kinds import (  # noqa: F401  (re-exported)
    _KIND,
    bus_factor,
    collective_kind,
    context_class,
    context_factor,
    context_key,
)
from moesim.ops import (
    AllToAll,
    Compute,
    GroupCollective,
    HostCompute,
    HostCopy,
    Op,
    Program,
    SendRecv,
)
from moesim.specs import Cluster

GB = 1e9


class CostModel:
    """Op durations on one :class:`~moesim.specs.Cluster` (see the module docstring)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.hw = cluster.hardware
        self.node_R = np.arange(cluster.world_size) // cluster.gpus_per_node
        curve = self.hw.gemm_eff_curve
        self._log2_m = np.log2([p[0] for p in curve])
        self._eff = np.array([p[1] for p in curve])
        self._curves = {name: (np.log2([p[0] for p in c]), np.array([p[1] for p in c]))
                        for name, c in (("bwd", self.hw.backward_gemm_eff_curve or curve),
                                        ("dense", self.hw.dense_gemm_eff_curve or curve))}
        self._curves.update({f"block.{p}": (np.log2([x[0] for x in c]),
                                             np.array([x[1] for x in c]))
                             for p, c in self.hw.attention_block_eff.items()})
        self._links = {kind: self._link_arrays(kind) for kind in ("", *_KIND.values())}
        self._count_tables: dict[str, np.ndarray] = {}

    def _link_arrays(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(bw [bytes/s], latency [s], latency per peer [s])`` of ``kind``, each ``[2]``:
        intra, inter level."""
        c = self.cluster
        (bi, li), (bo, lo) = c.intra.for_kind(kind), c.inter.for_kind(kind)
        per_peer = np.array([c.intra.latency_per_peer_s(kind), c.inter.latency_per_peer_s(kind)])
        return (np.array([bi, bo]) * GB, self.hw.collective_latency_s + np.array([li, lo]),
                per_peer)

    def efficiency(self, m: np.ndarray, curve: str = "") -> np.ndarray:
        """``hardware.gemm_efficiency`` with the curve's arrays built once; ``curve``
        ``"bwd"`` / ``"dense"`` picks the expert-backward / non-expert curve (each defaults to
        the forward one)."""
        xs, ys = self._curves[curve] if curve else (self._log2_m, self._eff)
        return np.interp(np.log2(np.maximum(m, 1.0)), xs, ys)

    def count_efficiency(self, m_int: np.ndarray, curve: str = "") -> np.ndarray:
        """:meth:`efficiency` of integer row counts, by table: the curve evaluated once at
        every count up to the largest (the same values: the same function of the same
        inputs), then looked up — a gather instead of a binary search per element."""
        top = int(m_int.max(initial=0))
        if top > 1 << 22:
            return self.efficiency(m_int.astype(np.float64), curve)
        table = self._count_tables.get(curve)
        if table is None or len(table) <= top:
            n = max(top + 1, 2 * (0 if table is None else len(table)), 1024)
            table = self._count_tables[curve] = self.efficiency(np.arange(n, dtype=np.float64),
                                                                curve)
        return table[np.maximum(m_int, 0)]

    # -- dispatch ---------------------------------------------------------------------------
    def duration(self, op: Op) -> np.ndarray:
        """Seconds: ``[R]`` for per-rank ops (compute, host, send/recv), ``[G]`` per group of
        a group collective, ``[1]`` for an all-to-all (its slowest rank); plus
        ``hardware.op_overhead_s`` where it is set."""
        return self._base(op) * self._factor(op)

    def _base(self, op: Op) -> np.ndarray:
        """:meth:`duration` before the context factor."""
        t = self._work(op)
        return t + self.hw.op_overhead_s if self.hw.op_overhead_s > 0 else t

    def _factor(self, op: Op) -> float:
        factors = self.hw.context_factors
        return context_factor(factors, context_key(op)) if factors else 1.0

    def _work(self, op: Op) -> np.ndarray:
        if isinstance(op, Compute):
            return self.compute(op)
        if isinstance(op, HostCompute):
            return np.asarray(op.bytes_R, dtype=np.float64) / (self.hw.host_optimizer_GBps * GB)
        if isinstance(op, HostCopy):
            host = self.cluster.host
            return host.latency_s + np.asarray(op.bytes_R, dtype=np.float64) / (host.bw_GBps * GB)
        if isinstance(op, GroupCollective):
            return self.group_collective(op)
        if isinstance(op, AllToAll):
            return np.array([self.all_to_all(op.bytes_RR, op.ranks)])
        if isinstance(op, SendRecv):
            return self.send_recv(op)
        raise TypeError(f"no cost for op type {type(op).__name__}")

    def durations(self, program: Program) -> list[np.ndarray]:
        """:meth:`duration` of every op; an all-to-all whose matrix is another's transpose
        (combine vs dispatch: same buffer, transposed view) is costed once — its time is
        symmetric under transposition (out and in swap) — before each op's context factor.
        Expert GEMMs and block all-to-alls are priced in batches (:mod:`moesim.cost_batch`,
        bit-identical to the per-op path)."""
        return self.durations_batched(program)[0]

    def durations_batched(self, program: Program) -> tuple[list[np.ndarray], tuple[set, set]]:
        """:meth:`durations`, and which ops the batched paths priced: ``(block all-to-all
        op indices, expert-GEMM op indices)`` (:func:`moesim.cost_program.program_durations`)."""
        from moesim.cost_program import program_durations

        return program_durations(self, program)

    def finish_a2a(self, t: np.ndarray, op: Op) -> np.ndarray:
        """A batched block all-to-all's transfer-plus-latency seconds → what the memoised
        path gives it (overhead, then the context factor)."""
        t = t + self.hw.op_overhead_s if self.hw.op_overhead_s > 0 else t
        f = self._factor(op)
        return t * f if f != 1.0 else t

    def finish_compute(self, t: np.ndarray, op: Op) -> np.ndarray:
        """Batched compute seconds (expert GEMMs, :meth:`plain_compute`) → :meth:`compute`'s
        remaining step, then :meth:`_base`'s overhead and the context factor."""
        t = t * self.hw.cores_shared_by
        t = t + self.hw.op_overhead_s if self.hw.op_overhead_s > 0 else t
        return t * self._factor(op)

    # -- compute ----------------------------------------------------------------------------
    def compute(self, op: Compute) -> np.ndarray:
        """Per-rank seconds of a ``Compute`` op: ``[R]``."""
        hw = self.hw
        if op.gemm_tokens_RS is not None:
            t = self._expert_gemms(op)
        else:
            t = self.plain_compute(op, op.flops_R, op.bytes_R)
        return t * hw.cores_shared_by

    def plain_compute(self, op: Compute, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        """A non-expert ``Compute`` op's roofline seconds (before cores sharing) for FLOPs and
        bytes of any shape: ``max(bytes/bw, flops/(peak·eff)) + launch``, ``eff`` from the
        op's GEMM rows."""
        hw = self.hw
        eff = (self.efficiency(op.gemm_rows, self._dense_curve(op)) if op.gemm_rows > 0
               else hw.elementwise_eff)
        t = np.maximum(np.asarray(nbytes, dtype=np.float64) / (hw.mem_bw_GBps * GB),
                       np.asarray(flops, dtype=np.float64) / (hw.peak_flops * eff))
        return t + hw.launch_s

    def _dense_curve(self, op: Compute) -> str:
        """The efficiency curve of a non-expert GEMM-shaped op: its block pass's measured one
        (``block.fwd`` / ``block.bwd`` / ``block.recompute``) where the profile has it, else
        ``dense``."""
        if op.block == "attention":
            name = f"block.{'recompute' if op.label == 'recompute' else op.direction}"
            if name in self._curves:
                return name
        return "dense"

    def _expert_gemms(self, op: Compute) -> np.ndarray:
        """``Σ_slots [max(p·w/bw, p·m·f/(peak·eff(m))) + launch]`` per rank: ``[R]``."""
        hw = self.hw
        m_RS = np.asarray(op.gemm_tokens_RS, dtype=np.float64)
        p = float(op.gemm_passes)
        w, f = op.weight_bytes, op.flops_per_token
        if w <= 0 and f <= 0:  # derive from the totals when the op does not say
            active_R = np.maximum((m_RS > 0).sum(axis=1), 1)
            w = float(np.max(np.asarray(op.bytes_R) / (p * active_R)))
            f = float(np.asarray(op.flops_R).sum() / max(p * m_RS.sum(), 1.0))
        flop_t = p * m_RS * f / (hw.peak_flops * self.efficiency(m_RS, "bwd" if p >= 2 else ""))
        slot_t = np.maximum(p * w / (hw.mem_bw_GBps * GB), flop_t) + hw.launch_s
        return np.where(m_RS > 0, slot_t, 0.0).sum(axis=1)

    # -- collectives ------------------------------------------------------------------------
    def _latency(self, spans_nodes: np.ndarray | bool, kind: str = "",
                 members: np.ndarray | int = 2) -> np.ndarray:
        """Fixed seconds of a ``kind`` collective of ``members`` ranks: the inter-node
        level's where it spans nodes, else the intra-node level's (per-kind values where the
        level has them, with their per-peer term)."""
        _, lat, per_peer = self._links[kind]
        n1 = np.asarray(members) - 1
        return np.where(spans_nodes, lat[1] + per_peer[1] * n1, lat[0] + per_peer[0] * n1)

    def group_collective(self, op: GroupCollective) -> np.ndarray:
        """Seconds per group: ``[G]``."""
        sizes = op.group_sizes
        if len(sizes) == 0:
            return np.zeros(0)
        members = np.concatenate(op.groups).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        nodes = self.node_R[members]
        spans = np.maximum.reduceat(nodes, starts) != np.minimum.reduceat(nodes, starts)
        kind = collective_kind(op)
        bw = np.where(spans, self._links[kind][0][1], self._links[kind][0][0])
        t = self._latency(spans, kind, sizes) + bus_factor(op, sizes) \
            * np.asarray(op.bytes_G, float) / bw
        return np.where(sizes > 1, t, 0.0)

    def all_to_all(self, bytes_KK: np.ndarray, ranks: np.ndarray | None = None) -> float:
        """Seconds of an all-to-all among ``ranks`` (default all): its slowest rank. One
        member (a single-GPU run) sends only to itself: no link, but its rows still go
        through device memory twice (the permutation into the send buffer and the copy to
        the receive buffer, as Megatron's permute kernel and NCCL's self-chunk copy do), each
        a read and a write: ``4 · bytes / mem_bw + launch``; zero bytes cost nothing."""
        t_K, spans = self.all_to_all_ranks(bytes_KK, ranks)
        if len(t_K) <= 1:
            nbytes = float(np.asarray(bytes_KK, dtype=np.float64).sum())
            return 4 * nbytes / (self.hw.mem_bw_GBps * GB) + self.hw.launch_s if nbytes else 0.0
        return float(t_K.max() + self._latency(spans, "all_to_all", len(t_K)))

    def all_to_all_ranks(self, bytes_KK: np.ndarray, ranks: np.ndarray | None = None
                         ) -> tuple[np.ndarray, bool]:
        """Per-member transfer seconds (no latency) ``[K]``, and whether any bytes cross
        nodes (which picks the inter-node latency; intra-node-only traffic pays NVLink's)."""
        c = self.cluster
        raw = _block_io(bytes_KK, ranks, c.gpus_per_node)
        if raw is None:
            B = np.asarray(bytes_KK)  # int64 or float: summed as is (no conversion pass)
            raw = _intra_inter_io(B, None if ranks is None else self.node_R[np.asarray(ranks)],
                                  c.gpus_per_node)
        io = [np.asarray(x, dtype=np.float64) for x in raw]
        bw = self._links["all_to_all"][0]
        intra = np.maximum(io[0], io[1]) / bw[0]
        inter = np.maximum(io[2], io[3]) / bw[1]
        return np.maximum(intra, inter), bool(inter.any())

    def send_recv(self, op: SendRecv) -> np.ndarray:
        """Per-rank seconds of a batch of point-to-point transfers: ``[R]`` (0 if idle)."""
        R = self.cluster.world_size
        src, dst = np.asarray(op.src_N, np.int64), np.asarray(op.dst_N, np.int64)
        nbytes = np.asarray(op.bytes_N, dtype=np.float64)
        cross = self.node_R[src] != self.node_R[dst]
        keep = src != dst
        io = [np.bincount(idx[keep & sel], nbytes[keep & sel], minlength=R)
              for idx, sel in ((src, ~cross), (dst, ~cross), (src, cross), (dst, cross))]
        bw = self._links["send_recv"][0]
        t = np.maximum(np.maximum(io[0], io[1]) / bw[0], np.maximum(io[2], io[3]) / bw[1])
        busy = np.bincount(np.concatenate([src[keep], dst[keep]]), minlength=R) > 0
        transfers = np.maximum(np.bincount(src[keep], minlength=R),
                               np.bincount(dst[keep], minlength=R))
        return np.where(busy, t + self._latency(np.bincount(np.concatenate(
            [src[keep & cross], dst[keep & cross]]), minlength=R) > 0, "send_recv", transfers),
            0.0)


def _intra_inter_io(B: np.ndarray, nodes_K: np.ndarray | None, gpus_per_node: int
                    ) -> tuple[np.ndarray, ...]:
    """``(intra_out, intra_in, inter_out, inter_in)`` bytes per member of ``B[K, K]``, self
    traffic excluded. ``nodes_K`` None: members are ranks ``0..K-1`` in order (block fast
    path)."""
    diag = np.diagonal(B)
    K = B.shape[0]
    out_all, in_all = B.sum(axis=1) - diag, B.sum(axis=0) - diag
    if nodes_K is None and K % gpus_per_node == 0:
        n, g = K // gpus_per_node, gpus_per_node
        B4 = B.reshape(n, g, n, g)  # diagonal blocks [a, :, a, :] are the intra-node pairs
        intra_out = np.einsum("aiaj->ai", B4).reshape(K) - diag
        intra_in = np.einsum("aiaj->aj", B4).reshape(K) - diag
    else:
        nodes = np.arange(K) // gpus_per_node if nodes_K is None else nodes_K
        same = nodes[:, None] == nodes[None, :]
        intra_out = (B * same).sum(axis=1) - diag
        intra_in = (B * same).sum(axis=0) - diag
    return intra_out, intra_in, out_all - intra_out, in_all - intra_in


def _block_io(B: object, ranks: np.ndarray | None, gpus_per_node: int
              ) -> tuple[np.ndarray, ...] | None:
    """:func:`~moesim.blockmatrix.block_io` of a :class:`BlockDiag` all-to-all among
    contiguous ranks (None otherwise: the caller uses the dense matrix)."""
    if not isinstance(B, BlockDiag):
        return None
    first = 0
    if ranks is not None:
        r = np.asarray(ranks)
        if len(r) and (r[-1] - r[0] != len(r) - 1 or np.any(np.diff(r) != 1)):
            return None
        first = int(r[0]) if len(r) else 0
    return block_io(B, gpus_per_node, first)
