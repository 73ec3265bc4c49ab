"""The streaming sampler's counts of one (pass, layer): a per-expert factor table and a
counter-based generator, in C (``traces/_synth_c.c``, built by setup.py where a compiler is
present) or in numpy — the same counts, bit for bit, either way.

Shape legend: ``R`` ranks, ``E`` experts, ``Q`` = 256 table entries.

The model is step 4 of :mod:`moesim.traces.synth` (count level): cell ``(t, l, r, e)`` gets the
weight ``a_te · ρ_re · F`` — expected share, persistent rank tilt ``ρ = exp(rank_sigma · N(0,1))``
and one mean-one log-normal factor ``F = exp(sd_te · z) / E[…]`` for the document tilt and the
sampling noise together — then the row is scaled to ``N·k`` under the top-k cap (water-filling)
and rounded systematically to integers summing to ``N·k``. What makes it cheap:

- ``z = z₁ + z₂``, two independent draws from the 256-point grid of normal quantiles
  ``Φ⁻¹((q + ½)/256)`` scaled to variance ½ each (so ``Var z = 1``; the sum takes 65536
  values, tails at ±4.1 σ). Then ``F = g(q₁) · g(q₂)`` with ``g_te(q) = exp(sd_te ζ_q) / m_te``,
  ``m_te`` the grid mean of ``exp(sd_te ζ)``: one table ``[E, Q]`` per (pass, layer), with
  ``√a_te`` folded in, holds every factor, and ``E[F] = 1`` exactly (the in-memory model
  shifts by ``−sd²/2`` for a continuous normal instead).
- The random bits are SplitMix64 (Steele, Lea & Flood 2014) of a counter: row ``g = t·R + r``
  of a layer with key ``κ`` takes ``mix(κ + (g·W + j + 1)·γ)`` for its words ``j < W =
  ⌈E/4⌉ + 1`` — two bytes per cell (``q₁, q₂``), the last word for the rounding's uniform. Any
  row can be drawn alone, so the counts depend on neither threads nor chunking.
- Rows whose largest weight would pass the cap (rare at E = 256) or whose rounding lands a
  count above it are flagged by the fast loop and redone here in Python
  (:func:`moesim.traces.synth.waterfill`, the same uniform), for both back ends.

The fast loop per row: ``x_e = (tab[e, q₁] · tab[e, q₂]) · ρ_re`` (float32), ``c_e = x₀ + … +
x_e`` (float64, in order), ``s = N·k / c_{E−1}``, ``k_e = ⌊c_e · s + u⌋`` (``k_{E−1} = N·k``),
``count_e = k_e − k_{e−1}``.
"""

from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import numpy as np

from moesim.traces.synth import fix_row_sums, waterfill

try:                                     # built by setup.py where a C compiler is present
    from moesim.traces import _synth_c
except ImportError:                      # pragma: no cover - the numpy loop then
    _synth_c = None

Q_BITS = 8
GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BLOCK_CELLS = 1 << 16                   # cells per block of the numpy loop


@lru_cache(maxsize=1)
def half_grid_Q() -> np.ndarray:
    """The 256 normal quantiles at the cell midpoints, scaled to variance ½, float32."""
    inv_cdf = NormalDist().inv_cdf          # the stdlib's (Wichura's AS241): no scipy import
    z = np.array([inv_cdf((q + 0.5) / (1 << Q_BITS)) for q in range(1 << Q_BITS)])
    z *= np.sqrt(0.5 / np.mean(z * z))
    grid = z.astype(np.float32)
    grid.setflags(write=False)
    return grid


