"""Check the executor against the reference layer for many policies in one process group.

``python -m moesim.executor.selfcheck`` (started by :func:`moesim.executor.launch.launch`, like
the worker) runs each policy of ``--policies`` (``name[:knob=value...]``, comma-separated) on
the trace slice with ``check=True`` and writes
one JSON report from rank 0::

    {"static_ep": {"ok": true, "iterations": [{"iteration": 0, "out": 4e-7, ...}, ...]},
     "swiftmoe": {"ok": false, "error": "..."}, ...}

``--programs FILE`` instead runs hand-built programs: a pickle of ``{"model": ModelSpec,
"items": [(iteration, Program), ...]}`` (reported under the key ``"programs"``); ``--cases FILE``
runs layout programs, each checked against the whole-stack reference
(:mod:`moesim.executor.layout_selfcheck`, reported under each case's name). One launch for
the whole grid keeps the multi-process tests cheap.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch.distributed as dist

from moesim.errors import MoesimError
from moesim.executor.plan import PlannedIteration
from moesim.executor.worker import Heartbeat, _device, _planned, init_distributed, stream


def _policy_items(args: argparse.Namespace, spec: str, world: int, cuda: bool):
    """Rank 0: (model, items) of one ``name[:k=v[:k=v]]`` policy spec, or (exception, None)."""
    policy, *knobs = spec.split(":")
    ns = argparse.Namespace(**{**vars(args), "policy": policy, "knob": knobs, "out": "",
                               "warmup": 0, "cluster": None})
    try:
        model, _, items = _planned(ns, world, cuda)
        return model, items
    except MoesimError as exc:
        return exc, None


def _program_items(path: str):
    data = pickle.loads(Path(path).read_bytes())
    items = (PlannedIteration(it, None, prog, None) for it, prog in data["items"])
    return data["model"], items


def _run_one(model, items, rank: int, world: int, hb: Heartbeat) -> dict:
    """Run one item stream with checks; the report (rank 0) or ``{}``."""
    reports = []
    try:
        for _, _, report, _ in stream(model, items, rank, world, _device(), hb, check=True,
                                      warmup=0):
            if report is not None:
                reports.append(report)
    except MoesimError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": bool(reports) and all(r["ok"] for r in reports), "iterations": reports}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moesim.executor.selfcheck", description=__doc__)
    p.add_argument("--trace")
    p.add_argument("--model", default="tiny-cpu")
    p.add_argument("--policies", default="")
    p.add_argument("--iterations", default="0:2")
    p.add_argument("--programs", default=None)
    p.add_argument("--cases", default=None)
    p.add_argument("--report", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat-dir", default=None)
    args = p.parse_args(argv)
    rank, world = init_distributed(60.0)
    hb = Heartbeat(args.heartbeat_dir, rank)
    cuda = _device().type == "cuda"
    out: dict = {}
    if args.programs:
        model, items = _program_items(args.programs) if rank == 0 else (None, None)
        out["programs"] = _run_one(model, items, rank, world, hb)
    if args.cases:
        from moesim.executor.layout_selfcheck import run_case

        cases = pickle.loads(Path(args.cases).read_bytes())
        out.update({name: run_case(case, rank, world, hb) for name, case in cases.items()})
    for spec in [x for x in args.policies.split(",") if x]:
        model, items = _policy_items(args, spec, world, cuda) if rank == 0 else (None, None)
        out[spec.split(":")[0]] = _run_one(model, items, rank, world, hb)
    if rank == 0:
        Path(args.report).write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
