"""The op IR: an SPMD program of typed ops that both backends execute.

One op is one step that a set of ranks takes together (SPMD): per-rank quantities are arrays over
ranks, so the simulator can cost and schedule all ranks at once and the executor can look up its
own rank's share. Shape legend: ``R`` ranks in the program (world size), ``G`` groups of one
collective op, ``S`` local slots on a rank, ``N`` point-to-point transfers.

Semantics shared by both backends:

- Program order is a valid execution order. On each rank, each ``stream`` is FIFO: an op starts
  after the previous op on the same stream of the same rank ends (CUDA-stream semantics).
- ``deps`` lists indices of earlier ops this op waits for, per rank (rank ``r``'s instance waits
  for rank ``r``'s instances). Ops on different streams overlap unless a dep joins them.
- A collective's group starts when all of its members have arrived and ends for all members at
  once, so a late rank delays the group (stragglers). Groups of one op run independently.
- Ranks not named by an op skip it (compute ops: ``ranks``; collectives: members of ``groups``).
  A rank that skips an op passes its deps through: a later op depending on it waits, on that
  rank, only for what the skipped op depended on.

Phases have one name everywhere (lowering, cost model, executor timers, RunResult, figures):
``PHASES``. ``direction`` is ``fwd``, ``bwd`` or ``step`` (once-per-iteration work).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PHASES = (
    "route",         # gate / router compute
    "dispatch",      # token all-to-all to expert slots
    "expert",        # expert FFN compute
    "combine",       # token all-to-all back
    "dense",         # attention + dense (non-MoE) compute of the layer
    "param_gather",  # materialising expert weights (FSEP gathers, Hecate SparseAllGather)
    "grad_sync",     # expert / dense gradient all-reduce, reduce-scatter, sparse reduces
    "optimizer",     # optimizer step (GPU or host)
    "relayout",      # moving weights (and optimizer state) to a new placement
    "pp_send",       # activations / gradients sent between pipeline stages
)
DIRECTIONS = ("fwd", "bwd", "step")
STREAMS = ("compute", "comm", "prefetch", "host", "p2p", "p2p_odd", "p2p_wrap")


@dataclass(frozen=True, kw_only=True)
class Op:
    """Fields every op has. ``layer`` is -1 for per-iteration ops; ``micro_batch`` -1 likewise."""

    phase: str
    direction: str = "fwd"
    stream: str = "compute"
    layer: int = -1
    micro_batch: int = -1
    deps: tuple[int, ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        assert self.phase in PHASES, self.phase
        assert self.direction in DIRECTIONS, self.direction
        assert self.stream in STREAMS, self.stream


@dataclass(frozen=True, kw_only=True)
class Compute(Op):
    """GPU work per rank: ``flops_R`` and ``bytes_R`` (memory traffic).

    ``gemm_tokens_RS`` (optional) gives the rows of each local expert GEMM (slot ``s`` of rank
    ``r``); the cost model then applies the GEMM efficiency curve per slot, with ``gemm_passes``
    weight reads per slot (1 forward, 2 backward: dgrad + wgrad), and the executor runs those
    FFNs. ``kind`` says what the work is: ``expert_ffn``, ``attention``, ``router``, ``other``.
    ``ranks`` (optional) restricts the op to some ranks; others skip it. Per-rank arrays
    (``flops_R``, ``bytes_R``, ``gemm_tokens_RS``) have either one row per world rank
    (indexed by world rank) or one row per member of ``ranks`` (indexed by position in
    ``ranks``: a pipeline stage's ops, :meth:`moesim.stage_context.StageView._translate`);
    their length says which.

    Cost-model facts (added; optional): ``weight_bytes`` is one slot's expert weight (bytes read
    per GEMM pass) and ``flops_per_token`` one token's forward FLOPs through one expert, both for
    ``gemm_tokens_RS`` ops; ``gemm_rows`` is the row count ``m`` of a non-expert op's GEMMs
    (tokens per rank), which picks its efficiency on the GEMM curve (0: elementwise).
    ``block`` names the block a non-expert op is (``"attention"``: the whole attention block,
    LayerNorm to output projection, as a parallel layout lowers it); a profile with measured
    coefficients for that block prices it with them (``HardwareProfile.attention_block_eff``);
    empty: priced from its FLOPs alone.
    """

    flops_R: np.ndarray
    bytes_R: np.ndarray
    kind: str = "other"
    gemm_tokens_RS: np.ndarray | None = None
    gemm_passes: int = 1
    ranks: np.ndarray | None = None
    weight_bytes: float = 0.0
    flops_per_token: float = 0.0
    gemm_rows: int = 0
    block: str = ""


@dataclass(frozen=True, kw_only=True)
class HostCompute(Op):
    """CPU work per rank, e.g. a CPU Adam step over ``bytes_R`` of optimizer state."""

    bytes_R: np.ndarray
    stream: str = "host"
    ranks: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class HostCopy(Op):
    """A PCIe copy per rank between GPU and host memory (``cluster.host`` link): ``bytes_R``
    moves device→host when ``to_host`` else host→device (SwiftMoE's offloaded optimizer pulls
    gradients down and pushes updated weights up)."""

    bytes_R: np.ndarray
    to_host: bool = True
    stream: str = "host"
    ranks: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class AllToAll(Op):
    """All-to-all among ``ranks`` (default: all): ``bytes_RR[i, j]`` moves from rank i to j.

    ``bytes_RR`` is indexed by position in ``ranks``. Intra-node pairs use the intra-node link,
    inter-node pairs the sender's and receiver's NICs; the op ends when its slowest rank does.
    ``reduce`` marks an all-to-all whose receivers sum what arrives (LAER's gradient reduce).
    """

    bytes_RR: np.ndarray
    stream: str = "comm"
    ranks: np.ndarray | None = None
    reduce: bool = False


@dataclass(frozen=True, kw_only=True)
class GroupCollective(Op):
    """A collective run by several disjoint groups at once.

    ``groups`` is a tuple of int arrays (ragged: groups may differ in size). ``bytes_G[g]`` is the
    collective's size in nccl-tests' convention: the full buffer for all-reduce / broadcast /
    reduce, the gathered output for all-gather, the input for reduce-scatter. ``roots_G`` names
    the root rank of each group for broadcast / reduce. ``experts_G[g]`` (optional) names the
    logical expert (of ``layer``) whose parameters / gradients group g moves, ``-1`` for dense
    parameters; the executor uses it to move the real tensors, the simulator ignores it.
    """

    groups: tuple[np.ndarray, ...]
    bytes_G: np.ndarray
    stream: str = "comm"
    experts_G: np.ndarray | None = None

    @property
    def group_sizes(self) -> np.ndarray:
        return np.array([len(g) for g in self.groups], dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class AllReduce(GroupCollective):
    """Sum across each group; bus-bandwidth factor 2(n−1)/n."""


@dataclass(frozen=True, kw_only=True)
class AllGather(GroupCollective):
    """Each member contributes 1/n of ``bytes_G``; factor (n−1)/n."""


@dataclass(frozen=True, kw_only=True)
class ReduceScatter(GroupCollective):
    """Reduce then scatter 1/n of ``bytes_G`` to each member; factor (n−1)/n."""


@dataclass(frozen=True, kw_only=True)
class Broadcast(GroupCollective):
    """``roots_G[g]`` sends ``bytes_G[g]`` to every member of group g (Hecate's SparseAllGather
    is a set of these)."""

    roots_G: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True, kw_only=True)
class Reduce(GroupCollective):
    """Sum group g's buffers onto ``roots_G[g]`` (Hecate's SparseReduceScatter)."""

    roots_G: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True, kw_only=True)
class SendRecv(Op):
    """A batch of point-to-point transfers ``src_N[n] → dst_N[n]`` of ``bytes_N[n]``.

    Every rank that sends or receives takes part; each ends when its own transfers are done,
    limited by its link (intra- or inter-node) in each direction. SwiftMoE's weight placement and
    FlexMoE's migrations are sets of these.
    """

    src_N: np.ndarray
    dst_N: np.ndarray
    bytes_N: np.ndarray
    stream: str = "comm"
    experts_N: np.ndarray | None = None


@dataclass
class LayerRoute:
    """What the executor needs to force one layer-pass's routing: ``kept_RP`` tokens from each
    source rank to each physical slot after capacity, ``dropped_R`` per source, and the slot map.
    """

    kept_RP: np.ndarray
    dropped_R: np.ndarray
    phy2log_P: np.ndarray
    slots_per_rank: int
    #: stage rank of each position (rows, and slot blocks of ``slots_per_rank``); None: the
    #: identity. Under expert TP the positions are in expert order (:mod:`moesim.expert_tp`).
    ranks_R: np.ndarray | None = None


@dataclass
class Program:
    """One iteration's ops for ``num_ranks`` ranks, plus routing and memory facts.

    ``routes[(micro_batch, layer)]`` are the forced routings; ``memory_bytes`` is a breakdown
    (name → per-rank bytes array, e.g. ``weights``, ``grads``, ``optimizer``, ``buffers``,
    ``activations``) of peak memory.
    """

    num_ranks: int
    ops: list[Op] = field(default_factory=list)
    routes: dict[tuple[int, int], LayerRoute] = field(default_factory=dict)
    memory_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    host_memory_bytes: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, op: Op) -> int:
        """Append ``op``; returns its index, for later ops' ``deps``."""
        for d in op.deps:
            assert 0 <= d < len(self.ops), f"dep {d} is not an earlier op"
        self.ops.append(op)
        return len(self.ops) - 1
