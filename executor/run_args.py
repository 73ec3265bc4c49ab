"""Command-line options of ``moesim run`` and the executor worker, without importing torch (the
``moesim`` parser is built on every start-up; torch loads only when a rank starts)."""

from __future__ import annotations

import argparse

BACKENDS = ("auto", "nccl", "gloo")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``moesim run`` and the worker."""
    p.add_argument("--trace", required=True, help="routing trace (.npz or directory); its "
                   "ranks must equal the world size")
    p.add_argument("--model", required=True, help="model preset name or .toml path")
    p.add_argument("--policy", default="static_ep", help="registered policy name")
    p.add_argument("--knob", action="append", default=[], metavar="K=V",
                   help="policy config knob (repeatable)")
    p.add_argument("--cluster", default=None, help="cluster preset or .toml (default: "
                   "cpu-gloo-4 on CPU, h100-4x8-ib400x8 on GPU, reshaped to 1 node x N ranks)")
    p.add_argument("--iterations", default=None, metavar="A:B", help="trace iterations to run")
    p.add_argument("--regroup", action="store_true", help="when the trace's rank count differs "
                   "from the ranks a pipeline stage has (the world size without --parallel), "
                   "regroup its ranks to them (as 'moesim trace regroup'; written into the "
                   "run's config)")
    p.add_argument("-o", "--out", "--output", dest="out", required=True,
                   help="run directory to write (must be new)")
    p.add_argument("--seed", type=int, default=0, help="policy RNG seed")
    p.add_argument("--check", action="store_true", help="compare every iteration's outputs "
                   "and gradients with the single-process reference layer")
    p.add_argument("--timeline", default="first", help="iterations to write Chrome traces "
                   "for: 'first', 'none', 'all' or a comma list")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of the first iteration")
    p.add_argument("--timeout-s", "--timeout", dest="timeout_s", type=float, default=120.0,
                   help="collective timeout of the process group (seconds)")
    from moesim.layout import add_parallel_argument

    add_parallel_argument(p)


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """``--backend`` of the commands that start ranks (passed to them as ``MOESIM_BACKEND``)."""
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="process group backend of the ranks: auto (default: NCCL when every "
                   "local rank has a GPU of its own, else gloo on CPU), nccl or gloo")
