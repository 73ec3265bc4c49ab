"""``moesim trace synth --workload NAME`` and ``trace info --expert-groups G --topk-groups M``.

The workload flags build a :class:`~moesim.traces.workloads.WorkloadConfig` from the shape
flags ``trace synth`` already has (layers, ranks, experts, top-k, tokens per rank,
micro-batches, iterations); the popularity / drift / burstiness knobs belong to the default
generator and are refused with a workload. Routing options (group / node limits, variable
top-k) sample per token, so they need ``--workload`` (``balanced`` for uniform experts).
"""

from __future__ import annotations

import argparse

from moesim.errors import MoesimError
from moesim.traces.format import RoutingTrace
from moesim.traces.routing_limits import RoutingOptions, count_violations
from moesim.traces.workloads import WORKLOADS, WorkloadConfig, synthesize_workload

SHAPE_FIELDS = ("num_layers", "num_ranks", "num_experts", "top_k", "tokens_per_rank",
                "micro_batches_per_iteration", "num_iterations")
# (flag, WorkloadConfig field, type, help)
WORKLOAD_KNOBS = (
    ("--hot-fraction", "hot_fraction", float, "share of experts that are hot (default 0.125)"),
    ("--hot-share", "hot_share", float, "sampling weight the hot experts hold (default 0.5)"),
    ("--ragged", "ragged", float, "source_ragged: slope a of the source density (default "
     "0.6: the last rank sends about 4x the first)"),
    ("--zero-fraction", "zero_fraction", float, "zero_expert_rank: share of experts with no "
     "load (default 0.25)"),
    ("--burst-period", "burst_period", int, "burst: iterations between bursts (default 4)"),
    ("--burst-share", "burst_share", float, "burst: weight the hot set holds in a burst "
     "(default 0.9)"),
)
ROUTING_KNOBS = (
    ("--expert-groups", "expert_groups", int, "group-limited routing: contiguous expert "
     "groups (DeepSeek-V2/V3)"),
    ("--topk-groups", "topk_groups", int, "group-limited routing: groups a token may use"),
    ("--node-limit", "node_limit", int, "node-limited routing: nodes a token may reach "
     "(DeepSeek-V3: 4)"),
    ("--route-nodes", "route_nodes", int, "node-limited routing: nodes the experts are "
     "spread over (contiguously)"),
    ("--top-p", "top_p", float, "variable top-k: take experts until their cumulative router "
     "probability reaches this (0 = fixed top-k)"),
    ("--min-k", "min_k", int, "variable top-k: fewest experts per token (default 1)"),
    ("--temperature", "temperature", float, "variable top-k: softmax temperature of the "
     "router probabilities (default 1)"),
)


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """The ``--workload`` flag and its knobs on ``trace synth``."""
    p.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="a workload that isolates one effect (Megatron-LM PR 7488), sampled "
                   "per token from (workload, seed, step) alone; see docs/traces.md")
    for flag, field, kind, text in WORKLOAD_KNOBS + ROUTING_KNOBS:
        p.add_argument(flag, dest=f"wl_{field}", type=kind, default=None, help=text)
    p.add_argument("--store-topk", action=argparse.BooleanOptionalAction, default=None,
                   help="store every token's experts (default: when they fit 8M ids)")


def synth_workload(args: argparse.Namespace, shape: dict) -> RoutingTrace | None:
    """The workload trace the flags ask for, or None when ``--workload`` is absent."""
    routing = {f: getattr(args, f"wl_{f}") for _, f, _, _ in ROUTING_KNOBS
               if getattr(args, f"wl_{f}") is not None}
    knobs = {f: getattr(args, f"wl_{f}") for _, f, _, _ in WORKLOAD_KNOBS
             if getattr(args, f"wl_{f}") is not None}
    if args.workload is None:
        if routing or knobs or args.store_topk is not None:
            flag = next(iter(routing or knobs), "store_topk").replace("_", "-")
            raise MoesimError(f"--{flag} samples routing per token and needs --workload NAME "
                              "(e.g. --workload balanced)")
        return None
    other = sorted(k for k in shape if k not in SHAPE_FIELDS)
    if other or args.preset != "default":
        what = other[0] if other else "preset"
        raise MoesimError(f"--{what.replace('_', '-')} (popularity / drift knobs) does not "
                          "apply to --workload; drop it or drop --workload")
    try:
        config = WorkloadConfig(workload=args.workload, routing=RoutingOptions(**routing),
                                store_topk=args.store_topk, **shape, **knobs)
    except ValueError as exc:
        raise MoesimError(str(exc)) from None
    return synthesize_workload(config, seed=args.seed)


def add_limit_check(p: argparse.ArgumentParser) -> None:
    """``trace info --expert-groups G --topk-groups M``: count tokens over a group limit."""
    p.add_argument("--expert-groups", type=int, default=None, metavar="G",
                   help="with --topk-groups: count tokens whose experts span more than M of "
                   "G contiguous expert groups (group- or node-limited routing; needs "
                   "per-token choices)")
    p.add_argument("--topk-groups", type=int, default=None, metavar="M")


def limit_check_line(trace: RoutingTrace, args: argparse.Namespace
                     ) -> tuple[str, dict] | None:
    """``(text line, JSON dict)`` of the group-limit check, or None when not asked."""
    G, M = args.expert_groups, args.topk_groups
    if G is None and M is None:
        return None
    if G is None or M is None:
        raise MoesimError("--expert-groups and --topk-groups go together; give both")
    bad, total = count_violations(trace, G, M)
    share = 100 * bad / max(total, 1)
    return (f"group limit: {bad} of {total} tokens ({share:.2f}%) reach more than {M} of {G} "
            f"expert groups", {"groups": G, "limit": M, "violations": bad, "tokens": total})
