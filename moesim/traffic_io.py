"""Per-GPU-pair traffic on disk: sparse coordinates, read back as the dense view on demand.

Shape legend: ``I`` iterations, ``F`` phases (:data:`moesim.ops.PHASES`), ``R`` ranks (world),
``N`` non-zero (iteration, phase, src, dst) entries.

``traffic.npz`` (and each ``parts/part-*.npz``) holds, since format ``coo-1``::

    traffic_iteration[N]  int32    the trace iteration of each entry (not a position, so parts
                                   concatenate as they are)
    traffic_phase[N]      uint8    index into PHASES
    traffic_src[N]        int32    sending GPU
    traffic_dst[N]        int32    receiving GPU
    traffic_value[N]      float32  bytes src sent dst in that phase of that iteration
    traffic_world[I]      int32    the world size of each iteration (R)
    iterations[I]         int64    (traffic.npz only; parts keep theirs beside)

Entries are sorted by (iteration, phase, src, dst) and hold only non-zero bytes, so a run costs
what moves, not ``I·F·R²`` (a 2048-GPU dense array is 160 MiB per iteration). Runs written
before hold the dense ``traffic_bytes[I, F, R, R]``; :func:`dense_IFRR` reads either, and
:func:`coo_from_dense` converts a dense one (a resumed run's older parts).

Example: one iteration (7) in which GPU 0 sent GPU 1 4096 bytes in ``dispatch`` is
``traffic_iteration=[7] traffic_phase=[1] traffic_src=[0] traffic_dst=[1]
traffic_value=[4096.] traffic_world=[2]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moesim.ops import PHASES

FORMAT = "coo-1"
COO_KEYS = ("traffic_iteration", "traffic_phase", "traffic_src", "traffic_dst", "traffic_value",
            "traffic_world")
DENSE_KEY = "traffic_bytes"


def coo_FRR(traffic: Any, world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(phase_N, src_N, dst_N, bytes_N)`` of one iteration's traffic, non-zero entries only,
    sorted by (phase, src, dst), bytes float64. ``traffic``: a :class:`moesim.traffic.Traffic`
    (read from its blocks and edges, never densified) or any ``[F, R, R]`` array."""
    from moesim.traffic import Traffic

    if not isinstance(traffic, Traffic):
        dense = np.asarray(traffic, dtype=np.float64)
        f, s, d = np.nonzero(dense)
        return f, s, d, dense[f, s, d]
    R = world
    keys, vals = [], []
    for K, loc in traffic.blocks.items():      # loc[F, R, K]: row r's bytes to its own block
        f, r, k = np.nonzero(loc)
        dst = (r // K) * K + k
        keep = r != dst                         # self traffic is left out
        keys.append((f[keep] * R + r[keep]) * R + dst[keep])
        vals.append(loc[f, r, k][keep])
    for phase, src, dst, val in traffic.edges:
        keys.append((phase * R + np.asarray(src, np.int64)) * R + np.asarray(dst, np.int64))
        vals.append(np.asarray(val, np.float64))
    if not keys:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    total = np.bincount(inv.reshape(-1), weights=np.concatenate(vals), minlength=len(uniq))
    nz = total != 0
    uniq, total = uniq[nz], total[nz]
    return uniq // (R * R), (uniq // R) % R, uniq % R, total


def record_arrays(iteration: int, traffic: Any, world: int) -> dict[str, np.ndarray]:
    """One iteration's traffic as the ``coo-1`` arrays (module docstring)."""
    f, s, d, v = coo_FRR(traffic, world)
    return {"traffic_iteration": np.full(len(f), iteration, np.int32),
            "traffic_phase": f.astype(np.uint8), "traffic_src": s.astype(np.int32),
            "traffic_dst": d.astype(np.int32), "traffic_value": v.astype(np.float32),
            "traffic_world": np.array([world], np.int32)}


def coo_from_dense(iterations_I: np.ndarray, traffic_IFRR: np.ndarray) -> dict[str, np.ndarray]:
    """The ``coo-1`` arrays of a dense ``[I, F, R, R]`` (an older run's or part's)."""
    dense = np.asarray(traffic_IFRR)
    i, f, s, d = np.nonzero(dense)
    its = np.asarray(iterations_I, dtype=np.int64)
    return {"traffic_iteration": its[i].astype(np.int32), "traffic_phase": f.astype(np.uint8),
            "traffic_src": s.astype(np.int32), "traffic_dst": d.astype(np.int32),
            "traffic_value": dense[i, f, s, d].astype(np.float32),
            "traffic_world": np.full(len(its), dense.shape[-1], np.int32)}


def upgrade_part(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A part's arrays with a dense ``traffic_bytes`` replaced by the ``coo-1`` arrays."""
    if DENSE_KEY not in arrays:
        return arrays
    out = {k: v for k, v in arrays.items() if k != DENSE_KEY}
    return out | coo_from_dense(arrays["iterations"], arrays[DENSE_KEY])


def has_traffic(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a run's arrays hold traffic, in either format."""
    return DENSE_KEY in arrays or all(k in arrays for k in COO_KEYS)


def world_size(arrays: Mapping[str, np.ndarray]) -> int:
    """R of the stored traffic (1 when there is none)."""
    if DENSE_KEY in arrays:
        return int(arrays[DENSE_KEY].shape[-1])
    if has_traffic(arrays) and len(arrays["traffic_world"]):
        return int(np.max(arrays["traffic_world"]))
    return 1


def num_iterations(arrays: Mapping[str, np.ndarray]) -> int:
    """I: how many iterations the stored traffic covers (0 when there is none)."""
    if DENSE_KEY in arrays:
        return int(arrays[DENSE_KEY].shape[0])
    return len(arrays["traffic_world"]) if has_traffic(arrays) else 0


def _positions(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """Each entry's position in ``iterations`` and the number of iterations ``I``."""
    its = np.asarray(arrays.get("iterations", np.unique(arrays["traffic_iteration"])), np.int64)
    order = np.argsort(its, kind="stable")
    at = np.searchsorted(its[order], arrays["traffic_iteration"])
    return order[np.minimum(at, max(len(its) - 1, 0))], len(its)


def dense_IFRR(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The dense ``[I, F, R, R]`` float32 view of a run's traffic (either format), iterations
    in the order of ``arrays["iterations"]``."""
    if DENSE_KEY in arrays:
        return np.asarray(arrays[DENSE_KEY])
    pos, I = _positions(arrays)
    R = world_size(arrays)
    out = np.zeros((I, len(PHASES), R, R), np.float32)
    out[pos, arrays["traffic_phase"], arrays["traffic_src"], arrays["traffic_dst"]] = \
        arrays["traffic_value"]
    return out


def summed(arrays: Mapping[str, np.ndarray], keep_iterations: bool) -> np.ndarray:
    """Traffic summed without the dense ``[I, F, R, R]``: over iterations → ``[F, R, R]``
    (``keep_iterations`` False), or over phases → ``[I, R, R]`` (True), float64."""
    if DENSE_KEY in arrays:
        dense = np.asarray(arrays[DENSE_KEY], np.float64)
        return dense.sum(axis=1) if keep_iterations else dense.sum(axis=0)
    pos, I = _positions(arrays)
    R = world_size(arrays)
    lead = (pos, I) if keep_iterations else (arrays["traffic_phase"].astype(np.int64),
                                            len(PHASES))
    out = np.zeros((lead[1], R, R))
    np.add.at(out, (lead[0], arrays["traffic_src"], arrays["traffic_dst"]),
              arrays["traffic_value"].astype(np.float64))
    return out
