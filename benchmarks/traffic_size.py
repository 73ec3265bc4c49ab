"""Size of a run's ``traffic.npz`` on disk: the sparse ``coo-1`` file moesim writes
(:mod:`moesim.traffic_io`) against the dense ``traffic_bytes[I, F, R, R]`` it wrote before
(``np.savez_compressed`` of the same numbers, float32), on :mod:`sim_speed`'s cases::

    OMP_NUM_THREADS=1 python benchmarks/traffic_size.py                 # ep 256 and 2048
    OMP_NUM_THREADS=1 python benchmarks/traffic_size.py --case ep --gpus 2048 --iterations 3

Columns: ``nnz`` the non-zero (iteration, phase, src, dst) entries; ``dense MiB`` the dense
array in memory (``I·F·R²·4`` bytes, what each reader used to load); ``dense npz`` and
``sparse npz`` the files on disk (MiB); ``sim s`` the wall seconds of the ``simulate`` call
with its output directory (all files, not only traffic).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from sim_speed import setup  # noqa: E402

from moesim import traffic_io  # noqa: E402
from moesim.simulate import simulate  # noqa: E402

CASES = (("ep", 256, 10), ("ep", 2048, 3))
MiB = 2**20


def measure(case: str, gpus: int, iterations: int) -> dict:
    """Simulate one case into a temporary run directory and size its traffic file."""
    kw, _ = setup(case, gpus, iterations, "dirichlet", 16)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate(out_dir=Path(tmp) / "run", **kw)
        sim_s = time.perf_counter() - t0
        path = Path(tmp) / "run" / "traffic.npz"
        sparse = path.stat().st_size
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    dense_IFRR = traffic_io.dense_IFRR(arrays)
    buf = io.BytesIO()
    np.savez_compressed(buf, traffic_bytes=dense_IFRR, iterations=arrays["iterations"])
    return {"case": f"{case} {gpus} x {iterations}", "nnz": len(arrays["traffic_value"]),
            "dense_MiB": dense_IFRR.nbytes / MiB, "dense_npz_MiB": len(buf.getvalue()) / MiB,
            "sparse_npz_MiB": sparse / MiB, "simulate_s": sim_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=("ep", "layout"))
    ap.add_argument("--gpus", type=int)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    cases = [(args.case, args.gpus, args.iterations)] if args.case else CASES
    print(f"{'case':<18}{'nnz':>12}{'dense MiB':>12}{'dense npz':>12}{'sparse npz':>12}"
          f"{'sim s':>8}")
    for case, gpus, its in cases:
        r = measure(case, gpus, its)
        print(f"{r['case']:<18}{r['nnz']:>12}{r['dense_MiB']:>12.1f}{r['dense_npz_MiB']:>12.2f}"
              f"{r['sparse_npz_MiB']:>12.2f}{r['simulate_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
