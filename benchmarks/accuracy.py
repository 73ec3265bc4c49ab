"""Accuracy of the simulator against the executor on this machine (CPU + gloo).

    python benchmarks/accuracy.py --out runs/accuracy            # full grid (16 configs)
    python benchmarks/accuracy.py --out runs/acc-smoke --quick   # 2 configs, 2 iterations
    # one GPU (what benchmarks/gpu_accuracy.sh runs):
    python benchmarks/accuracy.py --out runs/gpu --backend nccl --world-sizes 1 --model small-gpu

For each world size (2 and 4) and every (trace, policy + capacity factor) it calibrates the
machine (``moesim calibrate``, ~20 s) right before the configuration's runs — the VM this was
built on drifts by up to ~20 % over minutes (other tenants), so a profile taken at the start
describes a different machine ten minutes later — then runs the executor and the simulator on
the same trace slice (:func:`moesim.executor.validate.run_config`). ``--calibrate-once`` takes
one profile per world size; ``--profile-dir`` reuses ``cpu-gloo-w{N}.toml`` files. It
reports per-iteration step-time MAPE and max error, plus per-phase errors, as a table,
``accuracy.csv`` and ``predicted_vs_measured.png``. Target: step-time MAPE ≤ 10 % at world
size 2.

Traces (both fitted to the model by :func:`moesim.executor.validate.prepare_trace`):

- ``synth`` — a synthetic trace with the model's shape and a skewed, drifting popularity;
- ``smartmoe`` — the real SmartMoE-AE training trace (16 ranks, 24 layers, 32 experts, top-2,
  4 micro-batches of 2048 tokens): ranks summed in groups of 16/N, the first 2 layers kept,
  experts summed in groups of 4 (32 → 8), the first 2 micro-batches of each iteration kept, and
  every row scaled to the model's tokens per rank × top-k (skipped with a note when
  ``../shared/data/smartmoe-trace`` is absent).

Policies: static EP dropless and with capacity factors 1.0 and 2.0 (drops), SwiftMoE (its
default cf 1.0, one spare slot per rank, re-placed every iteration): 2 world sizes × 2 traces ×
4 = 16 configurations.

Parallel layouts (``--layouts``, at world size 2 only; static EP dropless; both traces): ``tp2``
— ``--parallel tp=2,sp=true`` (TP 2 with sequence parallelism, EP 2 over the same ranks); ``pp2``
— ``--parallel pp=2,pp_schedule=1f1b`` with 4 micro-batches per iteration (each stage one rank,
its trace one source rank: the SmartMoE sample's 16 ranks summed into one). Their tables add
per-stage rows (``s0 expert``, …) for PP. ``--layouts-only`` runs just these.

Model: ``small-cpu`` (H 256, 8 experts of F 512), whose steps (~0.2 s at world size 2) are
GEMM-bound; with ``--model tiny-cpu`` (~30 ms steps) about 60 % of a step is gloo's per-message
latency (~0.3 ms per collective on loopback TCP) and interpreter time, which vary ±25 % from run
to run on 2 vCPUs.

Profile: ``moesim calibrate``'s microbenchmarks, then its context stage
(``--context-iterations``, default 6: calibrate's own workload — a synthetic trace with its own
seed — run by the executor, giving each op class its in-step / microbenchmark factor; see
:mod:`moesim.executor.calibrate_context`). With a profile per configuration the workload is run
again right after the configuration's runs and the factors pool both samples
(:func:`moesim.executor.calibrate_context.remeasure_context`; ``--no-bracket`` skips it): the
machine's speed drifts over minutes, and a calibration on one side of the runs catches one
moment of it.
The validation runs are never fitted.

Measurement hygiene: one intra-op thread per rank, ``--warmup`` untimed runs of
the first iteration, each configuration is run ``--repeats`` times with the median taken per
iteration, calibration and every executor run first wait (up to ``--quiet-wait-s``) for
other processes to leave the CPUs idle, and all of it runs at a raised scheduling priority
(``--nice``, inherited by the ranks) so other jobs preempt it less. Measurements on a shared
or oversubscribed machine are still noisy: run it on an otherwise idle machine (the load
average is printed before each world size and at the end).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moesim.errors import MoesimError

POLICIES = ("static_ep", "static_ep:capacity_factor=1.0", "static_ep:capacity_factor=2.0",
            "swiftmoe:slots_per_rank={spr}:capacity_factor=1.0")
# name -> (--parallel, micro-batches per iteration of its trace; None: the model's)
LAYOUTS = {"tp2": ("tp=2,sp=true", None), "pp2": ("pp=2,pp_schedule=1f1b", 4)}
LAYOUT_WORLD = 2
LAYOUT_POLICY = "static_ep"


def _calibrate(world: int, out: Path, model: str, name: str = "",
               backend: str | None = None, context_iterations: int = 6) -> Path:
    from moesim.executor.calibrate import run_calibrate

    stem = name or f"{_profile_stem(backend)}-w{world}"
    path = out / f"{stem}.toml"
    run_calibrate(argparse.Namespace(world_size=world, out=str(path), model=model, reps=15,
                                     raw=str(out / f"{stem}-raw.json"), from_raw=None,
                                     hang_timeout_s=300.0, backend=backend, links_from=None,
                                     context_iterations=context_iterations))
    return path


def _profile_stem(backend: str | None) -> str:
    return "cuda-nccl" if backend == "nccl" else "cpu-gloo"


def _renice(nice: int) -> None:
    """Run this process, and the calibration and executor ranks it starts (they inherit it),
    at niceness ``nice``, so that other jobs on a shared machine preempt the measurements
    less; a note where it is not permitted."""
    if nice == 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        print(f"measuring at niceness {os.getpriority(os.PRIO_PROCESS, 0)}", flush=True)
    except (OSError, AttributeError) as exc:
        print(f"note: cannot set niceness {nice} ({exc}); measuring at the default",
              file=sys.stderr, flush=True)


def _load() -> str:
    """The 1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _traces(quick: bool) -> list[str]:
    from moesim.executor.validate import SMARTMOE_DIR

    if quick:
        return ["synth"]
    if SMARTMOE_DIR.is_dir():
        return ["synth", "smartmoe"]
    print(f"note: {SMARTMOE_DIR} is absent; the real-trace configurations are skipped",
          file=sys.stderr)
    return ["synth"]


