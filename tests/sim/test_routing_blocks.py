"""Block routing and block-diagonal matrices against their dense forms."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.blockmatrix import BlockDiag, block_io
from moesim.costmodel import _intra_inter_io
from moesim.placement import Placement
from moesim.routing import RoutePlan, apply_capacity
from moesim.routing_blocks import BlockRoutePlan, block_column_sums, plan_routes


def _dense(kept_MLRQ: np.ndarray, K: int, S: int) -> np.ndarray:
    """Block coordinates → ``[M, L, R, R·S]``."""
    M, L, R, Q = kept_MLRQ.shape
    out = np.zeros((M, L, R, R * S), dtype=np.int64)
    for b in range(R // K):
        out[:, :, b * K:(b + 1) * K, b * Q:(b + 1) * Q] = kept_MLRQ[:, :, b * K:(b + 1) * K]
    return out


@pytest.mark.parametrize("R, E, ep, shuffle", [(8, 8, 4, False), (16, 8, 4, True),
                                               (8, 4, 2, True), (8, 8, 8, False)])
def test_block_plan_routes_as_the_dense_plan(R: int, E: int, ep: int, shuffle: bool) -> None:
    rng = np.random.default_rng(R + ep)
    S = E // ep
    row = np.arange(R * S) % E
    rows = []
    for _ in range(3):  # permute experts inside each EP group's slots: still in-block
        r = row.copy()
        if shuffle:
            for g in range(R // ep):
                seg = slice(g * ep * S, (g + 1) * ep * S)
                r[seg] = rng.permutation(r[seg])
        rows.append(r)
    placement = Placement(np.stack(rows), R, S, E)
    plan = plan_routes(placement, "ep_group", 4, ep)
    assert isinstance(plan, BlockRoutePlan) and plan.identity == (not shuffle)
    dense = RoutePlan.build(placement, "ep_group", 4, ep)
    counts = rng.integers(0, 40, (2, 3, R, E)).astype(np.int32)
    for cap in (None, 12):
        kept, dropped = plan.route(counts, cap)
        want_k, want_d = dense.route(counts, cap)
        np.testing.assert_array_equal(_dense(kept, ep, S), want_k)
        np.testing.assert_array_equal(_dense(np.asarray(dropped), ep, S), want_d)
        np.testing.assert_array_equal(block_column_sums(kept, ep), want_k.sum(axis=2))


def test_routing_that_leaves_its_block_stays_dense() -> None:
    row = np.r_[np.arange(4), np.arange(4)[::-1]]  # group 1's replica of expert 0 on rank 7
    cross = np.r_[np.array([1, 0, 2, 3]), np.array([0, 1, 2, 3])]
    placement = Placement(np.stack([row, cross]), 8, 1, 4)
    assert isinstance(plan_routes(placement, "ep_group", 4, 4), BlockRoutePlan)
    moved = Placement(np.stack([np.r_[np.arange(4), np.arange(4)],
                                np.r_[np.array([0, 1, 2, 2]), np.array([3, 1, 0, 3])]]),
                      8, 1, 4)
    assert isinstance(plan_routes(moved, "ep_group", 4, 4), RoutePlan)
    assert isinstance(plan_routes(placement, "even", 4, 4), RoutePlan)


@pytest.mark.parametrize("R, K, g, first", [(16, 8, 4, 0), (16, 4, 8, 0), (8, 8, 4, 8),
                                            (16, 16, 8, 0), (12, 6, 4, 0)])
def test_block_diag_reads_like_its_dense_matrix(R: int, K: int, g: int, first: int) -> None:
    rng = np.random.default_rng(K)
    local = rng.integers(0, 9, (R, K)).astype(np.int32)
    B = BlockDiag(local, 3, K)
    D = np.asarray(B)
    assert D.dtype == np.int64 and D.shape == (R, R)
    for b in range(R // K):
        np.testing.assert_array_equal(D[b * K:(b + 1) * K, b * K:(b + 1) * K],
                                      3 * local[b * K:(b + 1) * K])
    assert D.sum() == B.sum() and np.array_equal(D.sum(0), B.sum(0))
    np.testing.assert_array_equal(D.sum(1), B.sum(axis=1))
    np.testing.assert_array_equal(np.diagonal(D), B.diagonal())
    np.testing.assert_array_equal(np.asarray(B.T), D.T)
    np.testing.assert_array_equal(B / 3, D / 3)
    np.testing.assert_array_equal(B.T[1], D.T[1])
    assert len(B) == R and B.shape == (R, R)
    got = block_io(B.T, g, first)
    if got is None:  # nodes and blocks do not line up: the dense path handles it
        assert K % g and g % K
        return
    nodes = (first + np.arange(R)) // g
    for a, b in zip(got, _intra_inter_io(D.T, nodes, g), strict=True):
        np.testing.assert_array_equal(a, b)


def test_capacity_on_blocks_keeps_the_dtype() -> None:
    kept, dropped = apply_capacity(np.full((1, 1, 4, 2), 7, dtype=np.int32), 5)
    assert kept.dtype == np.int32 and int(dropped.sum()) == 16
