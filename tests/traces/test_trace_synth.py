"""The synthetic generator: config checks, exactness, determinism, calibrated statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.traces import SynthConfig, synthesize, validate
from moesim.traces.stats import per_pass_stats
from moesim.traces.synth import skew_scale_I


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", 0, "num_experts = 0 must be >= 1; fix num_experts"),
    ("top_k", 40, "top_k = 40 must be <= num_experts"),
    ("popularity", "pareto", "popularity = 'pareto' must be one of lognormal, zipf"),
    ("doc_sigma", -0.1, "doc_sigma = -0.1 must be >= 0"),
    ("skew_start", 1.5, "skew_start = 1.5 must be in \\[0, 1\\]"),
    ("drift_rho", 2.0, "drift_rho = 2.0 must be in \\[0, 1\\]"),
    ("skew_timescale", 0.0, "skew_timescale = 0.0 must be > 0"),
])
def test_config_is_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**{field: value})


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        SynthConfig(24)  # positional use must fail
    with pytest.raises(dataclasses.FrozenInstanceError):
        SynthConfig().num_layers = 3


SMALL = SynthConfig(num_layers=3, num_ranks=4, num_experts=16, top_k=4, tokens_per_rank=64,
                    micro_batches_per_iteration=2, num_iterations=5)


def test_exact_sums_caps_and_determinism():
    a = synthesize(SMALL, rng=7)
    validate(a)
    assert (a.counts_TLRE.sum(-1) == 64 * 4).all() and a.counts_TLRE.max() <= 64
    b = synthesize(SMALL, rng=np.random.default_rng(7), workers=1)
    np.testing.assert_array_equal(a.counts_TLRE, b.counts_TLRE)
    assert not np.array_equal(a.counts_TLRE, synthesize(SMALL, rng=8).counts_TLRE)


def test_cap_binds_under_extreme_skew():
    cfg = SMALL.replace(popularity_sigma=8.0, skew_start=1.0, top_k=2, num_experts=4)
    trace = synthesize(cfg, rng=1)
    assert trace.counts_TLRE.max() == 64  # the top expert gets every token, never more


def test_zipf_and_per_token_modes():
    validate(synthesize(SMALL.replace(popularity="zipf"), rng=2))
    tok = synthesize(SMALL.replace(per_token=True), rng=3)
    assert tok.topk_TLRNK.shape == (10, 3, 4, 64, 4)
    validate(tok)  # ids distinct per token and reproduce counts


def test_layers_are_independent_permutations():
    trace = synthesize(SMALL.replace(num_layers=6, num_iterations=10), rng=4)
    load_LE = trace.counts_TLRE[-4:].sum(axis=(0, 2)).astype(float)
    corr = np.corrcoef(load_LE)[np.triu_indices(6, 1)]
    assert abs(corr.mean()) < 0.4


def test_skew_transient_grows_from_near_balance():
    scale = skew_scale_I(SynthConfig.smartmoe_like(num_iterations=30))
    assert scale[0] < 0.2 and scale[2] > 1.0 and abs(scale[-1] - 1) < 0.05


def test_defaults_fall_in_published_ranges():
    """~100K tokens per pass, E=256, top-8 (shared/TRACE_FORMATS.md reference statistics)."""
    cfg = SynthConfig(num_layers=6, num_ranks=16, num_experts=256, top_k=8,
                      tokens_per_rank=6144, micro_batches_per_iteration=1, num_iterations=40)
    stats = per_pass_stats(synthesize(cfg, rng=11), ep_size=16)
    late = {k: float(np.nanmean(v[20:])) for k, v in stats.items()}
    assert 2.6 <= late["max_mean"] <= 13.7
    assert 0.05 <= late["tv"] <= 0.09
    assert 0.975 <= late["consecutive_corr"] <= 0.995
    assert 0.7 <= late["rank_corr"] <= 0.92


def _summary(trace) -> dict[str, float]:
    mb, L = trace.meta.micro_batches_per_iteration, trace.meta.num_layers
    s = per_pass_stats(trace, 16)
    mm_I = np.nanmean(s["max_mean"].reshape(-1, mb, L), axis=(1, 2))
    across = (np.arange(trace.num_passes - 1) % mb) == mb - 1
    return {"max_mean_first": mm_I[0], "max_mean_peak": mm_I[1:5].mean(),
            "max_mean_late": mm_I[10:].mean(),
            "tv_within": np.nanmean(s["tv"][~across]), "tv_across": np.nanmean(s["tv"][across]),
            "rank_corr_late": np.nanmean(s["rank_corr"][4:]),
            "gini": np.nanmean(s["gini"])}


def test_smartmoe_like_matches_the_sample(smartmoe_trace):
    """Same shape as the SmartMoE-AE trace, first 20 iterations: statistics within bands."""
    real = _summary(smartmoe_trace.select_iterations(0, 20))
    fake = _summary(synthesize(SynthConfig.smartmoe_like(num_iterations=20), rng=5))
    assert 1.2 <= real["max_mean_first"] <= 2.0 and 1.2 <= fake["max_mean_first"] <= 2.0
    for key, tol in (("max_mean_peak", 0.25), ("max_mean_late", 0.3), ("tv_across", 0.5),
                     ("rank_corr_late", 0.05), ("gini", 0.2)):
        assert abs(fake[key] - real[key]) <= tol * real[key], (key, fake[key], real[key])
    assert fake["tv_within"] < 0.03 and real["tv_within"] < 0.03


def test_per_token_refuses_huge_traces():
    with pytest.raises(ValueError, match="per_token = True needs .* use the count-level"):
        SynthConfig(per_token=True, num_experts=256, num_ranks=256, tokens_per_rank=4096)


def test_waterfill_and_fix_row_sums_on_views():
    from moesim.traces.synth import fix_row_sums, waterfill
    x = np.array([[[8.0, 1.0, 1.0], [1.0, 1.0, 1.0]]] * 2).transpose(1, 0, 2)  # a non-contiguous
    waterfill(x, 4.0, 2.0)
    np.testing.assert_allclose(x.sum(-1), 4.0)
    assert x.max() <= 2.0 + 1e-12
    np.testing.assert_allclose(x[0, 0], [2.0, 1.0, 1.0])
    fixed = fix_row_sums(np.array([[2, 0, 0], [0, 0, 0]])[:, ::-1], 4, 2)
    assert (fixed.sum(-1) == 4).all() and fixed.max() <= 2 and fixed.min() >= 0


def test_regime_shifts_and_rank_tilt_take_effect():
    base = SMALL.replace(num_iterations=8, micro_batches_per_iteration=1, skew_start=1.0,
                         popularity_sigma=1.5, doc_sigma=0.0, drift_sigma=0.0)
    steady = per_pass_stats(synthesize(base, rng=1), 4)["consecutive_corr"]
    shifty = per_pass_stats(synthesize(base.replace(regime_shift_prob=1.0), rng=1),
                            4)["consecutive_corr"]
    assert np.nanmean(steady) > 0.9 > np.nanmean(shifty)
    tilted = per_pass_stats(synthesize(base.replace(rank_sigma=1.0), rng=1), 4)["rank_corr"]
    plain = per_pass_stats(synthesize(base, rng=1), 4)["rank_corr"]
    assert np.nanmean(tilted) < np.nanmean(plain)
