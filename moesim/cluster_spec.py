"""The hardware and cluster descriptions: link levels and their per-collective figures
(:class:`LinkLevel`, :class:`CollectiveLink`), compute profiles (:class:`HardwareProfile`), and
:class:`Cluster` with its ``NAME@NODESxGPUS`` naming scheme.

Units are in the names (see :mod:`moesim.specs`); presets live in ``moesim/presets/clusters/``
and ``moesim/presets/hardware/``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.spec_checks import (
    check_integral,
    check_non_negative,
    check_positive,
    check_text,
)

COLLECTIVE_KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
                    "reduce", "send_recv")
#: Op classes of ``HardwareProfile.context_factors`` keys: compute, host work, each collective.
CONTEXT_CLASSES = ("compute", "host_compute", "host_copy", *COLLECTIVE_KINDS)


@dataclass(frozen=True, kw_only=True)
class CollectiveLink:
    """One collective kind's own bus bandwidth and latency on a link level (see
    :attr:`LinkLevel.per_kind`). ``latency_per_peer_s`` (optional) adds latency per member
    beyond the first: a group of ``n`` pays ``latency_s + (n − 1) · latency_per_peer_s``
    (gloo's ring steps on oversubscribed CPUs); for ``send_recv`` ``n`` is a rank's number of
    transfers (gloo pays per message)."""

    bw_GBps: float
    latency_s: float
    latency_per_peer_s: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "bw_GBps")
        check_non_negative(self, "latency_s", "latency_per_peer_s")


@dataclass(frozen=True, kw_only=True)
class LinkLevel:
    """One level of the interconnect, per GPU: bus bandwidth (nccl-tests' busbw) and latency.

    ``per_kind`` optionally overrides both for one collective kind (a name of
    :data:`COLLECTIVE_KINDS`): ``{"all_reduce": {"bw_GBps": 0.9, "latency_s": 1.4e-3}}``, in TOML
    ``[intra.per_kind.all_reduce]``; a missing field takes the level's value. Backends whose
    collectives differ a lot in fixed cost (gloo's all-reduce vs its all-to-all) need it; kinds
    not named use ``bw_GBps`` / ``latency_s``.
    """

    bw_GBps: float
    latency_s: float
    per_kind: dict[str, CollectiveLink] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_positive(self, "bw_GBps")
        check_non_negative(self, "latency_s")
        object.__setattr__(self, "per_kind", _per_kind(self.per_kind, self))

    def for_kind(self, kind: str) -> tuple[float, float]:
        """``(bw_GBps, latency_s)`` of collective ``kind`` on this level."""
        link = self.per_kind.get(kind)
        return (self.bw_GBps, self.latency_s) if link is None else (link.bw_GBps,
                                                                     link.latency_s)

    def latency_per_peer_s(self, kind: str) -> float:
        """Extra latency per group member beyond the first for ``kind`` (0 unless given)."""
        link = self.per_kind.get(kind)
        return 0.0 if link is None else link.latency_per_peer_s


def _per_kind(table: Any, level: LinkLevel) -> dict[str, CollectiveLink]:
    """Validate ``LinkLevel.per_kind``: known kind names; tables filled from the level."""
    if not isinstance(table, dict):
        raise MoesimError(f"LinkLevel.per_kind must be a table of collective kinds, got "
                          f"{table!r}")
    out = {}
    for kind, value in table.items():
        if kind not in COLLECTIVE_KINDS:
            raise MoesimError(f"LinkLevel.per_kind: unknown collective kind {kind!r}; choose "
                              f"from {', '.join(COLLECTIVE_KINDS)}")
        if isinstance(value, CollectiveLink):
            out[kind] = value
            continue
        if not isinstance(value, dict) or set(value) - {"bw_GBps", "latency_s",
                                                        "latency_per_peer_s"}:
            raise MoesimError(f"LinkLevel.per_kind.{kind} must be a table with bw_GBps, "
                              f"latency_s and/or latency_per_peer_s, got {value!r}")
        out[kind] = CollectiveLink(bw_GBps=value.get("bw_GBps", level.bw_GBps),
                                   latency_s=value.get("latency_s", level.latency_s),
                                   latency_per_peer_s=value.get("latency_per_peer_s", 0.0))
    return out


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Compute throughput of one GPU (or one CPU rank) and per-op overheads.

    A GEMM of ``m`` tokens against a weight of ``w`` bytes costs
    ``max(w / mem_bw, flops / (peak_flops · eff(m))) + launch_s``; ``eff(m)`` is linear in
    ``log2 m`` between the points of ``gemm_eff_curve`` (``[[m, eff], ...]``, clamped at both
    ends). Small-``m`` GEMMs are memory bound: the weight must be read whatever ``m`` is, so
    ``mem_bw_GBps`` is the *achievable* HBM read bandwidth (the presets give the datasheet figure
    next to it). ``host_optimizer_GBps`` is the CPU Adam throughput over optimizer bytes
    (SwiftMoE keeps optimizer state on the host). ``collective_latency_s`` is NCCL's fixed
    software overhead per collective (launch and protocol set-up), on top of the link latency.
    ``cores_shared_by`` > 1 says several ranks share one socket's cores (CPU executor runs), so
    concurrent compute slows down by that factor. ``backward_gemm_eff_curve`` (optional, same
    form) is ``eff(m)`` of expert backward passes (dgrad + wgrad, ``gemm_passes = 2``) where it
    differs from the forward's (measured on CPU: backward is 2.4–4× a forward, not 2×); empty
    means the forward curve serves both. ``dense_gemm_eff_curve`` (optional) likewise prices
    GEMM-shaped work outside the experts (attention, router: ``Compute`` ops with
    ``gemm_rows``), e.g. the CPU executor's stand-in for attention; empty means the forward
    curve. ``op_overhead_s`` is host time a rank spends per op
    outside the op itself (the CPU executor's interpreter loop between ops, ~10 µs); it is
    added to every op's duration. 0 for GPUs, whose per-kernel cost is ``launch_s``.
    ``context_factors`` (optional, ``{key: factor}``) multiplies the duration of ops by how
    much longer (or shorter) they ran inside a training step than the microbenchmarks that
    fitted the rest of the profile; ``key`` is ``class``, ``class.phase`` or
    ``class.phase.direction`` with ``class`` one of :data:`CONTEXT_CLASSES` (the most specific
    key present wins; see :func:`moesim.costmodel.context_factor`). ``moesim calibrate``
    measures them in a short run of its own calibration workload; empty means 1.
    ``attention_block_eff`` (optional, ``{pass: [[m, eff], ...]}`` with pass ``fwd``, ``bwd``
    or ``recompute``) prices the attention ops a parallel layout lowers as the real attention
    block (``Compute.block == "attention"``: LayerNorm, QKV, scores, softmax, values, output
    projection, at the TP shard the layout gives a rank): ``eff(m)`` of that pass at
    ``gemm_rows = m`` against the op's own FLOPs; ``moesim calibrate`` measures it on the
    executor's block (:mod:`moesim.executor.calibrate_block`). A pass it lacks falls back to
    ``dense_gemm_eff_curve``.
    """

    name: str
    peak_flops: float
    mem_bw_GBps: float
    launch_s: float = 5e-6
    gemm_eff_curve: tuple[tuple[float, float], ...] = ((1.0, 0.01), (128.0, 0.3),
                                                       (2048.0, 0.72), (16384.0, 0.76))
    elementwise_eff: float = 0.8
    host_optimizer_GBps: float = 10.0
    collective_latency_s: float = 10e-6
    cores_shared_by: float = 1.0
    backward_gemm_eff_curve: tuple[tuple[float, float], ...] = ()
    dense_gemm_eff_curve: tuple[tuple[float, float], ...] = ()
    op_overhead_s: float = 0.0
    context_factors: dict[str, float] = field(default_factory=dict, hash=False)
    attention_block_eff: dict[str, tuple[tuple[float, float], ...]] = field(
        default_factory=dict, hash=False)
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        check_text(self, "name", "description", "source")
        object.__setattr__(self, "context_factors", _context_factors(self.context_factors))
        check_positive(self, "peak_flops", "mem_bw_GBps", "host_optimizer_GBps", "elementwise_eff",
                  "cores_shared_by")
        check_non_negative(self, "launch_s", "collective_latency_s", "op_overhead_s")
        if self.elementwise_eff > 1:
            raise MoesimError(f"HardwareProfile.elementwise_eff must be in (0, 1], got "
                              f"{self.elementwise_eff!r}")
        object.__setattr__(self, "gemm_eff_curve", _eff_curve(self.gemm_eff_curve))
        for name in ("backward_gemm_eff_curve", "dense_gemm_eff_curve"):
            curve = getattr(self, name)
            object.__setattr__(self, name, _eff_curve(curve) if len(curve) else ())
        object.__setattr__(self, "attention_block_eff",
                           _block_curves(self.attention_block_eff))

    def gemm_efficiency(self, m: np.ndarray | float) -> np.ndarray:
        """Fraction of peak FLOP/s a GEMM with ``m`` rows reaches (vectorised)."""
        ms = np.log2(np.array([p[0] for p in self.gemm_eff_curve]))
        es = np.array([p[1] for p in self.gemm_eff_curve])
        return np.interp(np.log2(np.maximum(np.asarray(m, dtype=float), 1.0)), ms, es)

    def gemm_time_s(self, m: np.ndarray | float, n: int, k: int,
                    bytes_per_element: float = 2.0) -> np.ndarray:
        """Seconds for an ``[m, k] @ [k, n]`` GEMM by the class docstring's formula (vectorised
        over ``m``): the weight read or the FLOPs at ``eff(m)``, whichever is longer, + launch."""
        m = np.asarray(m, dtype=float)
        read_s = n * k * bytes_per_element / (self.mem_bw_GBps * 1e9)
        flops_s = 2.0 * m * n * k / (self.peak_flops * self.gemm_efficiency(m))
        return np.maximum(read_s, flops_s) + self.launch_s


def _context_factors(table: Any) -> dict[str, float]:
    """Validate ``HardwareProfile.context_factors``: keys ``class[.phase[.direction]]``,
    factors positive and finite."""
    from moesim.ops import DIRECTIONS, PHASES

    if not isinstance(table, dict):
        raise MoesimError(f"HardwareProfile.context_factors must be a table of factors, got "
                          f"{table!r}")
    out = {}
    for key, value in table.items():
        parts = str(key).split(".")
        if (len(parts) > 3 or parts[0] not in CONTEXT_CLASSES
                or (len(parts) > 1 and parts[1] not in PHASES)
                or (len(parts) > 2 and parts[2] not in DIRECTIONS)):
            raise MoesimError(
                f"HardwareProfile.context_factors: bad key {key!r}; use class[.phase"
                f"[.direction]] with class in {', '.join(CONTEXT_CLASSES)}, phase in "
                f"{', '.join(PHASES)} and direction in {', '.join(DIRECTIONS)}")
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and value > 0)):
            raise MoesimError(f"HardwareProfile.context_factors.{key} must be a positive "
                              f"number, got {value!r}")
        out[str(key)] = float(value)
    return out


BLOCK_PASSES = ("fwd", "bwd", "recompute")


def _block_curves(table: Any) -> dict[str, tuple[tuple[float, float], ...]]:
    """Validate ``HardwareProfile.attention_block_eff``: ``{pass: curve}``, pass in
    :data:`BLOCK_PASSES`, each curve as ``gemm_eff_curve``."""
    if not isinstance(table, dict) or any(k not in BLOCK_PASSES for k in table):
        raise MoesimError(f"HardwareProfile.attention_block_eff must be a table with keys in "
                          f"{', '.join(BLOCK_PASSES)} of [[m, eff], ...] curves, got {table!r}")
    return {k: _eff_curve(v) for k, v in table.items()}


def _eff_curve(points: Any) -> tuple[tuple[float, float], ...]:
    """Validate ``gemm_eff_curve``: ``[[m, eff], ...]``, m > 0 increasing, 0 < eff <= 1."""
    bad = MoesimError("HardwareProfile.gemm_eff_curve needs a list of [m, eff] pairs with m > 0 "
                      f"strictly increasing and 0 < eff <= 1, got {points!r}")
    try:
        curve = tuple((float(m), float(e)) for m, e in points)
    except (TypeError, ValueError):
        raise bad from None
    if not curve or any(not (math.isfinite(m) and m > 0 and 0 < e <= 1) for m, e in curve):
        raise bad
    if any(b[0] <= a[0] for a, b in zip(curve[:-1], curve[1:], strict=True)):
        raise bad
    return curve


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs in ``num_nodes × gpus_per_node``; intra-node, inter-node (per-GPU NIC) and host links.

    Rank ``r`` lives on node ``r // gpus_per_node``. ``inter.bw_GBps`` is what one GPU's NIC
    moves (e.g. 400G InfiniBand ≈ 46–49 GB/s measured by nccl-tests); where several GPUs share
    one NIC it is their share of it. ``host`` is one GPU's host link (PCIe), per direction.
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    intra: LinkLevel
    inter: LinkLevel
    host: LinkLevel
    gpu_memory_GiB: float
    host_memory_GiB: float = 1024.0
    hardware: HardwareProfile
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        check_text(self, "name", "description", "source")
        check_positive(self, "num_nodes", "gpus_per_node", "gpu_memory_GiB", "host_memory_GiB")
        check_integral(self, "num_nodes", "gpus_per_node")
        for level in ("intra", "inter", "host"):
            if not isinstance(getattr(self, level), LinkLevel):
                raise MoesimError(f"Cluster.{level} must be a table with bw_GBps and latency_s, "
                                  f"got {getattr(self, level)!r}")
        if not isinstance(self.hardware, HardwareProfile):
            raise MoesimError("Cluster.hardware must name a hardware preset, a path to one, or "
                              f"be a table; got {self.hardware!r}")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, ranks: np.ndarray | int) -> np.ndarray:
        return np.asarray(ranks) // self.gpus_per_node

    @property
    def gpu_memory_bytes(self) -> float:
        return self.gpu_memory_GiB * 2**30

    def replace(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)

    def with_shape(self, num_nodes: int, gpus_per_node: int | None = None) -> Cluster:
        """The same hardware with another node count (for scaling curves), named
        ``BASE@NODESxGPUS`` — a name :func:`load_cluster` reads back."""
        gpn = self.gpus_per_node if gpus_per_node is None else gpus_per_node
        base, _ = split_cluster_shape(self.name)
        return dataclasses.replace(self, name=f"{base}@{num_nodes}x{gpn}",
                                   num_nodes=num_nodes, gpus_per_node=gpn)


def split_cluster_shape(text: str) -> tuple[str, tuple[int, int | None] | None]:
    """``"NAME@NODES"`` → ``("NAME", (NODES, None))``, ``"NAME@NODESxGPUS"`` →
    ``("NAME", (NODES, GPUS))``, ``"NAME"`` → ``("NAME", None)``. The one naming scheme of
    reshaped clusters: what :meth:`Cluster.with_shape` writes, search rows and summaries show,
    and every command's ``--cluster`` takes."""
    base, sep, shape = str(text).rpartition("@")
    if not sep:
        return str(text), None
    nodes, x, gpus = shape.partition("x")
    if not (nodes.isdigit() and (not x or gpus.isdigit())):
        raise MoesimError(f"cluster {text!r}: write NAME@NODES or NAME@NODESxGPUS, e.g. "
                          "a100-4x8-ib800@2 or a100-4x8-ib800@2x8")
    shape_ng = (int(nodes), int(gpus) if x else None)
    if shape_ng[0] < 1 or (shape_ng[1] is not None and shape_ng[1] < 1):
        raise MoesimError(f"cluster {text!r}: nodes and GPUs per node must be >= 1")
    return base, shape_ng