def _parser() -> argparse.ArgumentParser:
    from moesim.executor.run_args import add_backend_argument

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="small-cpu", help="small-cpu (default): GEMM-bound "
                   "steps of ~0.2 s; tiny-cpu: ~30 ms steps dominated by gloo latency")
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--iterations", default="0:6", metavar="A:B")
    p.add_argument("--profile-dir", default=None, help="reuse cpu-gloo-w{N}.toml from here")
    p.add_argument("--repeats", type=int, default=3, help="executor runs per configuration "
                   "(median per iteration)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of the first iteration")
    p.add_argument("--quiet-wait-s", type=float, default=60.0, help="before calibrating and "
                   "before each executor run, wait up to this long for other processes to "
                   "leave the CPUs idle (0: do not wait)")
    p.add_argument("--nice", type=int, default=-10, help="scheduling niceness for this run and "
                   "the processes it starts (negative needs privileges; 0: leave as is)")
    p.add_argument("--calibrate-once", action="store_true", help="one profile per world size "
                   "(default: calibrate again right before each configuration, so that the "
                   "profile sees the machine the runs see)")
    p.add_argument("--context-iterations", type=int, default=6, help="calibrate's context "
                   "stage: iterations of its own workload (0: microbenchmarks only)")
    p.add_argument("--no-bracket", action="store_true", help="do not run calibrate's "
                   "workload again after a configuration's runs (by default its context "
                   "factors pool one sample before and one after them)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="parallel layouts run at world "
                   f"size {LAYOUT_WORLD}, comma list of {', '.join(LAYOUTS)} ('none': skip)")
    p.add_argument("--layouts-only", action="store_true", help="run only the --layouts "
                   "configurations (not the 16 of the default layout)")
    add_backend_argument(p)  # --backend nccl --world-sizes 1 validates one GPU
    p.add_argument("--quick", action="store_true", help="smoke test: synth trace, static_ep, "
                   "2 iterations, 1 repeat")
    return p


def _layouts(text: str) -> list[str]:
    names = [x for x in text.split(",") if x and x != "none"]
    bad = [x for x in names if x not in LAYOUTS]
    if bad:
        raise MoesimError(f"--layouts {bad[0]!r}: choose from {', '.join(LAYOUTS)} or none")
    return names


