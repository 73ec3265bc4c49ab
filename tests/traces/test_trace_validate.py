"""Every validation failure has a test that pins its message."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.errors import TraceError
from moesim.traces import RoutingTrace, validate
from moesim.traces.validate import meta_from_dict
from tests.traces.tracetoys import make_trace


def with_counts(trace, counts):
    return RoutingTrace(counts, trace.meta, trace.topk_TLRNK)


def with_meta(trace, **changes):
    return RoutingTrace(trace.counts_TLRE, dataclasses.replace(trace.meta, **changes),
                        trace.topk_TLRNK)


def test_valid_traces_pass(tiny, tiny_topk):
    assert validate(tiny) is tiny
    assert validate(tiny_topk) is tiny_topk


def test_negative_count(tiny):
    c = tiny.counts_TLRE.copy()
    c[1, 0, 2, 3] = -1
    with pytest.raises(TraceError, match=r"negative count -1 at \[t, l, r, e\] = \(1, 0, 2, 3\)"):
        validate(with_counts(tiny, c))


def test_nan_count(tiny):
    c = tiny.counts_TLRE.astype(float)
    c[0, 1, 0, 0] = np.nan
    with pytest.raises(TraceError, match=r"NaN or infinity at \[t, l, r, e\] = \(0, 1, 0, 0\)"):
        validate(with_counts(tiny, c))


def test_non_integer_count(tiny):
    c = tiny.counts_TLRE.astype(float)
    c[0, 0, 1, 2] += 0.5
    with pytest.raises(TraceError, match=r"non-integer .* at \[t, l, r, e\] = \(0, 0, 1, 2\)"):
        validate(with_counts(tiny, c))


def test_float_dtype_with_integral_values(tiny):
    with pytest.raises(TraceError, match="float dtype float64; store them as int64"):
        validate(with_counts(tiny, tiny.counts_TLRE.astype(float)))


def test_non_numeric_dtype(tiny):
    with pytest.raises(TraceError, match="dtype bool; store integer counts"):
        validate(with_counts(tiny, tiny.counts_TLRE > 0))


def test_not_an_array(tiny):
    with pytest.raises(TraceError, match="counts_TLRE is a list, not a numpy array"):
        validate(with_counts(tiny, tiny.counts_TLRE.tolist()))


def test_wrong_rank(tiny):
    with pytest.raises(TraceError, match=r"3 dimensions .* expected 4 \[passes, layers"):
        validate(with_counts(tiny, tiny.counts_TLRE[:, 0]))


def test_no_passes(tiny):
    with pytest.raises(TraceError, match="no passes"):
        validate(with_counts(tiny, tiny.counts_TLRE[:0]))


@pytest.mark.parametrize("field,value", [("num_layers", 3), ("num_ranks", 2),
                                         ("num_experts", 6)])
def test_meta_contradicts_shape(tiny, field, value):
    with pytest.raises(TraceError, match=f"metadata says {field} = {value} but counts_TLRE has"):
        validate(with_meta(tiny, **{field: value}))


def test_passes_not_multiple_of_micro_batches(tiny):
    with pytest.raises(TraceError, match="4 passes is not a multiple of "
                       "micro_batches_per_iteration = 3"):
        validate(with_meta(tiny, micro_batches_per_iteration=3))


def test_fixed_k_row_sum_mismatch(tiny):
    with pytest.raises(TraceError, match=r"sum to 12 but tokens_per_rank x top_k = 7 x 2 = 14 "
                       "must be exactly that; .* or set variable_k"):
        validate(with_meta(tiny, tokens_per_rank=7))


def test_variable_k_row_sum_over_budget(tiny):
    with pytest.raises(TraceError, match="sum to 12 but .* = 5 x 2 = 10 must be at most that"):
        validate(with_meta(tiny, tokens_per_rank=5, variable_k=True))


def test_variable_k_under_budget_is_fine(tiny):
    validate(with_meta(tiny, tokens_per_rank=9, variable_k=True))


def test_count_over_tokens_per_rank():
    t = make_trace(N=4, k=2, E=3)
    c = t.counts_TLRE.copy()
    c[0, 0, 0] = [5, 3, 0]  # sums to 8 = 4 x 2 but expert 0 got 5 > 4 tokens
    with pytest.raises(TraceError, match="count 5 at .* exceeds tokens_per_rank = 4; a token "
                       "picks an expert at most once"):
        validate(with_counts(t, c))


def test_rank_aggregated_needs_one_rank(tiny):
    with pytest.raises(TraceError, match="rank_resolved is false but num_ranks = 3"):
        validate(with_meta(tiny, rank_resolved=False))


def test_top_k_over_experts(tiny):
    with pytest.raises(TraceError, match="top_k = 6 exceeds num_experts = 5"):
        validate(with_meta(tiny, top_k=6))


def test_meta_field_not_positive(tiny):
    with pytest.raises(TraceError, match="iteration_stride = 0 must be >= 1"):
        validate(with_meta(tiny, iteration_stride=0))


def test_meta_field_wrong_type(tiny):
    with pytest.raises(TraceError, match="variable_k is 1 but must be bool"):
        validate(with_meta(tiny, variable_k=1))
    with pytest.raises(TraceError, match="num_layers is True but must be int"):
        validate(with_meta(tiny, num_layers=True))


def test_unknown_schema_version_on_object(tiny):
    with pytest.raises(TraceError, match="unknown schema_version 2; this moesim reads version 1"):
        validate(with_meta(tiny, schema_version=2))


def test_not_a_trace():
    with pytest.raises(TraceError, match="expected a RoutingTrace, got dict"):
        validate({})


def test_topk_wrong_shape(tiny_topk):
    t = RoutingTrace(tiny_topk.counts_TLRE, tiny_topk.meta, tiny_topk.topk_TLRNK[..., :1])
    with pytest.raises(TraceError, match=r"topk_TLRNK has shape .* but counts and metadata "
                       r"need \(4, 2, 3, 6, 2\)"):
        validate(t)


def test_topk_float(tiny_topk):
    t = RoutingTrace(tiny_topk.counts_TLRE, tiny_topk.meta, tiny_topk.topk_TLRNK * 1.0)
    with pytest.raises(TraceError, match="topk_TLRNK has type float64; store int32"):
        validate(t)


def test_topk_out_of_range(tiny_topk):
    ids = tiny_topk.topk_TLRNK.copy()
    ids[0, 0, 0, 0, 0] = 5
    with pytest.raises(TraceError, match=r"expert id 5 at \[t, l, r, n, k\] = \(0, 0, 0, 0, 0\)"
                       r" is out of range \[0, 5\)"):
        validate(RoutingTrace(tiny_topk.counts_TLRE, tiny_topk.meta, ids))


def test_topk_padding_in_fixed_k(tiny_topk):
    ids = tiny_topk.topk_TLRNK.copy()
    ids[0, 0, 0, 1, 1] = -1
    with pytest.raises(TraceError, match=r"per-token id -1 \(padding\) .* in a fixed-k trace"):
        validate(RoutingTrace(tiny_topk.counts_TLRE, tiny_topk.meta, ids))


def test_topk_duplicate_choice(tiny_topk):
    ids = tiny_topk.topk_TLRNK.copy()
    ids[1, 1, 2, 3, 1] = ids[1, 1, 2, 3, 0]
    with pytest.raises(TraceError, match=r"token \[t, l, r, n\] = \(1, 1, 2, 3\) picks the same "
                       "expert twice"):
        validate(RoutingTrace(tiny_topk.counts_TLRE, tiny_topk.meta, ids))


def test_topk_disagrees_with_counts(tiny_topk):
    c = tiny_topk.counts_TLRE.copy()
    row = c[2, 0, 1]
    hi, lo = int(np.argmax(row)), int(np.argmin(row))
    row[hi] -= 1
    row[lo] += 1
    with pytest.raises(TraceError, match="per-token ids give .* but counts say .* disagree"):
        validate(RoutingTrace(c, tiny_topk.meta, tiny_topk.topk_TLRNK))


def test_variable_k_topk_with_padding_is_valid():
    t = make_trace(with_topk=True)
    ids = t.topk_TLRNK.copy()
    ids[0, 0, 0, 0, 1] = -1
    c = t.counts_TLRE.copy()
    c[0, 0, 0, t.topk_TLRNK[0, 0, 0, 0, 1]] -= 1
    validate(RoutingTrace(c, dataclasses.replace(t.meta, variable_k=True), ids))


def test_meta_from_dict_errors(tiny):
    good = tiny.meta.to_dict()
    assert meta_from_dict(good) == tiny.meta
    with pytest.raises(TraceError, match="is a JSON list, not an object"):
        meta_from_dict([1])
    with pytest.raises(TraceError, match="unknown schema_version 99; this moesim reads version "
                       "1: upgrade moesim"):
        meta_from_dict({**good, "schema_version": 99})
    with pytest.raises(TraceError, match="unknown schema_version None"):
        meta_from_dict({k: v for k, v in good.items() if k != "schema_version"})
    with pytest.raises(TraceError, match="lacks num_experts, top_k; add them"):
        meta_from_dict({k: v for k, v in good.items() if k not in ("top_k", "num_experts")})
    with pytest.raises(TraceError, match="unknown field\\(s\\) colour; move them under"):
        meta_from_dict({**good, "colour": "red"})
    with pytest.raises(TraceError, match="tokens_per_rank is '6' but must be int"):
        meta_from_dict({**good, "tokens_per_rank": "6"})
