"""How long ``moesim trace regroup`` takes, and what it keeps, on a real or synthetic trace.

::

    OMP_NUM_THREADS=1 python benchmarks/regroup_speed.py [--trace DIR_OR_NPZ] [--ranks 4,24,64]

Default trace: the SmartMoE-AE sample in ``../shared/data/smartmoe-trace`` when present (imported
first; GPL-3.0, read from outside the repository), else the bundled synthetic trace. Prints one
row per target rank count: wall time of :func:`moesim.traces.regroup.regroup_ranks`, tokens per
rank after, whether the trace stays fixed-k, and the trace statistics that depend on ranks
(``gpu_imbalance`` at the new rank count, ``rank_corr``) beside the source's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moesim.traces import bundled_trace_path, import_smartmoe, load_trace
from moesim.traces.regroup import regroup_ranks
from moesim.traces.stats import trace_stats

SMARTMOE = Path(__file__).resolve().parents[2] / "shared" / "data" / "smartmoe-trace"


def _load(path: str | None):
    if path:
        p = Path(path)
        return (import_smartmoe(p) if p.is_dir() and any(p.glob("table_iter*"))
                else load_trace(p)), str(p)
    if (SMARTMOE / "table_iter1_rank0.log").exists():
        return import_smartmoe(SMARTMOE), f"SmartMoE-AE sample ({SMARTMOE})"
    return load_trace(bundled_trace_path()), "bundled synthetic trace"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help="trace file/dir or SmartMoE folder")
    parser.add_argument("--ranks", default="4,24,64", help="comma-separated rank counts")
    args = parser.parse_args()
    trace, name = _load(args.trace)
    T, L, R, E = trace.counts_TLRE.shape
    print(f"trace: {name}: {T} passes x {L} layers x {R} ranks x {E} experts, "
          f"{trace.meta.tokens_per_rank} tokens/rank")
    base = trace_stats(trace).overall
    print(f"{'ranks':>6} {'seconds':>9} {'tokens/rank':>12} {'fixed-k':>8} {'max/mean':>9} "
          f"{'gpu_imb':>8} {'rank_corr':>10}")
    print(f"{R:>6} {'(source)':>9} {trace.meta.tokens_per_rank:>12} "
          f"{str(not trace.meta.variable_k):>8} {base['max_mean']:>9.3f} "
          f"{base['gpu_imbalance']:>8.3f} {base['rank_corr']:>10.3f}")
    for n in (int(x) for x in args.ranks.split(",") if x.strip()):
        start = time.perf_counter()
        out = regroup_ranks(trace, n)
        seconds = time.perf_counter() - start
        s = trace_stats(out).overall
        print(f"{n:>6} {seconds:>9.2f} {out.meta.tokens_per_rank:>12} "
              f"{str(not out.meta.variable_k):>8} {s['max_mean']:>9.3f} "
              f"{s['gpu_imbalance']:>8.3f} {s['rank_corr']:>10.3f}")


if __name__ == "__main__":
    main()
