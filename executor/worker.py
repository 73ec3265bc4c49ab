"""The executor's per-rank entry point: ``torchrun --nproc-per-node N -m moesim.executor.worker``.

It reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), joins the process group (NCCL on CUDA tensors when every local rank has a GPU
of its own, gloo on CPU tensors otherwise, or as ``MOESIM_BACKEND`` says; the same code), and
replays a trace slice through a policy:

    rank 0: policy.decide → lower_iteration → broadcast the Program to every rank
    every rank: prepare (untimed: slots, forced tokens, process groups) → barrier → run the
                program op by op, timed → all_gather the times
    rank 0: build the iteration record, RunWriter.add; optionally check against the reference

``moesim run`` starts the same module as N local subprocesses (:mod:`moesim.executor.launch`).
Rank 0 writes the RunResult (backend ``executor``); a failure finishes it as ``incomplete``. A
user error prints one line and exits 2. Each rank touches ``<heartbeat-dir>/rank<r>`` as it makes
progress (at most once a second), so a watching launcher can tell a hang from slow work.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from moesim import supervise
from moesim.errors import MoesimError
from moesim.executor.run_args import (  # noqa: F401  (re-exported)
    BACKENDS,
    add_backend_argument,
    add_run_arguments,
)
from moesim.safeio import guard_arguments
from moesim.validation import check_flags, flag_names, plan_size


class Heartbeat:
    """Touches ``<directory>/rank<r>`` at most once per ``every_s`` seconds (no-op without a
    directory)."""

    def __init__(self, directory: str | None, rank: int, every_s: float = 1.0) -> None:
        self.path = Path(directory) / f"rank{rank}" if directory else None
        self.every_s = every_s
        self._last = 0.0
        self.beat(force=True)

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._last < self.every_s):
            return
        self._last = now
        self.path.touch()


def parse_knobs(items: list[str]) -> dict[str, str]:
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoesimError(f"--knob {item!r}: use name=value, e.g. --knob slots_per_rank=2")
        knobs[key.strip()] = value
    return knobs


def resolve_cluster(name: str | None, world: int, cuda: bool):
    """The cluster the ranks run on, reshaped to one node × ``world`` when it differs."""
    from moesim.specs import load_cluster

    cluster = load_cluster(name or ("h100-4x8-ib400x8" if cuda else "cpu-gloo-4"))
    if cluster.world_size == world:
        return cluster
    if cluster.num_nodes == 1 or world <= cluster.gpus_per_node:
        return cluster.with_shape(1, world)
    raise MoesimError(f"cluster {cluster.name} has {cluster.world_size} ranks but the run has "
                      f"{world}; give a cluster of {world} ranks")


def _timeline_iters(text: str, first: int) -> set[int] | str:
    if text in ("all", "none"):
        return text
    if text == "first":
        return {first}
    try:
        return {int(x) for x in text.split(",") if x}
    except ValueError:
        raise MoesimError(f"--timeline {text!r}: use first, none, all or 0,3,7") from None


def _config(args: argparse.Namespace, trace, model, cluster, policy, world: int,
            start: int, stop: int, layout_plan=None) -> dict:
    """The simulator's config (:func:`moesim.simulate.run_config` with the layout and regroup
    option of :func:`moesim.simulate.layout_config`, so a simulator run and an executor run of
    the same set-up pair up in ``analysis``) plus the executor's own facts."""
    from moesim.simulate import layout_config, run_config

    config = layout_config(run_config(trace, str(args.trace), model, cluster, policy,
                                      list(range(start, stop)), args.seed, False),
                           layout_plan, bool(getattr(args, "regroup", False)))
    config.update(backend="executor", argv=sys.argv,
                  started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  executor={"world_size": world, "dist_backend": dist.get_backend(),
                            "mode": "replay", "warmup": args.warmup, "torch": torch.__version__,
                            "device": _device().type,
                            **({"gpu": torch.cuda.get_device_name()}
                               if _device().type == "cuda" else {})})
    return config


