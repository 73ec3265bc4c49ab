"""Synthetic routing traces with the statistics of real ones.

Shape legend: ``I`` iterations, ``T`` passes (= I × M micro-batches), ``L`` layers, ``R`` ranks,
``E`` experts, ``N`` tokens per rank per pass, ``k`` top-k.

Generative model, per layer (layers are independent: the same expert index means nothing across
layers, and each layer gets its own permutation of popularity):

1. **Popularity** — base log-popularity ``base_E``: log-normal (``N(0, σ²)``) or Zipf
   (``-a·log(1 + rank)``), randomly permuted; σ varies per layer by ``exp(N(0, spread²))``.
2. **Training dynamics** — per iteration, log-popularity ``= s(i) · (base + d_i)``:
   ``d_i`` is an AR(1) drift (coefficient ρ per trace iteration, stationary sd ``drift_sigma``);
   ``s(i)`` grows from ``skew_start`` (near balanced) to 1 with time constant
   ``skew_timescale`` training iterations, optionally overshooting by ``skew_overshoot`` and
   relaxing over ``skew_relax`` iterations (SmartMoE's trace: max/mean ≈1.5 at iteration 1,
   ≈16 by iteration 20, ≈9 by iteration 300). Rare regime shifts redraw ``base``.
3. **Documents** — tokens come in documents of ``doc_tokens`` tokens that share a topic; a
   document tilts log-popularity by ``N(0, doc_sigma²)`` per expert, so a rank holding
   ``N / doc_tokens`` documents sees a tilt of variance ``doc_sigma² · doc_tokens / N``. This is
   the batch-to-batch burstiness beyond multinomial noise (consecutive TV 0.06–0.08 where
   i.i.d. sampling gives 0.01). Rare experts are more topical than popular ones (tilt sd scaled
   by ``(E·share)^-doc_focus``, clipped to ×[1/4, 4]); uniform relative noise cannot give both a
   consecutive-pass correlation of 0.985–0.99 and TV 0.06–0.08. A persistent per-rank tilt
   ``rank_sigma`` models ranks whose data differ.
4. **Top-k without replacement** — each token picks ``k`` distinct experts, so an expert gets at
   most ``N`` of a rank's ``N·k`` assignments: shares are capped at ``1/k`` by water-filling.
   Counts are drawn at the count level, not per token (which would cost T·L·R·N·E draws): the
   document tilt and the sampling noise (per token, expert ``e`` is picked with probability
   ``π = λ/N``: variance ``λ(1 − π)``) form one mean-preserving log-normal factor per cell, and
   systematic rounding turns the capped shares into integers that sum to exactly ``N·k``.
   For small traces ``per_token=True`` samples every token instead (Gumbel top-k = sampling
   without replacement) and stores ``topk_TLRNK``.

Reference statistics (shared/TRACE_FORMATS.md, shared/POLICIES.md "Real traces"): max/mean
2.6–13.7, consecutive-pass TV 0.06–0.08 at ~100K tokens per pass, consecutive correlation
0.985–0.99, rank correlation ≈0.8 at ~8K tokens per rank. Measured with the defaults at
E=256, top-8, 16 ranks × 6144 tokens (≈100K tokens per pass): max/mean ≈8.2, TV ≈0.064,
consecutive correlation ≈0.986, rank correlation ≈0.84 (tests/traces/test_trace_synth.py).
:meth:`SynthConfig.smartmoe_like` instead matches the SmartMoE-AE training trace
(thu-pacman/SmartMoE-AE ``moe_trace``): near-i.i.d. micro-batches, fast skew growth, drift.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from moesim import bounds
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.validate import validate

POPULARITY_KINDS = ("lognormal", "zipf")
PER_TOKEN_MAX_CELLS = 50_000_000  # passes x ranks x tokens x experts per layer, per_token mode


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Knobs of :func:`synthesize` (shape, popularity, dynamics, burstiness); see the module."""

    num_layers: int = 24
    num_ranks: int = 16
    num_experts: int = 32
    top_k: int = 2
    tokens_per_rank: int = 2048
    micro_batches_per_iteration: int = 4
    num_iterations: int = 20
    iteration_stride: int = 1
    first_iteration: int = 1
    popularity: str = "lognormal"
    popularity_sigma: float = 1.0        # σ of log-popularity at full skew (lognormal)
    popularity_sigma_spread: float = 0.15  # per-layer σ multiplier exp(N(0, spread²))
    zipf_exponent: float = 1.0
    skew_start: float = 0.1              # fraction of full skew at first_iteration
    skew_timescale: float = 20.0         # training iterations for the skew to grow (1/e)
    skew_overshoot: float = 0.0          # extra skew early on, relaxing over skew_relax
    skew_relax: float = 200.0
    drift_rho: float = 0.95              # AR(1) coefficient per trace iteration
    drift_sigma: float = 0.2             # stationary sd of the log-popularity drift
    regime_shift_prob: float = 0.002     # per layer per iteration: popularity redrawn
    doc_tokens: int = 512
    doc_sigma: float = 1.35              # per-expert log tilt of one document
    doc_focus: float = 0.8               # rarer experts are more topical: sd ∝ share^-focus
    rank_sigma: float = 0.1              # persistent per-rank log tilt
    per_token: bool = False              # sample each token; stores topk_TLRNK (small traces)
    model: str = "synthetic"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_ranks", "num_experts", "top_k", "tokens_per_rank",
                     "micro_batches_per_iteration", "num_iterations", "iteration_stride",
                     "doc_tokens"):
            _require(self, name, getattr(self, name) >= 1, "must be >= 1")
        _require(self, "top_k", self.top_k <= self.num_experts, "must be <= num_experts")
        _require(self, "popularity", self.popularity in POPULARITY_KINDS,
                 f"must be one of {', '.join(POPULARITY_KINDS)}")
        for name in ("popularity_sigma", "popularity_sigma_spread", "zipf_exponent",
                     "skew_overshoot", "drift_sigma", "doc_sigma", "doc_focus", "rank_sigma"):
            _require(self, name, getattr(self, name) >= 0, "must be >= 0")
        _require(self, "skew_start", 0 <= self.skew_start <= 1, "must be in [0, 1]")
        for name in ("skew_timescale", "skew_relax"):
            _require(self, name, getattr(self, name) > 0, "must be > 0")
        _require(self, "drift_rho", 0 <= self.drift_rho <= 1, "must be in [0, 1]")
        _require(self, "regime_shift_prob", 0 <= self.regime_shift_prob <= 1,
                 "must be in [0, 1]")
        cells = self.num_passes * self.num_ranks * self.tokens_per_rank * self.num_experts
        _require(self, "per_token", not self.per_token or cells <= PER_TOKEN_MAX_CELLS,
                 f"needs {cells:.2e} random draws per layer (limit {PER_TOKEN_MAX_CELLS:.0e}); "
                 "use the count-level sampler (per_token=False) for traces this large")

    @property
    def num_passes(self) -> int:
        return self.num_iterations * self.micro_batches_per_iteration

    def replace(self, **changes) -> SynthConfig:
        """A copy with some knobs changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def smartmoe_like(cls, **changes) -> SynthConfig:
        """Knobs fitted to the SmartMoE-AE training trace (GPT-MoE, 16 ranks, 32 experts, top-2).

        Little document burstiness (micro-batches of one iteration are nearly i.i.d.), strong
        skew reached within ~10 iterations with an overshoot, and drift between iterations 10
        apart of TV ≈0.1.
        """
        base = cls(iteration_stride=10, popularity_sigma=1.4, popularity_sigma_spread=0.25,
                   skew_start=0.12, skew_timescale=4.0, skew_overshoot=1.5, skew_relax=80.0,
                   drift_rho=0.8, drift_sigma=0.42, regime_shift_prob=0.0, doc_tokens=2048,
                   doc_sigma=0.05, doc_focus=0.0, rank_sigma=0.0,
                   model="gpt-moe (SmartMoE-like)")
        return base.replace(**changes)


def _require(config: SynthConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"SynthConfig.{name} = {getattr(config, name)!r} {rule}; fix {name}")


def synthesize(config: SynthConfig | None = None, *, rng: np.random.Generator | int | None = None,
               workers: int | None = None) -> RoutingTrace:
    """Generate a validated synthetic trace; deterministic given ``config`` and ``rng``.

    ``rng`` is a ``numpy.random.Generator`` or an int seed (``None`` means seed 0, so a call
    without a seed is still reproducible). Each layer draws from its own generator spawned from
    ``rng``, so layers run on ``workers`` threads (default: up to 8 CPU cores; numpy releases
    the GIL) and the result does not depend on ``workers``.
    """
    c = config or SynthConfig()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    bounds.check_shape((c.num_passes, c.num_layers, c.num_ranks, c.num_experts),
                       "trace synth: counts[passes, layers, ranks, experts]",
                       "lower --layers, --ranks, --experts, --iterations or --micro-batches")
    counts = np.empty((c.num_passes, c.num_layers, c.num_ranks, c.num_experts), dtype=np.int64)
    topk = None
    if c.per_token:
        topk = np.empty(counts.shape[:3] + (c.tokens_per_rank, c.top_k), dtype=np.int32)

    def run_layers(layers: list[int]) -> None:
        scratch = None if c.per_token else np.empty(counts.shape[:1] + counts.shape[2:],
                                                    dtype=np.float32)
        for layer in layers:
            logp_IE = layer_log_popularity_IE(c, layer_rngs[layer])
            if c.per_token:
                counts[:, layer], topk[:, layer] = _per_token_layer(c, logp_IE,
                                                                    layer_rngs[layer])
            else:
                _count_layer_TRE(c, logp_IE, layer_rngs[layer], counts[:, layer], scratch)

    layer_rngs = rng.spawn(c.num_layers)
    workers = max(1, min(workers or os.cpu_count() or 1, 8, c.num_layers))
    chunks = [list(range(w, c.num_layers, workers)) for w in range(workers)]
    if workers == 1:
        run_layers(chunks[0])
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run_layers, chunks))
    return validate(RoutingTrace(counts, synth_meta(c), topk))


def synth_meta(config: SynthConfig, **extra) -> TraceMeta:
    """The metadata of a synthetic trace drawn from ``config`` (``extra`` joins
    ``meta.extra`` beside the ``synth_config``)."""
    c = config
    return TraceMeta(num_layers=c.num_layers, num_ranks=c.num_ranks, num_experts=c.num_experts,
                     top_k=c.top_k, tokens_per_rank=c.tokens_per_rank,
                     micro_batches_per_iteration=c.micro_batches_per_iteration,
                     iteration_stride=c.iteration_stride, first_iteration=c.first_iteration,
                     model=c.model, source="moesim.traces.synth", license="Apache-2.0",
                     extra={"synth_config": dataclasses.asdict(c), **extra})


def skew_scale_I(config: SynthConfig) -> np.ndarray:
    """Multiplier of log-popularity per iteration, ``[I]`` (the transient, see the module)."""
    c = config
    age = c.iteration_stride * np.arange(c.num_iterations, dtype=np.float64)
    grow = 1 - (1 - c.skew_start) * np.exp(-age / c.skew_timescale)
    return grow * (1 + c.skew_overshoot * (1 - np.exp(-age / c.skew_timescale))
                   * np.exp(-age / c.skew_relax))


def _base_log_popularity_E(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    c = config
    if c.popularity == "zipf":
        base = -c.zipf_exponent * np.log1p(np.arange(c.num_experts, dtype=np.float64))
        base = rng.permutation(base)
    else:
        sigma = c.popularity_sigma * np.exp(c.popularity_sigma_spread * rng.standard_normal())
        base = sigma * rng.standard_normal(c.num_experts)
    return base - base.mean()


def layer_log_popularity_IE(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """One layer's log-popularity per iteration, ``[I, E]``: base, AR(1) drift, shifts, skew."""
    c = config
    I, E = c.num_iterations, c.num_experts
    innovations = rng.standard_normal((I, E)) * c.drift_sigma * np.sqrt(1 - c.drift_rho**2)
    shifts = rng.random(I) < c.regime_shift_prob
    drift = c.drift_sigma * rng.standard_normal(E)
    base = _base_log_popularity_E(c, rng)
    logp_IE = np.empty((I, E))
    for i in range(I):
        if i and shifts[i]:
            base = _base_log_popularity_E(c, rng)
        if i:
            drift = c.drift_rho * drift + innovations[i]
        logp_IE[i] = base + drift
    return logp_IE * skew_scale_I(c)[:, None]


