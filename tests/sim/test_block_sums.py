"""The one-pass C sums of block matrices (``moesim._block_sums``) against the dense reference:
the cost model's per-member intra / inter-node bytes of the whole matrix, and plain numpy
sums."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import blockmatrix
from moesim.blockmatrix import BlockDiag, _unscaled_io, block_sums
from moesim.costmodel import _intra_inter_io

needs_c = pytest.mark.skipif(blockmatrix._block_sums_c is None,
                             reason="moesim._block_sums not built (no C compiler)")


def _stack(X: int, R: int, K: int, dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=(X, R, K)).astype(dtype)


@needs_c
@pytest.mark.parametrize("R,K,g", [(16, 16, 4), (16, 8, 4), (16, 4, 8), (8, 8, 8), (12, 6, 3),
                                   (32, 16, 8)])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_sums_equal_numpy(R, K, g, dtype):
    tok = _stack(6, R, K, dtype)
    row, col, diag, node_row, node_col, totals, _ = block_sums(tok, K, g, 3)
    np.testing.assert_array_equal(row, tok.sum(axis=2))
    np.testing.assert_array_equal(col, tok.reshape(6, R // K, K, K).sum(axis=2).reshape(6, R))
    r = np.arange(R)
    np.testing.assert_array_equal(diag, tok[:, r, r % K])
    np.testing.assert_array_equal(totals, tok.reshape(2, 3, R, K).sum(axis=1))
    if K % g == 0:
        same = (r[:, None] // g) == ((r[:, None] // K) * K + np.arange(K)[None]) // g
        np.testing.assert_array_equal(node_row, (tok * same).sum(axis=2))
        col_same = (tok * same).reshape(6, R // K, K, K).sum(axis=2).reshape(6, R)
        np.testing.assert_array_equal(node_col, col_same)


@pytest.mark.parametrize("R,K,g", [(16, 16, 4), (16, 8, 4), (16, 4, 8), (32, 16, 8)])
@pytest.mark.parametrize("use_c", [True, False])
def test_io_equals_the_dense_matrix(monkeypatch, R, K, g, use_c):
    """Per member of each dense matrix: the cost model's intra / inter-node out / in bytes."""
    if use_c and blockmatrix._block_sums_c is None:
        pytest.skip("moesim._block_sums not built")
    if not use_c:
        monkeypatch.setattr(blockmatrix, "_block_sums_c", None)
    tok = _stack(4, R, K, np.int64, seed=1)
    got = _unscaled_io(tok, K, g)
    for x in range(4):
        dense = np.asarray(BlockDiag(tok[x], 1, K).dense())
        want = _intra_inter_io(dense, np.arange(R) // g, g)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a[x], b)


def test_no_kernel_or_other_dtypes_fall_back(monkeypatch):
    tok = _stack(2, 8, 8, np.int64)
    assert block_sums(tok.astype(np.float64), 8, 4) is None
    monkeypatch.setattr(blockmatrix, "_block_sums_c", None)
    assert block_sums(tok, 8, 4) is None


@needs_c
@pytest.mark.parametrize("R,K,S,g", [(16, 16, 2, 4), (16, 8, 4, 4), (16, 4, 2, 8), (12, 6, 3, 3)])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_slot_sums_equal_the_rank_matrix(R, K, S, g, dtype):
    """Per-slot matrices: slot column sums, and every rank-level sum equal to the sums of
    the rank matrix (each rank's S slots added) — what routing's ``rank_matrix`` builds."""
    kept = _stack(6, R, K * S, dtype, seed=2)
    rank = kept.reshape(6, R, K, S).sum(axis=3)
    rows = np.array([0, 0, 1, -1, 1, 2])
    got = block_sums(kept, K, g, slots=S, acc_rows=rows, acc_count=3)
    want = block_sums(rank.astype(np.int64), K, g, 1)
    for a, b in zip(got[:5], want[:5], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        got[6], kept.reshape(6, R // K, K, K * S).sum(axis=2).reshape(6, R * S))
    np.testing.assert_array_equal(got[5], [rank[[0, 1]].sum(0), rank[[2, 4]].sum(0), rank[5]])
