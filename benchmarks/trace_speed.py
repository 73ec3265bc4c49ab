"""Streaming traces: generation rate per count and peak memory, before (in memory) and after
(streamed), at the DeepSeek-V3 shape.

Usage::

    python benchmarks/trace_speed.py                       # 2048 ranks x 10 iterations
    python benchmarks/trace_speed.py --iterations 100 --cases new info   # 2048 x 100, streamed
    python benchmarks/trace_speed.py --iterations 10 --ranks 256 512     # a quick look

DeepSeek-V3-shaped synthetic traces (58 MoE layers, 256 experts, top-8, 4096 tokens per rank,
one micro-batch per iteration). Every case runs in its own process and reports its wall time,
CPU time and peak resident memory (``ru_maxrss`` of that process):

- ``before: in memory`` — the generator as it was: :func:`moesim.traces.synthesize` (the whole
  ``[T, L, R, E]`` array in RAM, unchanged), validated, then the int64 directory exactly as
  ``save_trace`` wrote it before the narrow on-disk counts (``np.save``, 8 bytes per count,
  no fsync); run only where the array fits in ``--max-memory-GB`` (default 8);
- ``after: streamed`` — :func:`moesim.traces.synth_stream.synthesize_to_dir`: a pass at a time
  through :class:`moesim.traces.io.TraceDirWriter`, the C kernel (``traces/_synth_c.c``),
  uint16 counts (2 bytes each), each chunk flushed to disk (``fdatasync``) by the writer thread
  while the next is drawn;
- ``after: numpy loop`` — the same with the C kernel switched off (the fallback where no C
  compiler was present; the same counts);
- ``trace info`` — ``moesim trace info`` on the streamed directory (chunked validation and
  statistics);
- ``simulate`` — ``static_ep`` on the streamed directory, ``--sim-iterations`` iterations
  (an iteration at a time), only at ranks ≤ ``--sim-max-ranks``.

``ns/count`` is wall time per count (cell of ``[T, L, R, E]``), ``cpu ns`` CPU time per count
(all threads; less sensitive to other jobs on a shared machine); ``x before`` divides the
``before`` row's figures by the row's (wall / CPU). Threads: the generators use up to 8 (numpy
releases the GIL, so does the C kernel); the machine's cores are printed with the table. The
traces are deleted at the end unless ``--keep``. ``--dir /dev/shm/...`` (RAM-backed) takes the
disk out.
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
if case == "old":                  # save_trace's directory form as it was: int64, np.save
    import os, numpy as np
    from moesim.traces import synthesize
    from moesim.traces.io import _meta_bytes
    from moesim.traces.validate import validate
    trace = validate(synthesize(cfg, rng=0))
    os.makedirs(path)
    np.save(os.path.join(path, "counts.npy"), np.asarray(trace.counts_TLRE, dtype=np.int64))
    with open(os.path.join(path, "meta.json"), "wb") as fh:
        fh.write(_meta_bytes(trace))
elif case in ("new", "numpy"):
    from moesim.traces import synth_kernel
    from moesim.traces.synth_stream import synthesize_to_dir
    if case == "numpy":
        synth_kernel._synth_c = None
    elif synth_kernel._synth_c is None:
        raise SystemExit("the C kernel moesim.traces._synth_c is not built")
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

NAMES = {"old": "before: in memory", "new": "after: streamed", "numpy": "after: numpy loop",
         "info": "trace info", "sim": "simulate"}


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
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2048])
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
    print(f"{'case':<18} {'ranks':>6} {'iters':>6} {'counts':>9} {'wall s':>8} {'cpu s':>8} "
          f"{'ns/count':>9} {'cpu ns':>8} {'M counts/s':>11} {'x before':>11} "
          f"{'peak RSS GB':>12}")
    try:
        for ranks in args.ranks:
            _run_shape(args, ranks)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\nDeepSeek-V3 shape (58 layers, 256 experts, top-8, 4096 tokens/rank), one pass per "
          f"iteration; each case a fresh process (peak RSS = its ru_maxrss); {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.1f} at the end; {time.ctime()}")


def _run_shape(args: argparse.Namespace, ranks: int) -> None:
    """Every case at one rank count, one table row each."""
    cells = 58 * ranks * 256 * args.iterations
    cases = ["old"] if cells * 8 / 1e9 <= args.max_memory_GB else []
    cases += ["new", "numpy", "info"] + (["sim"] if ranks <= args.sim_max_ranks else [])
    before = None
    for case in (c for c in cases if c in args.cases):
        path = args.dir / f"{'new' if case in ('info', 'sim') else case}-{ranks}"
        extra = (str(args.sim_iterations),) if case == "sim" else ()
        r = run_case(case, ranks, args.iterations, path, *extra)
        n = cells if case != "sim" else 58 * ranks * 256 * args.sim_iterations
        ns, cpu_ns = r["wall_s"] / n * 1e9, r["cpu_s"] / n * 1e9
        before = (ns, cpu_ns) if case == "old" else before
        ratio = (f"{before[0] / ns:.1f} / {before[1] / cpu_ns:.1f}"
                 if before and case in ("new", "numpy") else "-")
        print(f"{NAMES[case]:<18} {ranks:>6} {args.iterations:>6} {n:>9.2e} "
              f"{r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {ns:>9.2f} {cpu_ns:>8.2f} "
              f"{n / r['wall_s'] / 1e6:>11.1f} {ratio:>11} {r['rss_GB']:>12.2f}", flush=True)
        if case in ("old", "numpy"):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
