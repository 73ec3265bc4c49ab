"""``moesim run`` / ``moesim calibrate`` / ``moesim validate``: the executor's commands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the executor's subcommands to ``moesim``'s parser."""
    from moesim.executor.run_args import add_backend_argument, add_run_arguments

    run = sub.add_parser("run", help="run a policy on a trace with the torch.distributed "
                         "executor (N local ranks; gloo on CPU, NCCL on GPU)",
                         description="Replay a trace slice through a policy on N local ranks "
                         "(the same worker `torchrun -m moesim.executor.worker` starts) and "
                         "write a RunResult with backend 'executor'.")
    add_run_arguments(run)
    run.add_argument("--world-size", type=int, default=2, help="local ranks to start")
    run.add_argument("--hang-timeout-s", type=float, default=120.0,
                     help="end the run when no rank makes progress for this long")
    add_backend_argument(run)
    from moesim.clihelp import add_json_flag

    add_json_flag(run, "the measured summary and every iteration's row")
    run.set_defaults(func=_run)

    from moesim.executor.calibrate import add_arguments as add_calibrate
    from moesim.executor.validate import add_arguments as add_validate

    cal = sub.add_parser("calibrate", help="measure this machine's GEMM and collective costs; "
                         "write a HardwareProfile + Cluster TOML",
                         description="Microbenchmark the executor's own work (expert FFN, "
                         "optimizer, collectives) on N local ranks; fit the cost model on "
                         "relative error; write a Cluster TOML and its HardwareProfile.")
    add_calibrate(cal)
    val = sub.add_parser("validate", help="run executor and simulator on the same grid; print "
                         "predicted-vs-measured error; write the figure",
                         description="For each trace x world size x policy, run the executor "
                         "and the simulator (with the calibrated profile) on the same trace "
                         "slice and report per-iteration and per-phase MAPE and max error.")
    add_validate(val)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The worker's command line for a parsed ``moesim run``."""
    argv = ["--trace", str(args.trace), "--model", str(args.model), "--policy", args.policy,
            "--out", str(args.out), "--seed", str(args.seed), "--timeline", args.timeline,
            "--timeout-s", str(args.timeout_s), "--warmup", str(args.warmup)]
    for knob in args.knob:
        argv += ["--knob", knob]
    for name in ("cluster", "iterations", "parallel"):
        if getattr(args, name):
            argv += [f"--{name}", str(getattr(args, name))]
    for flag in ("check", "regroup"):
        if getattr(args, flag, False):
            argv.append(f"--{flag}")
    return argv


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.errors import MoesimError
    from moesim.executor.launch import launch

    if args.world_size < 1:
        raise MoesimError("--world-size must be >= 1")
    from moesim.executor.capabilities import check_layout

    check_layout(args.parallel)
    out = Path(args.out)
    from moesim import dirlock, rundir

    with dirlock.DirLock(out, "run directory"):  # held through launch (re-entrant)
        rundir.prepare(out, {}, resume=False, can_resume=False)  # unfinished: replaced
        launch(worker_argv(args), args.world_size, out, hang_timeout_s=args.hang_timeout_s,
               backend=args.backend, stdout_to_stderr=bool(args.json))
    if args.json:
        import sys

        from moesim.clihelp import print_json

        print(run_summary(out), file=sys.stderr)
        print_json(run_json(out))
    else:
        print(run_summary(out))
    return 0


def run_json(out) -> dict:
    """``run --json``: the measured run's summary figures and its iterations.csv rows (the
    schema of ``simulate --json``, plus backend and status; docs/cli.md)."""
    from moesim.results import load_run
    from moesim.simulate import SimSummary
    from moesim.simulate_cli import iteration_rows, run_figures

    run = load_run(out)
    cfg, rows = run.config, iteration_rows(out)
    summary = {"policy": cfg.get("policy", {}).get("name"),
               "knobs": cfg.get("policy", {}).get("knobs"),
               "cluster": cfg.get("cluster", {}).get("name"), "out_dir": str(out),
               "backend": run.manifest.get("backend"), "status": run.manifest.get("status"),
               "iterations": len(rows)}
    summary.update(run_figures(SimSummary(rows=rows, config=cfg)))
    return {"summary": summary, "iterations": rows}


def run_summary(out) -> str:
    """One line about a finished executor run: iterations, step time, drops, and the overload
    factor and imbalance as ``moesim simulate``'s summary line gives them."""
    from moesim.results import load_run
    from moesim.simulate import SimSummary
    from moesim.simulate_cli import iteration_rows, overload_text

    run = load_run(out)
    step = run.summary.get("step_time_s")
    if step is None or not len(step):
        return f"wrote {out} ({run.manifest.get('status')}, no iterations)"
    dropped, total = run.summary["tokens_dropped"].sum(), run.summary["tokens_total"].sum()
    overload = overload_text(SimSummary(rows=iteration_rows(out), config=run.config))
    return (f"wrote {out}: {len(step)} iterations, step time mean {step.mean() * 1e3:.2f} ms "
            f"(min {step.min() * 1e3:.2f}, max {step.max() * 1e3:.2f}), "
            f"{dropped / max(total, 1) * 100:.1f}% of token assignments dropped, {overload}")
