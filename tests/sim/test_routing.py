"""The fast routing against the original per-expert loop, on random placements."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.placement import Placement
from moesim.routing import RoutePlan, apply_capacity, rank_matrix, split_tokens

from ._reference_routing import split_tokens_reference

RULES = ("even", "local_first", "node_first", "ep_group")


def _case(rng):
    G, S, gpn = int(rng.integers(1, 7)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    E = int(rng.integers(1, G * S + 1))
    row = np.concatenate([np.arange(E), rng.integers(-1, E, G * S - E)])
    rng.shuffle(row)
    counts = rng.integers(0, 20, (G, E))
    counts[:, np.bincount(row[row >= 0], minlength=E) == 0] = 0
    return G, S, gpn, row, counts


@pytest.mark.parametrize("rule", RULES)
def test_matches_reference(rule):
    rng = np.random.default_rng(7)
    for _ in range(300):
        G, S, gpn, row, counts = _case(rng)
        ep = int(rng.integers(1, G + 1))
        want = split_tokens_reference(counts, row, G, S, rule, gpn, ep)
        got = split_tokens(counts, row, G, S, rule, gpn, ep)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.sum(1), counts.sum(1))  # tokens conserved


def test_plan_routes_all_layers_and_passes_at_once():
    rng = np.random.default_rng(1)
    rows = np.stack([rng.permutation(np.r_[np.arange(4), rng.integers(0, 4, 4)])
                     for _ in range(3)])
    placement = Placement(rows, num_ranks=4, slots_per_rank=2, num_experts=4)
    counts = rng.integers(0, 50, (2, 3, 4, 4))
    plan = RoutePlan.build(placement, "node_first", gpus_per_node=2)
    kept, dropped = plan.route(counts, slot_capacity=10)
    for m in range(2):
        for l in range(3):
            ref = split_tokens_reference(counts[m, l], rows[l], 4, 2, "node_first", 2)
            np.testing.assert_array_equal(kept[m, l], np.minimum(ref, 10))
            np.testing.assert_array_equal(dropped[m, l], ref - np.minimum(ref, 10))
    assert rank_matrix(kept, 2).shape == (2, 3, 4, 4)


def test_identity_plan_is_free():
    placement = Placement(np.tile(np.arange(8), (2, 1)), 8, 1, 8)
    plan = RoutePlan.build(placement, "ep_group", 4, ep_size=8)
    assert plan.identity
    counts = np.ones((1, 2, 8, 8), dtype=np.int64)
    assert plan.split(counts) is counts
    kept, dropped = apply_capacity(counts, None)
    assert kept is counts and not dropped.any()
