"""traffic.npz on disk (moesim.traffic_io): sparse coordinates that read back as the dense
[I, F, R, R] view, the older dense files still load, and a sparse run's file is small."""

from __future__ import annotations

import io

import numpy as np

from moesim import traffic_io
from moesim.blockmatrix import BlockDiag
from moesim.ops import PHASES
from moesim.results import load_run
from moesim.traffic import Traffic

DISPATCH, COMBINE = PHASES.index("dispatch"), PHASES.index("combine")


def _sparse_IFRR(rng, I=3, R=6) -> np.ndarray:
    dense = rng.random((I, len(PHASES), R, R)).astype(np.float32) * 1e6
    dense *= rng.random(dense.shape) < 0.2
    return dense


def test_dense_round_trip_is_exact():
    dense = _sparse_IFRR(np.random.default_rng(0))
    its = np.array([4, 5, 9])
    arrays = traffic_io.coo_from_dense(its, dense) | {"iterations": its}
    np.testing.assert_array_equal(traffic_io.dense_IFRR(arrays), dense)
    np.testing.assert_allclose(traffic_io.summed(arrays, keep_iterations=True),
                               dense.sum(axis=1, dtype=np.float64))
    np.testing.assert_allclose(traffic_io.summed(arrays, keep_iterations=False),
                               dense.sum(axis=0, dtype=np.float64))


def test_traffic_object_reads_without_densifying_and_equals_dense():
    R, K = 8, 4
    t = Traffic(R)
    local_RK = np.random.default_rng(1).random((R, K)) * 100
    t.add_blocks(DISPATCH, BlockDiag(local_RK, rows_per_block=K), 0)
    t.add_edges(COMBINE, np.array([0, 3, 7, 7]), np.array([5, 3, 1, 1]),
                np.array([10.0, 99.0, 2.0, 3.0]))  # a self edge (dropped), a repeat (summed)
    arrays = traffic_io.record_arrays(2, t, R) | {"iterations": np.array([2])}
    np.testing.assert_allclose(traffic_io.dense_IFRR(arrays)[0], np.asarray(t, np.float32),
                               rtol=1e-6)
    assert np.all(arrays["traffic_src"] != arrays["traffic_dst"])


def test_run_directory_round_trip_and_old_dense_file(tmp_path):
    from tests.analysis.conftest import write_run

    run_dir = write_run(tmp_path / "run", iterations=6, R=4)
    run = load_run(run_dir)
    assert "traffic_bytes" not in run.arrays and run.has("traffic_bytes")
    dense = run["traffic_bytes"]
    assert dense.shape == (6, len(PHASES), 4, 4) and dense[:, DISPATCH].sum() > 0
    # the file as moesim wrote it before: one dense array beside the iterations
    with np.load(run_dir / "traffic.npz") as z:
        its = z["iterations"]
    buf = io.BytesIO()
    np.savez_compressed(buf, traffic_bytes=dense, iterations=its)
    (run_dir / "traffic.npz").write_bytes(buf.getvalue())
    old = load_run(run_dir)
    np.testing.assert_array_equal(old["traffic_bytes"], dense)
    assert traffic_io.world_size(old.arrays) == 4 and traffic_io.num_iterations(old.arrays) == 6


def test_old_dense_part_is_upgraded():
    dense = _sparse_IFRR(np.random.default_rng(2), I=2)
    its = np.array([0, 1])
    part = traffic_io.upgrade_part({"traffic_bytes": dense, "iterations": its})
    assert "traffic_bytes" not in part
    np.testing.assert_array_equal(traffic_io.dense_IFRR(part), dense)


def test_sparse_case_is_far_smaller_than_dense_on_disk():
    R, K = 256, 8   # EP groups of 8 over 256 GPUs: 1/32 of the pairs ever move bytes
    t = Traffic(R)
    local_RK = np.random.default_rng(3).random((R, K)) * 1e6
    t.add_blocks(DISPATCH, BlockDiag(local_RK, rows_per_block=K), 0)
    coo = traffic_io.record_arrays(0, t, R)

    def npz_size(arrays):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return len(buf.getvalue())

    dense_IFRR = np.asarray(t, np.float32)[None]
    sparse = npz_size(coo)
    # the dense array the file used to hold (and every reader loaded) is 2.6 MB; compressed, its
    # zeros shrink to ~1/1000, so the old file was small here but its array never was
    assert sparse * 100 < dense_IFRR.nbytes, (sparse, dense_IFRR.nbytes)
    assert sparse < npz_size({"traffic_bytes": dense_IFRR}), sparse