def factor_table_EQ(sd_E: np.ndarray, log_share_E: np.ndarray) -> np.ndarray:
    """One (pass, layer)'s table ``[E, Q]`` float32: ``√a_e · exp(sd_e ζ_q) / m_e`` with ``a_e =
    exp(log_share_e − max)`` (see the module); ``tab[e, q₁] · tab[e, q₂]`` averages ``a_e``."""
    g = np.multiply(np.asarray(sd_E, np.float32)[:, None], half_grid_Q()[None, :])
    np.exp(g, out=g)
    mean_E = g.sum(axis=1) / np.float32(g.shape[1])
    log_share = np.asarray(log_share_E, np.float64)
    root_E = np.exp(0.5 * (log_share - log_share.max())) / mean_E.astype(np.float64)
    g *= root_E.astype(np.float32)[:, None]
    return g


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 ``z`` (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def words_per_row(num_experts: int) -> int:
    """Random 64-bit words a row uses: two bytes per cell, one word for the uniform."""
    return -(-num_experts // 4) + 1


def _row_words(key: int, rows_R: np.ndarray, num_experts: int) -> np.ndarray:
    """The words ``[R, W]`` of global rows ``rows_R``."""
    W = words_per_row(num_experts)
    c = rows_R.astype(np.uint64)[:, None] * np.uint64(W) + np.arange(1, W + 1, dtype=np.uint64)
    return mix64(np.uint64(key) + c * GAMMA)


def row_weights(tab_EQ: np.ndarray, rho_RE: np.ndarray, key: int, rows_R: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``x`` float32 ``[R, E]`` and uniforms ``u`` float64 ``[R, 1]`` of rows ``rows_R``
    (global row numbers; ``rho_RE`` their rank tilts)."""
    E = tab_EQ.shape[0]
    words = _row_words(key, rows_R, E)
    raw = np.ascontiguousarray(words[:, :-1]).astype("<u8", copy=False).view(np.uint8)
    offset_E = np.arange(E, dtype=np.intp) << Q_BITS
    flat = tab_EQ.reshape(-1)
    x = np.take(flat, raw[:, 0:2 * E:2] + offset_E)
    x *= np.take(flat, raw[:, 1:2 * E:2] + offset_E)
    x *= rho_RE
    u = (words[:, -1:] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return x, u


def _round_rows(cum_RE: np.ndarray, u_R1: np.ndarray, total: int) -> np.ndarray:
    """Systematic rounding of cumulative weights to int64 counts summing to ``total``."""
    k = np.floor(cum_RE * (total / cum_RE[:, -1:]) + u_R1)
    k[:, -1] = total
    return np.diff(k.astype(np.int64), axis=1, prepend=0)


def _draw_numpy(tab_EQ, rho_RE, key, row0, total, cap, out_RE, flags_R) -> int:
    """The C loop's numbers in numpy, a block of rows at a time."""
    R, E = out_RE.shape
    step = max(1, _BLOCK_CELLS // E)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        x, u = row_weights(tab_EQ, rho_RE[r0:r1], key, np.arange(row0 + r0, row0 + r1))
        cum = np.cumsum(x, axis=1, dtype=np.float64)
        scale = total / cum[:, -1]
        counts = _round_rows(cum, u, total)
        out_RE[r0:r1] = counts
        over = x.max(axis=1).astype(np.float64) * scale > cap
        flags_R[r0:r1] = np.where((counts > cap).any(axis=1), 2, over)
    return int(np.count_nonzero(flags_R))


def draw_counts(tab_EQ: np.ndarray, rho_RE: np.ndarray, key: int, row0: int, total: int,
                cap: int, out_RE: np.ndarray) -> None:
    """Counts of one (pass, layer) into ``out_RE`` ``[R, E]`` (C-contiguous, uint16 / int32 /
    int64): global rows ``row0 …``, each summing to ``total`` with none above ``cap``."""
    R, E = out_RE.shape
    if R == 0:
        return
    flags_R = np.zeros(R, dtype=np.uint8)
    tab = np.ascontiguousarray(tab_EQ, dtype=np.float32)
    rho = np.ascontiguousarray(rho_RE, dtype=np.float32)
    if _synth_c is not None:
        flagged = _synth_c.draw(tab, rho, int(key), int(row0), int(total), int(cap), E, out_RE,
                                flags_R)
    else:
        flagged = _draw_numpy(tab, rho, key, row0, total, cap, out_RE, flags_R)
    if flagged:
        rows = np.flatnonzero(flags_R)
        out_RE[rows] = _capped_rows(tab, rho[rows], key, row0 + rows, total, cap)


def _capped_rows(tab_EQ, rho_RE, key, rows_R, total, cap) -> np.ndarray:
    """Rows over the cap: water-filled weights, the same systematic rounding, int64."""
    x, u = row_weights(tab_EQ, rho_RE, key, rows_R)
    lam = waterfill(x.astype(np.float64), total, cap)
    counts = _round_rows(np.cumsum(lam, axis=1), u, total)
    if counts.max() > cap:              # float rounding at the cap
        counts = fix_row_sums(np.minimum(counts, cap), total, cap)
    return counts