def _layer_tilts(config: SynthConfig, logp_IE: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pass log-popularity ``[T, E]``, rank tilt ``[R, E]`` and document variance ``[T, E]``.

    A rank holds ``N / doc_tokens`` documents, so its topic tilt has variance
    ``doc_sigma² · doc_tokens / N``, larger for rare experts (``doc_focus``). float32.
    """
    c = config
    docs_per_rank = max(1.0, c.tokens_per_rank / c.doc_tokens)
    rank_RE = (c.rank_sigma * rng.standard_normal((c.num_ranks, c.num_experts)))
    logp_TE = np.repeat(logp_IE, c.micro_batches_per_iteration, axis=0)
    centred_TE = logp_TE - np.log(np.exp(logp_TE).mean(axis=-1, keepdims=True))
    focus_TE = np.clip(np.exp(-c.doc_focus * centred_TE), 0.25, 4.0)
    docvar_TE = (c.doc_sigma * focus_TE) ** 2 / docs_per_rank
    return (logp_TE.astype(np.float32), rank_RE.astype(np.float32),
            docvar_TE.astype(np.float32))


def _count_layer_TRE(config: SynthConfig, logp_IE: np.ndarray, rng: np.random.Generator,
                     out_TRE: np.ndarray, scratch_TRE: np.ndarray | None = None) -> None:
    """Draw one layer's counts into ``out_TRE`` ``[T, R, E]`` at the count level (step 4).

    The document tilt and the sampling noise (top-k without replacement: each of N tokens
    picks the expert with probability π = λ/N, relative variance (1 − π)/λ, evaluated at the
    pass's expected share) are combined into one mean-preserving log-normal factor per cell;
    systematic rounding (one uniform per row) then gives integers summing exactly to ``N·k``.
    One normal draw, one ``exp`` and a few in-place float32 passes per cell keep this fast;
    ``scratch_TRE`` (float32, reused across layers) spares the page faults of fresh buffers.
    """
    plan = layer_cell_plan(config, logp_IE, rng)
    x = np.empty(out_TRE.shape, dtype=np.float32) if scratch_TRE is None else scratch_TRE
    rng.standard_normal(dtype=np.float32, out=x)
    count_cells(config, plan, x, slice(None), slice(None), rng, out_TRE)


def layer_cell_plan(config: SynthConfig, logp_IE: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's per-cell log-normal factor as ``(sd_TE, shift_TE, rank_RE)`` float32: a
    cell's log count is ``sd · z + shift + rank`` for a standard normal ``z`` (see
    :func:`_count_layer_TRE`); draws the rank tilt from ``rng``."""
    c = config
    total, cap = c.tokens_per_rank * c.top_k, c.tokens_per_rank
    logp_TE, rank_RE, docvar_TE = _layer_tilts(c, logp_IE, rng)
    share_TE = np.exp(logp_TE - logp_TE.max(axis=-1, keepdims=True))
    lam_TE = np.minimum(total * share_TE / share_TE.sum(axis=-1, keepdims=True), cap)
    logvar_TE = np.log1p((1 - lam_TE / cap) / np.maximum(lam_TE, 1e-3)) + docvar_TE
    shift_TE = logp_TE - logvar_TE / 2
    shift_TE -= shift_TE.max(axis=-1, keepdims=True)
    return np.sqrt(logvar_TE, dtype=np.float32), shift_TE.astype(np.float32), rank_RE


def count_cells(config: SynthConfig, plan: tuple, z_TRE: np.ndarray, passes: slice,
                ranks: slice, rng: np.random.Generator, out_TRE: np.ndarray) -> None:
    """Counts of the cells ``[passes, ranks, :]`` of one layer into ``out_TRE`` from standard
    normals ``z_TRE`` (overwritten): log-normal factor, water-filling under the cap,
    systematic rounding (one uniform per row from ``rng``)."""
    c = config
    total, cap = c.tokens_per_rank * c.top_k, c.tokens_per_rank
    sd_TE, shift_TE, rank_RE = plan
    x = z_TRE
    x *= sd_TE[passes][:, None, :]
    x += shift_TE[passes][:, None, :]
    x += rank_RE[None, ranks]
    np.exp(x, out=x)
    waterfill(x, total, cap)
    _systematic_round(x, total, rng, out_TRE)
    if out_TRE.max() > cap:  # float rounding at the cap; vanishingly rare
        np.minimum(out_TRE, cap, out=out_TRE)
        out_TRE[...] = fix_row_sums(out_TRE, total, cap)


def _systematic_round(x: np.ndarray, total: int, rng: np.random.Generator,
                      out: np.ndarray) -> None:
    """Round rows of ``x`` ``[..., E]`` (each summing to ``total``) to integers summing exactly to
    ``total``; each entry becomes ``floor`` or ``ceil`` of itself, unbiased (systematic sampling).
    """
    cum = np.cumsum(x, axis=-1, out=x)
    cum *= total / cum[..., -1:]
    cum[..., -1] = total
    cum += rng.random(x.shape[:-1] + (1,), dtype=np.float32)
    np.floor(cum, out=cum)
    np.minimum(cum, total, out=cum)  # float32 spacing near `total` can push u over 1
    cum[..., -1] = total
    out[..., 0] = cum[..., 0]
    np.subtract(cum[..., 1:], cum[..., :-1], out=out[..., 1:], casting="unsafe")


def _expected_shares_TRE(config: SynthConfig, logp_IE: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
    """Per-rank log shares with a drawn document tilt, float64 ``[T, R, E]`` (per-token path)."""
    logp_TE, rank_RE, docvar_TE = _layer_tilts(config, logp_IE, rng)
    tilt = rng.standard_normal((logp_TE.shape[0],) + rank_RE.shape)
    return tilt * np.sqrt(docvar_TE)[:, None, :] + logp_TE[:, None, :] + rank_RE[None]


def waterfill(x: np.ndarray, total: float, cap: float) -> np.ndarray:
    """Scale rows of float ``x`` ``[..., E]`` (in place) to sum ``total``, none above ``cap``.

    Entries over the cap are clipped and the excess goes to the others in proportion
    (each round caps at least one more entry, so ``E`` rounds always suffice). Needs
    ``total <= cap · E``. Only rows with an entry over the cap are revisited.
    """
    x *= total / x.sum(axis=-1, keepdims=True)
    rows = (x > cap).any(axis=-1)
    if rows.any():
        x[rows] = _waterfill_rows(x[rows].astype(np.float64), total, cap)
    return x


def _waterfill_rows(x: np.ndarray, total: float, cap: float) -> np.ndarray:
    for _ in range(x.shape[-1]):
        over = x >= cap
        capped = over.sum(axis=-1, keepdims=True) * cap
        free = np.where(over, 0.0, x)
        scale = (total - capped) / np.maximum(free.sum(axis=-1, keepdims=True), 1e-12)
        x = np.where(over, cap, free * scale)
        if not (x > cap).any():
            break
    return x


def fix_row_sums(counts: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Adjust int rows ``[..., E]`` (entries already in ``[0, cap]``) to sum exactly ``total``.

    Surplus is taken from the largest entry, a deficit given to the largest entry with room;
    after stochastic rounding the residual is a few units, so the bias is negligible.
    """
    assert total <= cap * counts.shape[-1], "total exceeds what the cap allows"
    counts = np.array(counts, dtype=np.int64)  # contiguous copy: reshape below must be a view
    for _ in range(4 * counts.shape[-1]):
        diff = total - counts.sum(axis=-1)
        if not diff.any():
            return counts
        rows = np.flatnonzero(diff)
        flat = counts.reshape(-1, counts.shape[-1])
        d = diff.reshape(-1)[rows]
        sub = flat[rows]
        room = np.where(d[:, None] > 0, cap - sub, sub)
        col = np.where(d[:, None] > 0, np.where(room > 0, sub, -1), sub).argmax(axis=-1)
        step = np.sign(d) * np.minimum(np.abs(d), room[np.arange(rows.size), col])
        flat[rows, col] += step
    raise AssertionError("fix_row_sums did not converge")


def _per_token_layer(config: SynthConfig, logp_IE: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per-token choices ``[T, R, N, k]`` by Gumbel top-k and their counts ``[T, R, E]``."""
    c = config
    logq_TRE = _expected_shares_TRE(c, logp_IE, rng)
    T, R, E = logq_TRE.shape
    gumbel = rng.gumbel(size=(T, R, c.tokens_per_rank, E))
    scores = logq_TRE[:, :, None, :] + gumbel
    ids = np.argpartition(-scores, c.top_k - 1, axis=-1)[..., :c.top_k].astype(np.int32)
    rows = np.arange(T * R)[:, None] * E
    flat = (ids.reshape(T * R, -1) + rows).ravel()
    counts = np.bincount(flat, minlength=T * R * E).reshape(T, R, E)
    return counts, ids
