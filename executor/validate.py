"""``moesim validate``: executor vs simulator on a grid, with error tables and a figure.

For every (trace, world size, policy) of the grid, on the same trace slice:

1. the trace is fitted to the run (:func:`prepare_trace`) and saved, so both backends read the
   same file;
2. the executor runs it (:func:`moesim.executor.launch.launch`, ``moesim run``'s path) →
   ``<out>/<config>/measured`` (and ``measured-2`` … with ``--repeats``), after ``--warmup``
   untimed runs of the first iteration; with repeats every measured quantity is the median over
   them, iteration by iteration (one-off preemption by other processes is not the program's
   time); ``--quiet-wait-s`` first waits for other processes to leave the CPUs idle
   (:func:`wait_for_quiet`);
3. the simulator runs it with the calibrated profile (``--profile``, a cluster TOML from
   ``moesim calibrate``, reshaped to one node × world size as the executor's ranks see it)
   → ``<out>/<config>/predicted``; both runs carry the same config, so ``moesim report`` pairs
   them;
4. :func:`moesim.analysis.validation.compare_runs` gives per-iteration and per-phase MAPE / max.

It prints one table per configuration and a summary, writes ``<out>/validation.csv`` and the
predicted-vs-measured figure ``<out>/predicted_vs_measured.png`` (matplotlib, Agg).

Traces: a path (``.npz`` / directory), ``synth`` (a synthetic trace with the model's shape) or
``smartmoe[=DIR]`` (the real SmartMoE-AE training trace, default ``../shared/data/
smartmoe-trace``). Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moesim import validation
from moesim.errors import MoesimError
from moesim.executor.validate_output import (  # noqa: F401  (re-exported)
    summary_table,
    validation_json,
    write_csv,
    write_figure,
)
from moesim.executor.validate_traces import (  # noqa: F401  (re-exported)
    SMARTMOE_DIR,
    load_named_trace,
    prepare_trace,
)
from moesim.specs import ModelSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", default="synth", help="comma list: paths, 'synth', "
                   "'smartmoe' or 'smartmoe=DIR'")
    p.add_argument("--policies", default="static_ep", help="comma list of policy names; "
                   "'name:knob=value:knob=value' sets knobs")
    p.add_argument("--world-sizes", default="2", help="comma list, e.g. 2,4")
    p.add_argument("--profile", default="cpu-gloo-4", help="cluster TOML from `moesim "
                   "calibrate` (or a preset); reshaped to 1 node x world size")
    p.add_argument("--model", default="small-cpu", help="model preset (default: small-cpu, "
                   "GEMM-bound on CPU)")
    p.add_argument("--iterations", default="0:4", metavar="A:B")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per "
                   "iteration of the traces made for the grid (default: the model's; a "
                   "pipeline layout wants several, e.g. 4 with --parallel pp=2)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True,
                   help="directory for runs, table and figure")
    p.add_argument("--repeats", type=int, default=1, help="executor runs per configuration; "
                   "measured times are the median over them")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of the first iteration")
    p.add_argument("--quiet-wait-s", type=float, default=0.0, help="before each executor run, "
                   "wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--hang-timeout-s", type=float, default=120.0)
    from moesim.layout import add_parallel_argument

    add_parallel_argument(p)
    from moesim.executor.run_args import add_backend_argument

    add_backend_argument(p)
    from moesim.clihelp import add_json_flag

    add_json_flag(p, "every configuration's prediction errors")
    p.set_defaults(func=run_validate)


# -- a quiet machine ---------------------------------------------------------------------------


def _busy_cores(window_s: float) -> float:
    """CPU cores busy (all processes) over ``window_s``, from ``/proc/stat``."""
    def sample() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(window_s)
    t1, i1 = sample()
    cores = os.cpu_count() or 1
    return cores * (1.0 - (i1 - i0) / max(t1 - t0, 1e-9))


def wait_for_quiet(max_wait_s: float, busy_limit: float = 0.35, window_s: float = 0.5
                   ) -> float:
    """Wait until the machine is quiet — fewer than ``busy_limit`` cores busy over two
    consecutive ``window_s`` windows — or ``max_wait_s`` passed; returns the seconds waited
    (measurements of a CPU run on a machine other jobs share are only comparable when taken
    while those jobs are idle). No-op where ``/proc/stat`` is missing or ``max_wait_s <= 0``."""
    if max_wait_s <= 0 or not Path("/proc/stat").exists():
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        if _busy_cores(window_s) < busy_limit and _busy_cores(window_s) < busy_limit:
            break
        time.sleep(1.0)
    waited = time.monotonic() - start
    if waited >= max_wait_s:
        print(f"note: the machine did not become quiet within {max_wait_s:.0f} s; measuring "
              "anyway", file=sys.stderr, flush=True)
    return waited


# -- one configuration -----------------------------------------------------------------------


@dataclass
class ConfigResult:
    """One grid point: its name, where its runs are, the comparison and, under a pipeline
    layout, the per-stage rows (:func:`moesim.executor.validate_stages.stage_rows`)."""

    name: str
    trace: str
    policy: str
    world: int
    comparison: object
    stage_rows: list = field(default_factory=list)

    def rows(self) -> list[dict]:
        """The step, per-phase and per-stage rows (the validation.csv rows of this config)."""
        return [*self.comparison.rows(), *self.stage_rows]


def _policy(spec: str):
    from moesim.executor.worker import parse_knobs
    from moesim.policies import make_policy

    name, *knobs = spec.split(":")
    return name, knobs, make_policy(name, parse_knobs(knobs))


def run_config(trace_path: Path, trace_name: str, spec: str, world: int, args,
               out: Path, after_runs: Callable[[], None] | None = None) -> ConfigResult:
    """Executor + simulator for one (trace, policy, world) and their comparison.
    ``after_runs`` (optional) is called between the executor's runs and the simulator's,
    which reads ``args.profile`` only then (``benchmarks/accuracy.py`` re-measures the
    calibration workload there, so that the profile brackets the runs in time).
    ``args.parallel`` (optional): the layout both backends run (the trace's source ranks are
    one pipeline stage's)."""
    from moesim.analysis.validation import compare_runs
    from moesim.executor.launch import launch
    from moesim.executor.plan import parse_iterations
    from moesim.executor.validate_stages import stage_rows
    from moesim.executor.worker import resolve_cluster
    from moesim.layout import parse_layout
    from moesim.results import load_run
    from moesim.simulate import simulate
    from moesim.specs import load_model
    from moesim.traces.io import load_trace

    name, knobs, policy = _policy(spec)
    resolve_cluster(args.profile, world, cuda=False)  # a bad profile fails before the runs
    trace = load_trace(trace_path)
    start, stop = parse_iterations(args.iterations, trace.num_iterations)
    predicted = out / "predicted"
    repeats = max(1, int(getattr(args, "repeats", 1)))
    measured = [out / ("measured" if i == 0 else f"measured-{i + 1}") for i in range(repeats)]
    for i, run_dir in enumerate(measured):
        argv = ["--trace", str(trace_path), "--model", args.model, "--policy", name,
                "--cluster", str(args.profile), "--iterations", f"{start}:{stop}",
                "--out", str(run_dir), "--timeline", "first" if i == 0 else "none",
                "--warmup", str(getattr(args, "warmup", 2))]
        for k in knobs:
            argv += ["--knob", k]
        if getattr(args, "parallel", None):
            argv += ["--parallel", args.parallel]
        wait_for_quiet(float(getattr(args, "quiet_wait_s", 0.0)))
        launch(argv, world, run_dir, hang_timeout_s=args.hang_timeout_s,
               backend=getattr(args, "backend", None),
               stdout_to_stderr=bool(getattr(args, "json", False)))
    if after_runs is not None:
        after_runs()
    cluster = resolve_cluster(args.profile, world, cuda=False)  # as the executor's ranks do
    simulate(trace_path, load_model(args.model), cluster, policy, iterations=(start, stop),
             out_dir=predicted, timeline_iterations=[start], progress=False,
             layout=parse_layout(getattr(args, "parallel", None)))
    pred, meas = load_run(predicted), [load_run(m) for m in measured]
    comp = compare_runs(pred, meas)
    return ConfigResult(out.name, trace_name, spec, world, comp,
                        stage_rows(pred, meas, comp.iterations))


# -- the grid --------------------------------------------------------------------------------


def run_validate(args: argparse.Namespace) -> int:
    from moesim.analysis.validation import format_table, routing_gap_line
    from moesim.executor.capabilities import check_layout
    from moesim.specs import load_model
    from moesim.traces.io import save_trace

    layout = check_layout(getattr(args, "parallel", None))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise MoesimError(f"output directory {out} is not empty; choose a new --out")
    text = sys.stderr if getattr(args, "json", False) else sys.stdout  # --json: tables aside
    model = trace_model(load_model(args.model), getattr(args, "micro_batches", None))
    worlds = validation.int_list(args.world_sizes, "--world-sizes", minimum=1)
    sources = {w: stage_sources(w, layout) for w in worlds}  # a bad layout fails before runs
    lay_tag = layout_tag(getattr(args, "parallel", None))
    stop = int(str(args.iterations).partition(":")[2] or 4)
    results = []
    for tname in [t for t in args.traces.split(",") if t]:
        for world in worlds:
            tag = Path(tname.partition("=")[0]).stem
            (out / "traces").mkdir(parents=True, exist_ok=True)
            tpath = save_trace(load_named_trace(tname, sources[world], model, stop),
                               out / "traces" / f"{tag}-w{world}.npz")
            for spec in [p for p in args.policies.split(",") if p]:
                cfg = f"{tag}-{spec.replace(':', '_').replace('=', '')}-w{world}{lay_tag}"
                res = run_config(Path(tpath), tag, spec, world, args, out / cfg)
                print(format_table(res.rows(), title=f"== {cfg}"), flush=True, file=text)
                print(routing_gap_line(res.comparison), flush=True, file=text)
                results.append(res)
    write_csv(results, out / "validation.csv")
    print(summary_table(results), file=text)
    fig = write_figure(results, out / "predicted_vs_measured.png")
    print(f"wrote {out / 'validation.csv'} and {fig}", file=text)
    if getattr(args, "json", False):
        from moesim.clihelp import print_json

        print_json(validation_json(results, out))
    return 0


def trace_model(model: ModelSpec, micro_batches: int | None) -> ModelSpec:
    """The model the grid's traces are shaped for (``--micro-batches`` overrides its own)."""
    if micro_batches is None:
        return model
    if micro_batches < 1:
        raise MoesimError(f"--micro-batches {micro_batches}: give at least 1")
    return model.replace(micro_batches=micro_batches)


def stage_sources(world: int, layout) -> int:
    """Token sources of one pipeline stage at ``world`` ranks (the trace's ranks): world / pp."""
    if world % layout.pp:
        raise MoesimError(f"--world-sizes {world} is not a multiple of the layout's pp "
                          f"{layout.pp}; choose world sizes divisible by it")
    return world // layout.pp


def layout_tag(parallel: str | None) -> str:
    """The suffix a configuration's name gets from ``--parallel`` (``-tp2_sptrue``)."""
    if not parallel:
        return ""
    return "-" + "".join(c for c in parallel.replace(",", "_") if c.isalnum() or c in "_-.")
