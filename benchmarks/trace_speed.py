"""Streaming traces: generation rate and peak memory, before (in memory) and after (streamed).

Usage::

    python benchmarks/trace_speed.py [--iterations 100] [--ranks 256 2048] [--dir DIR]
    python benchmarks/trace_speed.py --iterations 10 --ranks 256 512     # a quick look

DeepSeek-V3-shaped synthetic traces (58 MoE layers, 256 experts, top-8, 4096 tokens per rank,
one micro-batch per iteration). Every case runs in its own process and reports its wall time,
CPU time and peak resident memory (``ru_maxrss`` of that process):

- ``synth, in memory`` — today's path: :func:`moesim.traces.synthesize` then
  :func:`moesim.traces.save_trace` to a directory (the whole ``[T, L, R, E]`` array in RAM);
  run only where it fits (``--max-memory-GB``, default 8);
- ``synth, streamed`` — :func:`moesim.traces.synth_stream.synthesize_to_dir` (chunks of passes
  through :class:`moesim.traces.io.TraceDirWriter`, fsync at the end);
- ``trace info`` — ``moesim trace info`` on the streamed directory (chunked validation and
  statistics);
- ``simulate`` — ``static_ep`` on the streamed directory, ``--sim-iterations`` iterations
  (the simulator releases each iteration's mapped pages), only at ranks ≤ ``--sim-max-ranks``.

Rates are counts (cells of ``[T, L, R, E]``) per second of wall time. The traces are deleted at
the end unless ``--keep``. ``--dir /dev/shm/...`` (RAM-backed) takes the disk out of the
figures: the streamed writer's int64 output (8 bytes per count) is disk-bound otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
case, ranks, iterations, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from moesim.traces.synth import SynthConfig
cfg = SynthConfig(num_layers=58, num_ranks=ranks, num_experts=256, top_k=8,
                  tokens_per_rank=4096, micro_batches_per_iteration=1, num_iterations=iterations,
                  model="deepseek-v3-shaped")
t0, c0 = time.perf_counter(), time.process_time()
if case == "old":
    from moesim.traces import save_trace, synthesize
    save_trace(synthesize(cfg, rng=0), path)
elif case == "new":
    from moesim.traces.synth_stream import synthesize_to_dir
    synthesize_to_dir(cfg, path, rng=0)
elif case == "info":
    from moesim.cli import main
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        main(["trace", "info", path])
elif case == "sim":
    from moesim.simulate import simulate
    from moesim.specs import load_cluster, load_model
    model = load_model("deepseek-v3")
    cluster = load_cluster("h100-32x8").with_shape(ranks // 8)
    simulate(path, model, cluster, "static_ep", iterations=(0, int(sys.argv[5])),
             progress=False, allow_oom=True)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""

NAMES = {"old": "synth, in memory", "new": "synth, streamed", "info": "trace info",
         "sim": "simulate"}


def run_case(case: str, ranks: int, iterations: int, path: Path, *extra: str) -> dict:
    """One case in a fresh process: its JSON line plus the element count."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(ranks), str(iterations),
                          str(path), *extra], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{case} at {ranks} ranks failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--ranks", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moesim-trace-speed"))
    ap.add_argument("--max-memory-GB", type=float, default=8.0,
                    help="run the in-memory generator only where its array fits in this")
    ap.add_argument("--sim-iterations", type=int, default=3)
    ap.add_argument("--sim-max-ranks", type=int, default=256)
    ap.add_argument("--cases", nargs="+", choices=tuple(NAMES), default=tuple(NAMES),
                    help="which cases to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the generated traces")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{'case':<18} {'ranks':>6} {'iters':>6} {'cells':>9} {'wall s':>8} {'cpu s':>8} "
          f"{'M cells/s':>10} {'peak RSS GB':>12}")
    try:
        for ranks in args.ranks:
            cells = 58 * ranks * 256 * args.iterations
            cases = ["old"] if cells * 8 / 1e9 <= args.max_memory_GB else []
            cases += ["new", "info"] + (["sim"] if ranks <= args.sim_max_ranks else [])
            for case in (c for c in cases if c in args.cases):
                path = args.dir / f"{'old' if case == 'old' else 'new'}-{ranks}"
                extra = (str(args.sim_iterations),) if case == "sim" else ()
                r = run_case(case, ranks, args.iterations, path, *extra)
                n = cells if case != "sim" else 58 * ranks * 256 * args.sim_iterations
                print(f"{NAMES[case]:<18} {ranks:>6} {args.iterations:>6} {n:>9.2e} "
                      f"{r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {n / r['wall_s'] / 1e6:>10.1f} "
                      f"{r['rss_GB']:>12.2f}", flush=True)
                if case == "old":
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\nDeepSeek-V3 shape (58 layers, 256 experts, top-8, 4096 tokens/rank), one pass per "
          f"iteration; each case a fresh process (peak RSS = its ru_maxrss); {time.ctime()}")


if __name__ == "__main__":
    main()