def _planned(args: argparse.Namespace, world: int, cuda: bool):
    """Rank 0's side of a run: model, config and the iterator of planned iterations (each
    with the layout plan, None for the default layout). The set-up is the simulator's
    (:func:`moesim.simulate.prepare_inputs`): the same layout plan, view cluster, regrouping,
    trace-rank check and fitted trace and model."""
    from moesim.executor.plan import iteration_programs, parse_iterations
    from moesim.layout import parse_layout
    from moesim.policies import make_policy
    from moesim.simulate import prepare_inputs
    from moesim.specs import load_model
    from moesim.traces.io import load_trace

    cluster = resolve_cluster(args.cluster, world, cuda)
    trace = load_trace(args.trace)
    layout = parse_layout(getattr(args, "parallel", None))
    regroup = bool(getattr(args, "regroup", False))
    if (layout.is_default and not regroup and trace.meta.rank_resolved
            and trace.meta.num_ranks != world):
        raise MoesimError(f"trace {args.trace} has {trace.meta.num_ranks} ranks but the run has "
                          f"{world}; change --world-size or pass --regroup (or regroup it "
                          f"first: moesim trace regroup --ranks {world})")
    start, stop = parse_iterations(args.iterations, trace.num_iterations)
    policy = make_policy(args.policy, parse_knobs(args.knob))
    inputs = prepare_inputs(trace, load_model(args.model), cluster, policy, layout,
                            regroup=regroup, stop=stop, rng_seed=args.seed)
    trace, model, policy = inputs.trace, inputs.model, inputs.policy
    plan_size(policy, model.num_layers, world, model.num_experts)  # the simulator's bound
    config = _config(args, trace, model, cluster, policy, world, start, stop, inputs.layout_plan)
    items = iteration_programs(trace.counts_TLRE, trace.meta.micro_batches_per_iteration,
                               policy, model, cluster, start, stop, args.seed,
                               layout_plan=inputs.layout_plan, view=inputs.view)
    return model, config, items


def _next_item(items) -> object:
    """Rank 0: the next planned iteration, ``None`` at the end, or an error to broadcast."""
    try:
        return next(items, None)
    except MoesimError as exc:
        return exc


def stream(model, items, rank: int, world: int, device: torch.device, hb: Heartbeat,
           check: bool, warmup: int = 1):
    """Run every planned iteration rank 0 produces (``items``; ``None`` elsewhere) on all ranks.

    ``model`` is rank 0's ModelSpec (or the exception its set-up raised: every rank raises it).
    Yields, on every rank, ``(item, gathered OpTimes per rank, check report or None, peak
    memory)``; ``item`` and the report are only meaningful on rank 0. The first program also
    runs ``warmup`` times untimed (gloo connects lazily; first-touch allocations)."""
    from moesim.executor.check import check_iteration
    from moesim.executor.interpreter import RankExecutor

    box = [model if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):  # rank 0's set-up failed: every rank stops with it
        raise _echoed(box[0], rank)
    model, ex = box[0], None
    first = True
    while True:
        item = _next_item(items) if rank == 0 else None
        box = [_without_context(item)]  # the lowering context stays on rank 0
        dist.broadcast_object_list(box, src=0)
        item = item if rank == 0 else box[0]
        if item is None:
            return
        if isinstance(item, Exception):
            raise _echoed(item, rank)
        hb.beat(force=True)
        if ex is None:  # under a layout the executor runs its real dataflow (dataflow.py)
            plan = getattr(item, "layout_plan", None)
            ex = RankExecutor(model, rank, world, device,
                              layout=None if plan is None else plan.layout)
        for _ in range(warmup if first else 0):
            ex.prepare(item.program, item.iteration)
            ex.run(item.program, progress=hb.beat)
        first = False
        ex.prepare(item.program, item.iteration)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = ex.run(item.program, progress=hb.beat)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, times)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        report = check_iteration(ex, item.program, item.iteration) if check else None
        hb.beat(force=True)
        yield item, gathered, report, peak


def _without_context(item: object) -> object:
    """A planned iteration as the other ranks get it: without its lowering context."""
    if getattr(item, "context", None) is None:
        return item
    import dataclasses

    return dataclasses.replace(item, context=None)


def _echoed(exc: Exception, rank: int) -> Exception:
    """Rank 0's error as another rank re-raises it: marked, so that only rank 0 prints it."""
    if rank != 0:
        exc.moesim_echo = True
    return exc


