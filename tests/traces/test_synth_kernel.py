"""The streaming sampler's inner loop (traces/synth_kernel.py, traces/_synth_c.c): the C loop
and its numpy version give the same counts bit for bit; rows sum exactly, respect the cap,
do not depend on how the rows are split; the factor table is a mean-one log-normal."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.traces import synth_kernel as kernel

CASES = [  # ranks, experts, tokens per rank, top-k, dtype, skew (sd of log share)
    (7, 256, 4096, 8, np.uint16, 1.0),
    (64, 16, 64, 4, np.int32, 2.5),        # E = 16, top-4: many rows water-filled
    (33, 5, 10, 2, np.int64, 1.5),         # E not a multiple of 4
    (300, 32, 2048, 2, np.uint16, 0.5),
]


def _inputs(seed: int, R: int, E: int, skew: float):
    rng = np.random.default_rng(seed)
    tab = kernel.factor_table_EQ(rng.uniform(0.1, 2.5, E), skew * rng.standard_normal(E))
    rho = np.exp(0.1 * rng.standard_normal((R, E))).astype(np.float32)
    return tab, rho, int(rng.integers(0, 2**63))


@pytest.fixture(params=["c", "numpy"])
def backend(request, monkeypatch):
    if request.param == "c" and kernel._synth_c is None:
        pytest.skip("the C kernel moesim.traces._synth_c is not built (no C compiler at "
                    "install time); the numpy loop is tested")
    if request.param == "numpy":
        monkeypatch.setattr(kernel, "_synth_c", None)
    return request.param


@pytest.mark.parametrize("R, E, N, k, dtype, skew", CASES)
def test_rows_sum_exactly_under_the_cap_and_split_freely(backend, R, E, N, k, dtype, skew):
    tab, rho, key = _inputs(R + E, R, E, skew)
    out = np.empty((R, E), dtype)
    kernel.draw_counts(tab, rho, key, 1000, N * k, N, out)
    assert (out.astype(np.int64).sum(axis=1) == N * k).all() and out.max() <= N
    parts = np.empty((R, E), dtype)
    for r0, r1 in ((0, 3), (3, R // 2), (R // 2, R)):     # rows drawn alone: the same counts
        kernel.draw_counts(tab, rho[r0:r1], key, 1000 + r0, N * k, N, parts[r0:r1])
    np.testing.assert_array_equal(parts, out)


@pytest.mark.parametrize("R, E, N, k, dtype, skew", CASES)
def test_c_and_numpy_give_the_same_counts(monkeypatch, R, E, N, k, dtype, skew):
    if kernel._synth_c is None:
        pytest.skip("the C kernel moesim.traces._synth_c is not built; nothing to compare")
    tab, rho, key = _inputs(2 * R + E, R, E, skew)
    c_out, np_out = np.empty((R, E), dtype), np.empty((R, E), dtype)
    kernel.draw_counts(tab, rho, key, 77, N * k, N, c_out)
    flags_c = np.zeros(R, np.uint8)
    kernel._synth_c.draw(tab, rho, key, 77, N * k, N, E, np.empty((R, E), dtype), flags_c)
    monkeypatch.setattr(kernel, "_synth_c", None)
    kernel.draw_counts(tab, rho, key, 77, N * k, N, np_out)
    np.testing.assert_array_equal(c_out, np_out)
    flags_np = np.zeros(R, np.uint8)
    kernel._draw_numpy(tab, rho, key, 77, N * k, N, np.empty((R, E), dtype), flags_np)
    np.testing.assert_array_equal(flags_c, flags_np)      # the same rows go to water-filling
    if skew > 2:
        assert flags_c.any()


def test_the_factor_is_a_mean_one_lognormal():
    """tab[e, q1] · tab[e, q2] over the grid: mean a_e exactly, log-sd ≈ sd_e (tails ±4.1 σ)."""
    sd = np.array([0.05, 0.5, 1.0, 2.0])
    log_share = np.log([1.0, 0.5, 0.25, 0.125])
    tab = kernel.factor_table_EQ(sd, log_share).astype(np.float64)
    F = tab[:, :, None] * tab[:, None, :]                        # every (q1, q2): [E, Q, Q]
    np.testing.assert_allclose(F.mean(axis=(1, 2)), np.exp(log_share), rtol=1e-5)
    np.testing.assert_allclose(np.log(F).std(axis=(1, 2)), sd, rtol=1e-3)
    grid = kernel.half_grid_Q().astype(np.float64)
    assert abs(grid.mean()) < 1e-6 and abs((grid**2).mean() - 0.5) < 1e-6
    assert 4.0 < 2 * grid.max() < 4.2


def test_counts_follow_the_weights(backend):
    """Many rows of one weight vector: mean counts = N·k · share (systematic rounding is
    unbiased), spread as the factor says."""
    R, E, N, k = 4000, 8, 512, 2
    share = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    tab = kernel.factor_table_EQ(np.full(E, 0.3), np.log(share))
    out = np.empty((R, E), np.int32)
    kernel.draw_counts(tab, np.ones((R, E), np.float32), 5, 0, N * k, N, out)
    np.testing.assert_allclose(out.mean(axis=0) / (N * k), share, rtol=0.02)
    assert 0.2 < float(np.std(np.log(out[:, 0] / out[:, 1]))) < 0.6   # two factors of sd 0.3


def test_the_words_are_splitmix64():
    """SplitMix64's published first output for seed 0 (state += γ, then mix)."""
    assert int(kernel.mix64(np.array([kernel.GAMMA]))[0]) == 0xE220A8397B1DCDAF
