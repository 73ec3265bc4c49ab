"""Workloads that isolate one effect each (Megatron-LM PR 7488's W0–W7), sampled token by token.

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks, ``E`` experts, ``N`` tokens of
the whole world in one pass (``num_ranks · tokens_per_rank``), ``K`` the most experts a token
picks.

Every pass's tokens are one *logical* stream of ``N`` tokens that depends only on
``(workload, seed, step)`` (and the layer and micro-batch): the per-token generator is
``default_rng([seed, workload id, pass, layer])`` and no rank count enters it. Ranks then take
contiguous slices of the stream, so the same logical workload is reproduced at every EP / ETP
layout (4 ranks × 512 tokens and 8 × 256 give the same tokens and the same experts).

Each token draws router scores ``s_e = log w_e + g_e`` (``g`` standard Gumbel, ``w`` the
workload's expert weights for that step and layer) and picks the ``top_k`` highest: exactly
``top_k`` distinct experts, a sample without replacement proportional to ``w`` (the Gumbel
top-k trick). Zero-weight experts are never picked. The workloads (``h = hot_fraction · E``
hot experts holding ``hot_share`` of the sampling weight):

- ``balanced`` — the control: token ``j`` of a pass takes experts ``(o + j·k + i) mod E``
  (``i < k``, ``o`` a seeded offset per pass and layer), so every expert gets the same count
  whenever ``N·k`` divides by ``E`` (with routing options: uniform weights instead);
- ``hot_expert_set`` — per-expert heat: ``h`` hot experts at random ids (per layer, fixed
  over steps);
- ``hot_rank`` — per-rank placement at the same heat: the hot experts are the contiguous ids
  ``0..h-1``, which contiguous expert parallelism puts on the first rank(s);
- ``spread_hot_experts`` — the same heat spread over the layout: hot ids ``⌊i·E/h⌋``;
- ``source_ragged`` — pre-dispatch skew: experts uniform, but rank ``r`` sends the tokens of
  the stream between ``N·F(r/R)`` and ``N·F((r+1)/R)`` with ``F(x) = x + a(x² − x)``
  (``a = ragged``: the last rank sends ``(1 + a)/(1 − a)`` times the first one's tokens at
  large ``R``); the trace is variable-k, ``tokens_per_rank`` the most any rank sends;
- ``zero_expert_rank`` — zero-load experts and ranks: the last ``zero_fraction · E`` experts
  (a contiguous block, so whole ranks under contiguous EP) get weight 0;
- ``rotating_hotspot`` — step-to-step plan staleness: a hot block of ``h`` contiguous experts
  starting at ``(step · h) mod E``;
- ``burst`` — a re-plan hidden in steady-state numbers: balanced weights, except every
  ``burst_period``-th step (steps ``p−1, 2p−1, …``) when ``h`` random experts hold
  ``burst_share``.

Routing options (:mod:`moesim.traces.routing_limits`): group-limited routing (DeepSeek-V2/V3:
the ``topk_groups`` best of ``expert_groups`` contiguous groups, then top-k within them),
node-limited routing (DeepSeek-V3: at most ``node_limit`` of ``route_nodes`` nodes; the same
rule with groups = nodes) and variable top-k (``top_p``: a token takes experts in score order
until their cumulative router probability reaches ``top_p``, between ``min_k`` and ``top_k``;
"Harder Tasks Need More Experts").

Cost: ``N · E`` scores per pass and layer (per-token sampling, not count-level); per-token
choices are stored (``topk_TLRNK``) when ``store_topk`` or when they fit
:data:`AUTO_TOPK_IDS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.routing_limits import RoutingOptions, choose_experts
from moesim.traces.validate import validate

WORKLOADS = ("balanced", "hot_expert_set", "hot_rank", "spread_hot_experts", "source_ragged",
             "zero_expert_rank", "rotating_hotspot", "burst")
AUTO_TOPK_IDS = 8_000_000  # store per-token choices automatically up to this many ids


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """Knobs of :func:`synthesize_workload` (see the module docstring)."""

    workload: str = "balanced"
    num_layers: int = 4
    num_ranks: int = 8
    num_experts: int = 32
    top_k: int = 2
    tokens_per_rank: int = 512
    micro_batches_per_iteration: int = 2
    num_iterations: int = 8
    hot_fraction: float = 0.125
    hot_share: float = 0.5
    ragged: float = 0.6
    zero_fraction: float = 0.25
    burst_period: int = 4
    burst_share: float = 0.9
    routing: RoutingOptions = dataclasses.field(default_factory=RoutingOptions)
    store_topk: bool | None = None

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload {self.workload!r} is unknown; choose one of "
                             f"{', '.join(WORKLOADS)}")
        for name in ("num_layers", "num_ranks", "num_experts", "top_k", "tokens_per_rank",
                     "micro_batches_per_iteration", "num_iterations", "burst_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        for name in ("hot_fraction", "hot_share", "burst_share", "zero_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1) (got {getattr(self, name)})")
        if not 0 <= self.ragged < 1:
            raise ValueError(f"ragged must lie in [0, 1) (got {self.ragged})")
        if self.workload == "zero_expert_rank" and self.num_experts - self.zero_experts < \
                self.top_k:
            raise ValueError(f"zero_fraction {self.zero_fraction} leaves fewer than top_k "
                             f"{self.top_k} experts; lower zero_fraction")
        self.routing.check(self.num_experts, self.top_k)

    @property
    def hot_experts(self) -> int:
        return max(1, min(self.num_experts - 1, round(self.hot_fraction * self.num_experts)))

    @property
    def zero_experts(self) -> int:
        return max(1, round(self.zero_fraction * self.num_experts))

    @property
    def tokens_per_pass(self) -> int:
        """``N``: the logical stream's tokens per pass (independent of the layout)."""
        return self.num_ranks * self.tokens_per_rank