def run_rank(args: argparse.Namespace, rank: int, world: int, hb: Heartbeat) -> int:
    """The replay loop of one rank (process group already initialised)."""
    from moesim.executor.record import build_record
    from moesim.results import RunWriter

    device = _device()
    model = items = writer = config = None
    failures: list[int] = []
    timeline: set[int] | str = "none"
    if rank == 0:
        try:
            model, config, items = _planned(args, world, device.type == "cuda")
            writer = RunWriter(args.out, config, "executor", chunk=1)
            timeline = _timeline_iters(args.timeline, config["iterations"][0])
        except MoesimError as exc:
            model = exc  # stream() raises it on every rank
    try:
        for item, gathered, report, peak in stream(model, items, rank, world, device, hb,
                                                   args.check, args.warmup):
            if rank != 0:
                continue
            want_tl = timeline == "all" or (timeline != "none" and item.iteration in timeline)
            rec = build_record(item.context, gathered, item.iteration, want_tl, peak,
                               item.layout_plan)
            if report is not None:
                rec.summary.update({f"check_{k}": float(v) for k, v in report.items()
                                    if k != "iteration"})
                print(_check_line(report), flush=True)
                if not report["ok"]:
                    failures.append(item.iteration)
            writer.add(rec, state={"iteration": item.iteration})
            print(f"iteration {item.iteration}: step {rec.summary['step_time_s'] * 1e3:.2f} ms",
                  flush=True)
    except BaseException as exc:
        if writer is not None:
            writer.finish("incomplete", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    if writer is not None:
        if failures:
            writer.finish("incomplete", error=f"reference check failed at iterations {failures}")
            raise MoesimError(f"executor results differ from the reference layer at iterations "
                              f"{failures}; see {args.out}/iterations.csv (check_* columns)")
        if supervise.parent_gone():  # the launcher died: its run must not read complete
            writer.finish("incomplete", error="the launcher died before the run finished")
            raise MoesimError("the launcher of this run died; the run is incomplete")
        writer.finish("complete")
    return 0


def choose_backend(requested: str | None = None) -> str:
    """The process group backend of this rank: ``requested`` (default: the ``MOESIM_BACKEND``
    environment variable, else ``auto``). ``auto`` is NCCL when CUDA is available and every
    local rank gets a GPU of its own (``LOCAL_WORLD_SIZE`` ≤ visible GPUs; NCCL refuses two
    ranks on one device), else gloo on CPU tensors; ``nccl`` without enough GPUs is an error."""
    want = (requested or os.environ.get("MOESIM_BACKEND") or "auto").lower()
    if want not in BACKENDS:
        raise MoesimError(f"backend {want!r}: use one of {', '.join(BACKENDS)}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if want == "gloo":
        return "gloo"
    if want == "nccl" and gpus < local:
        raise MoesimError(f"backend nccl needs a GPU per local rank: {local} ranks, {gpus} "
                          f"GPU(s) visible; start fewer ranks or use --backend gloo")
    return "nccl" if gpus >= local else "gloo"


def _device() -> torch.device:
    """``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def _check_line(r: dict) -> str:
    return (f"check iteration {r['iteration']}: {'OK' if r['ok'] else 'FAILED'} "
            f"(max rel err out {r['out']:.1e}, grad_x {r['grad_x']:.1e}, "
            f"grad_w {r['grad_w_local']:.1e}, synced {r['grad_w_synced']:.1e}; "
            f"tol {r['tolerance']:.0e})")


def init_distributed(timeout_s: float) -> tuple[int, int]:
    """Join the process group from the torchrun environment; returns ``(rank, world)``."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = choose_backend()
    if backend == "nccl":  # host-side work (a host optimizer) gets this rank's share of cores
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local, 1)))
    else:
        torch.set_num_threads(1)
        if rank == 0 and torch.cuda.is_available() and not os.environ.get("MOESIM_BACKEND"):
            print(f"moesim: note: {torch.cuda.device_count()} GPU(s) for "
                  f"{os.environ.get('LOCAL_WORLD_SIZE', world)} local ranks; running gloo on "
                  "CPU tensors (NCCL needs a GPU per rank)", flush=True)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesim.executor.worker", description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--heartbeat-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("moesim.executor.worker: error: no RANK in the environment; start it with "
              "torchrun or `moesim run`", file=sys.stderr)
        return 2
    supervise.from_environment()  # under `moesim run`: die with the launcher
    try:
        guard_arguments(args)
        check_flags(args, flag_names(parser))
        from moesim.executor.capabilities import check_layout

        check_layout(args.parallel)
    except MoesimError as exc:  # the same on every rank: rank 0 says it
        if os.environ["RANK"] == "0":
            print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    hb = Heartbeat(args.heartbeat_dir, int(os.environ["RANK"]))
    code = 0
    try:
        rank, world = init_distributed(args.timeout_s)
        code = run_rank(args, rank, world, hb)
    except MoesimError as exc:  # a user error: one line, from rank 0 (every rank has it)
        if not getattr(exc, "moesim_echo", False):
            print(f"moesim: error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:  # report and fail; the launcher ends the other ranks
        traceback.print_exc()
        print(f"moesim: error: rank {os.environ['RANK']} failed: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        code = 1
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    elif code != 0:  # skip C++ teardown of a broken process group (it may abort the process)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
