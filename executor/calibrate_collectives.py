"""The collective microbenchmarks of ``moesim calibrate`` (run by
:mod:`moesim.executor.calibrate_bench` on every rank): every collective kind the programs use,
compiled by :meth:`RankExecutor.compile` from a synthetic op, and the token all-to-all of
:func:`~moesim.executor.moe_layer.dispatch_fwd` / ``combine_fwd``, over groups of the first
``n`` ranks for sizes from 4 KiB to 4 MiB (nccl-tests' size convention), send/recv as a ring
with 1, 2 and 4 transfers per rank (gloo pays a fixed cost per message), each timed as the
executor's records time it (:func:`bench_collectives`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_layer as ml
from moesim.executor.interpreter import RankExecutor
from moesim.executor.replay import torch_dtype
from moesim.executor.worker import Heartbeat
from moesim.ops import AllGather, AllReduce, Broadcast, Reduce, ReduceScatter, SendRecv
from moesim.specs import ModelSpec


def _dev() -> torch.device:
    from moesim.executor.calibrate_bench import _dev as bench_dev  # no import cycle

    return bench_dev()


def _sync() -> None:
    from moesim.executor.calibrate_bench import _sync as bench_sync

    bench_sync()

SIZES = tuple(4096 * 4**k for k in range(6))          # 4 KiB .. 4 MiB
GROUP_KINDS = {"all_reduce": AllReduce, "all_gather": AllGather,
               "reduce_scatter": ReduceScatter, "broadcast": Broadcast, "reduce": Reduce}
KINDS = ("all_to_all", *GROUP_KINDS, "send_recv")
SEND_RECV_TRANSFERS = (1, 2, 4)  # transfers per rank of one SendRecv op (relayouts: several)


def _token_a2a(model: ModelSpec, nbytes: int, members: list[int], group: object | None
               ) -> Callable[[], None]:
    """Dispatch forward then combine forward of ``nbytes`` of rows per rank, split evenly
    over ``members`` (the executor's token all-to-all path); one call = two all-to-alls."""
    H, n = model.hidden_size, len(members)
    rows = max(n, nbytes // int(H * model.bytes_activation) // n * n)
    dev, dt = _dev(), torch_dtype(model)
    x = torch.randn(rows, H).to(dev, dt)
    inputs = SimpleNamespace(x_NH=x, grad_out_NH=x)
    lp = ml.LayerPass(inputs=inputs, tok_K=torch.randperm(rows, device=dev),
                      gate_K=torch.rand(rows).to(dev, dt), send_split_W=[rows // n] * n,
                      recv_split_W=[rows // n] * n, slot_rows=[])

    def run() -> None:
        ml.dispatch_fwd(lp, group)
        lp.y_recv_MH = lp.recv_MH
        ml.combine_fwd(lp, group)
    return run


def _compiled(ex: RankExecutor, kind: str, nbytes: int, members: list[int],
              transfers: int = 1) -> Callable[[], None]:
    """The executor's compiled work for a synthetic ``kind`` op of ``nbytes`` over
    ``members`` (send/recv: a ring, each member sends ``transfers`` buffers of ``nbytes`` to
    the next)."""
    ranks = np.array(members, dtype=np.int64)
    if kind == "send_recv":
        op = SendRecv(phase="relayout", src_N=np.tile(ranks, transfers),
                      dst_N=np.tile(np.roll(ranks, -1), transfers),
                      bytes_N=np.full(len(ranks) * transfers, float(nbytes)))
    else:
        extra = {"roots_G": ranks[:1]} if kind in ("broadcast", "reduce") else {}
        op = GROUP_KINDS[kind](phase="grad_sync", groups=(ranks,),
                               bytes_G=np.array([float(nbytes)]),
                               experts_G=np.array([-1]), **extra)
    return ex.compile(op)


def _time_collective(fn: Callable[[], None] | None, reps: int, busy_s: float,
                     stagger_s: float, work: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Median over ``reps`` of ``max end − max arrival`` over the members (all ranks call
    this; ``fn`` is None on ranks outside the group)."""
    rank, ts = dist.get_rank(), []
    for i in range(reps + 2):
        dist.barrier()
        end = time.perf_counter() + busy_s + rank * stagger_s
        while time.perf_counter() < end:   # ranks compute between collectives in a run
            torch.matmul(*work)
        arrive = time.perf_counter() if fn is not None else 0.0
        if fn is not None:
            fn()
            _sync()
        # one host: perf_counter is the shared monotonic clock, so the max over ranks of
        # absolute times is meaningful (no barrier-exit skew)
        both = torch.tensor([arrive, time.perf_counter() if fn else 0.0],
                            dtype=torch.float64, device=_dev())
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if i >= 2:
            ts.append(float(both[1] - both[0]))
    return float(np.median(ts))


def bench_collectives(model: ModelSpec, rank: int, world: int, hb: Heartbeat, reps: int,
                      stagger_s: float = 2e-4, busy_s: float = 1e-3) -> list[dict]:
    """Every rank: each kind over the first ``n`` ranks, as the executor runs and times it.

    After a barrier every rank computes for ``busy_s + r · stagger_s`` (members arrive one
    after another, and a blocked rank is woken as in a run), then runs the op; the time is
    ``max end − max arrival`` over the members (the executor's collective busy time after its
    straggler alignment), median over ``reps``. The token all-to-all runs two all-to-alls
    per call (dispatch + combine): its time is halved. One rank: nothing to measure."""
    if world < 2:
        return []
    ex = RankExecutor(model, rank, world, _dev())
    members_of = {n: list(range(n)) for n in range(2, world + 1)}
    ex.groups.ensure(SimpleNamespace(num_ranks=world, ops=[AllReduce(
        phase="grad_sync", groups=tuple(np.array(m) for m in members_of.values()),
        bytes_G=np.zeros(len(members_of)))]))
    work = (torch.randn(64, 64, device=_dev()), torch.randn(64, 64, device=_dev()))
    rows = []
    for n, members in members_of.items():
        group = ex.groups.get(tuple(members))
        for kind in KINDS:
            if kind == "send_recv":
                continue
            for nbytes in SIZES:
                hb.beat()
                fn = None
                if rank < n:
                    fn = (_token_a2a(model, nbytes, members, group) if kind == "all_to_all"
                          else _compiled(ex, kind, nbytes, members))
                t = _time_collective(fn, reps, busy_s, stagger_s, work)
                rows.append({"kind": kind, "n": n, "bytes": nbytes,
                             "t": t / 2 if kind == "all_to_all" else t})
    for k in SEND_RECV_TRANSFERS:  # "n": transfers per rank, "bytes": what each rank sends
        for nbytes in SIZES:
            hb.beat()
            fn = _compiled(ex, "send_recv", nbytes, list(range(world)), k)
            rows.append({"kind": "send_recv", "n": k, "bytes": k * nbytes,
                         "t": _time_collective(fn, reps, busy_s, stagger_s, work)})
    return rows