def _hot_weights(E: int, hot: np.ndarray, share: float) -> np.ndarray:
    """Weights with the ``hot`` ids holding ``share`` of the total."""
    h = len(hot)
    w = np.ones(E)
    w[hot] = share * (E - h) / (h * (1 - share))
    return w


def expert_weights_E(config: WorkloadConfig, seed: int, step: int, layer: int
                     ) -> np.ndarray | None:
    """The workload's sampling weights of one (step, layer); ``None`` for the exact
    round-robin control (``balanced`` without routing options)."""
    c, E, h = config, config.num_experts, config.hot_experts
    wid = WORKLOADS.index(c.workload)
    if c.workload == "balanced":
        return None if c.routing.is_plain else np.ones(E)
    if c.workload in ("source_ragged",):
        return np.ones(E)
    if c.workload == "hot_expert_set":
        hot = np.random.default_rng([seed, wid, layer]).choice(E, h, replace=False)
        return _hot_weights(E, hot, c.hot_share)
    if c.workload == "hot_rank":
        return _hot_weights(E, np.arange(h), c.hot_share)
    if c.workload == "spread_hot_experts":
        return _hot_weights(E, (np.arange(h) * E) // h, c.hot_share)
    if c.workload == "zero_expert_rank":
        w = np.ones(E)
        w[E - c.zero_experts:] = 0.0
        return w
    if c.workload == "rotating_hotspot":
        return _hot_weights(E, (step * h + np.arange(h)) % E, c.hot_share)
    assert c.workload == "burst"
    if step % c.burst_period != c.burst_period - 1:
        return np.ones(E)
    hot = np.random.default_rng([seed, wid, step, layer]).choice(E, h, replace=False)
    return _hot_weights(E, hot, c.burst_share)


def _round_robin_NK(N: int, E: int, k: int, offset: int) -> np.ndarray:
    return ((offset + np.arange(N)[:, None] * k + np.arange(k)[None, :]) % E).astype(np.int32)


def pass_choices_NK(config: WorkloadConfig, seed: int, t: int, layer: int) -> np.ndarray:
    """The logical stream's expert ids ``[N, K]`` of pass ``t`` and ``layer`` (``-1`` pads
    variable-k tokens)."""
    step = t // config.micro_batches_per_iteration
    rng = np.random.default_rng([seed, WORKLOADS.index(config.workload), t, layer])
    N, E, k = config.tokens_per_pass, config.num_experts, config.top_k
    w = expert_weights_E(config, seed, step, layer)
    if w is None:
        return _round_robin_NK(N, E, k, int(rng.integers(E)))
    with np.errstate(divide="ignore"):
        scores = np.log(w)[None, :] + rng.gumbel(size=(N, E))
    return choose_experts(scores, k, config.routing)


def rank_bounds(config: WorkloadConfig) -> np.ndarray:
    """Where each rank's slice of the stream starts and ends, ``[R + 1]``."""
    R, N = config.num_ranks, config.tokens_per_pass
    x = np.arange(R + 1) / R
    a = config.ragged if config.workload == "source_ragged" else 0.0
    return np.round(N * (x + a * (x * x - x))).astype(np.int64)


def synthesize_workload(config: WorkloadConfig, seed: int = 0) -> RoutingTrace:
    """A validated :class:`RoutingTrace` of ``config.workload`` (module docstring)."""
    c = config
    T, L, R, E, K = (c.num_iterations * c.micro_batches_per_iteration, c.num_layers,
                     c.num_ranks, c.num_experts, c.top_k)
    bounds = rank_bounds(c)
    n_R = np.diff(bounds)
    N_max = int(n_R.max())
    store = c.store_topk if c.store_topk is not None else T * L * R * N_max * K <= AUTO_TOPK_IDS
    counts = np.zeros((T, L, R, E), dtype=np.int64)
    topk = np.full((T, L, R, N_max, K), -1, dtype=np.int32) if store else None
    for t in range(T):
        for layer in range(L):
            ids_NK = pass_choices_NK(c, seed, t, layer)
            src_N = np.repeat(np.arange(R), n_R)
            keep = ids_NK >= 0
            np.add.at(counts[t, layer], (np.broadcast_to(src_N[:, None], ids_NK.shape)[keep],
                                         ids_NK[keep]), 1)
            if topk is not None:
                for r in range(R):
                    topk[t, layer, r, :n_R[r]] = ids_NK[bounds[r]:bounds[r + 1]]
    variable = c.workload == "source_ragged" or c.routing.top_p > 0
    meta = TraceMeta(num_layers=L, num_ranks=R, num_experts=E, top_k=K, tokens_per_rank=N_max,
                     micro_batches_per_iteration=c.micro_batches_per_iteration,
                     variable_k=variable, model="synthetic",
                     source=f"moesim workload {c.workload} (seed {seed})",
                     extra={"workload": dict(dataclasses.asdict(c), seed=seed)})
    trace = RoutingTrace(counts, meta, topk)
    validate(trace)
    return trace