def _grid(world: int, model, args) -> list[tuple[str, str, str | None, int | None]]:
    """``(config suffix, policy spec, --parallel, micro-batches)`` of one trace at ``world``."""
    grid = []
    if not args.layouts_only:
        policies = POLICIES[:1] if args.quick else POLICIES
        grid += [("", spec.format(spr=model.num_experts // world + 1), None, None)
                 for spec in policies]
    if world == LAYOUT_WORLD:
        grid += [(f"-{name}", LAYOUT_POLICY, *LAYOUTS[name]) for name in _layouts(args.layouts)]
    return grid


def main(argv: list[str] | None = None) -> int:
    from moesim.analysis.validation import format_table
    from moesim.executor.calibrate_context import remeasure_context
    from moesim.executor.validate import (
        load_named_trace,
        run_config,
        stage_sources,
        trace_model,
        wait_for_quiet,
    )
    from moesim.layout import parse_layout
    from moesim.specs import load_model
    from moesim.traces.io import save_trace

    args = _parser().parse_args(argv)
    _layouts(args.layouts)
    _renice(args.nice)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise MoesimError(f"{out} is not empty; choose a new --out")
    out.mkdir(parents=True)
    model = load_model(args.model)
    iterations = "0:2" if args.quick else args.iterations
    stop = int(iterations.partition(":")[2])
    results = []
    for world in [int(w) for w in args.world_sizes.split(",")]:
        print(f"world size {world}: load average {_load()}", flush=True)
        each = not (args.profile_dir or args.calibrate_once or args.quick)
        if args.profile_dir:
            profile = str(Path(args.profile_dir) / f"{_profile_stem(args.backend)}-w{world}.toml")
        elif not each:
            wait_for_quiet(args.quiet_wait_s)
            profile = str(_calibrate(world, out, args.model, backend=args.backend,
                                     context_iterations=args.context_iterations))
        ns = argparse.Namespace(profile=None if each else profile, model=args.model,
                                iterations=iterations,
                                hang_timeout_s=120.0, warmup=args.warmup,
                                repeats=1 if args.quick else args.repeats,
                                quiet_wait_s=args.quiet_wait_s, backend=args.backend)
        for tname in _traces(args.quick):
            for suffix, spec, parallel, micro_batches in _grid(world, model, args):
                sources = stage_sources(world, parse_layout(parallel))
                tpath = out / f"{tname}-w{world}{suffix}.npz"
                if not tpath.exists():
                    save_trace(load_named_trace(tname, sources, trace_model(model, micro_batches),
                                                stop), tpath)
                cfg = f"{tname}-{spec.replace(':', '_').replace('=', '')}-w{world}{suffix}"
                if each:
                    wait_for_quiet(args.quiet_wait_s)
                    ns.profile = str(_calibrate(world, out, args.model, f"{cfg}-profile",
                                                args.backend, args.context_iterations))
                after = None
                if each and args.context_iterations and not args.no_bracket:
                    def after(cfg: str = cfg, profile: str = ns.profile) -> None:
                        remeasure_context(out / f"{cfg}-profile-raw.json", Path(profile),
                                          args.model, args.context_iterations, args.backend)
                ns.parallel = parallel
                res = run_config(tpath, tname, spec, world, ns, out / cfg, after)
                print(format_table(res.rows(), title=f"== {cfg}"
                                   + (f" (--parallel {parallel})" if parallel else "")),
                      flush=True)
                results.append(res)
    _report(results, out)
    return 0


def _report(results: list, out: Path) -> None:
    """The summary table, the per-world MAPE ranges (layouts apart), the csv and figure."""
    from moesim.executor.validate import summary_table, write_csv, write_figure

    write_csv(results, out / "accuracy.csv")
    print(summary_table(results))
    groups: dict[str, list[float]] = {}
    for r in results:
        layout = r.name.rsplit("-", 1)[-1] if r.name.endswith(tuple(LAYOUTS)) else ""
        key = f"world size {r.world}" + (f", {layout}" if layout else "")
        groups.setdefault(key, []).append(r.comparison.step.mape_pct)
    for key, errs in groups.items():
        verdict = (f" (target ≤ 10%: {sum(e <= 10 for e in errs)} of {len(errs)} "
                   f"configurations)" if key.startswith(f"world size {LAYOUT_WORLD}") else "")
        print(f"{key}: step-time MAPE {min(errs):.1f}–{max(errs):.1f}%, mean "
              f"{sum(errs) / len(errs):.1f}%{verdict}")
    print(f"load average at the end: {_load()}")
    fig = write_figure(results, out / "predicted_vs_measured.png")
    print(f"wrote {out / 'accuracy.csv'} and {fig}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoesimError as exc:
        print(f"accuracy: error: {exc}", file=sys.stderr)
        sys.exit(2)
