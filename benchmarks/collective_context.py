"""How much a gloo collective's time depends on the work before it (CPU, 2 ranks).

    python benchmarks/collective_context.py [--rounds 5]    # ~10 s; prints a table

`moesim calibrate` times each collective after 1 ms of cache-resident busy work, a 64 × 64
matmul, in `calibrate_collectives._time_collective`. In a run, a collective follows several ms of
GEMMs whose data evicts the caches. This benchmark times the same executor operations through
that same function, alternating four kinds of preceding work: short or long (1 or 10 ms), and
cache-resident or cache-evicting (64 × 64, or 512 × 256 × 2048 matmuls). The operations are:
- the token all-to-all of dispatch + combine, 1 MiB per rank, halved;
- a 256 B all-reduce: the routing-count exchange;
- a 2 MiB all-reduce: the dense grad sync.

Each cell is the median over rounds of the op's median of 15 calls. In brackets is the factor
over the calibration's context.

Measured on the 2-vCPU development VM (2026-11-26), two runs of `--rounds 5`:
- every other context is slower than the calibration's: the all-to-all by 1.2–1.4×, the
  2 MiB all-reduce by 1.3–2.4× and the 256 B all-reduce by 1.8–9.4×;
- length alone (10 ms of the small matmul) and eviction alone (1 ms of the large one) each
  account for most of it.

This matches the runs, whose collectives take about twice their calibrated time.

Moving the calibration to 3 ms of the model's expert GEMM before each collective did not
reproduce the runs: world-size-2 MAPE went from 12.2 % to 11.3 %, within noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

CASES = (("token all-to-all, 1 MiB", "all_to_all", 1 << 20),
         ("all-reduce, 256 B", "all_reduce", 256),
         ("all-reduce, 2 MiB", "all_reduce", 2 << 20))
CONTEXTS = (("1 ms, 64x64 matmul (calibration)", 1e-3, (64, 64, 64)),
            ("10 ms, 64x64 matmul", 10e-3, (64, 64, 64)),
            ("1 ms, 512x256x2048 matmul", 1e-3, (512, 256, 2048)),
            ("10 ms, 512x256x2048 matmul", 10e-3, (512, 256, 2048)))


def rank_main(argv: list[str]) -> int:
    """One rank: every case after every context, ``--rounds`` times, alternating."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from moesim.executor.calibrate_collectives import _compiled, _time_collective, _token_a2a
    from moesim.executor.interpreter import RankExecutor
    from moesim.executor.worker import init_distributed
    from moesim.ops import AllReduce
    from moesim.specs import load_model

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--heartbeat-dir", default=None)
    args = p.parse_args(argv)
    rank, world = init_distributed(120.0)
    model = load_model("small-cpu")
    ex = RankExecutor(model, rank, world, torch.device("cpu"))
    members = list(range(world))
    ex.groups.ensure(SimpleNamespace(num_ranks=world, ops=[AllReduce(
        phase="grad_sync", groups=(np.arange(world),), bytes_G=np.zeros(1))]))
    group = ex.groups.get(tuple(members))
    fns = [(_token_a2a(model, n, members, group), 2) if kind == "all_to_all"
           else (_compiled(ex, kind, n, members), 1) for _, kind, n in CASES]
    works = [(torch.randn(m, k), torch.randn(k, n)) for _, _, (m, k, n) in CONTEXTS]
    t = np.zeros((args.rounds, len(CASES), len(CONTEXTS)))
    for r in range(args.rounds):
        for c, (fn, div) in enumerate(fns):
            for x, (_, busy, _) in enumerate(CONTEXTS):
                t[r, c, x] = _time_collective(fn, 15, busy, 2e-4, works[x]) / div
    if rank == 0:
        Path(args.out).write_text(json.dumps(np.median(t, axis=0).tolist()))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    from moesim.executor.launch import launch

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.json"
        launch(["--out", str(out), "--rounds", str(args.rounds)], 2, Path(tmp) / "run",
               module="benchmarks.collective_context", backend="gloo")
        t = json.loads(out.read_text())
    print(f"{'operation':<26}" + "".join(f"{name:>36}" for name, _, _ in CONTEXTS))
    for (name, _, _), row in zip(CASES, t, strict=True):
        print(f"{name:<26}" + "".join(f"{v * 1e3:>22.3f} ms ({v / row[0]:4.2f}x)" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]) if "--heartbeat-dir" in sys.argv else main())
