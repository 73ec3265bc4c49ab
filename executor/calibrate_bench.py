"""Microbenchmarks of the executor's own work, run on every rank of a calibration launch.

``python -m moesim.executor.calibrate_bench --model M --out raw.json`` (N ranks, started by
``moesim calibrate`` like the worker) measures, through the executor's own code paths:

- ``expert`` — the expert op of one layer-pass (:func:`~moesim.executor.moe_layer.expert_fwd` /
  ``expert_bwd``: row gather, FFN or dgrad + wgrad, row scatter) over ``S = E / N`` local
  slots of ``m`` rows each, for ``m`` over a sweep; recorded per slot (``t / S``), so the cost
  model's per-slot sum reproduces it — including the cache traffic of cycling through ``S``
  experts' weights, which a one-slot benchmark misses;
- ``gemm`` — the stand-in matmul ``[m, H] @ [H, n]`` for a few shapes (per-op overhead);
- ``adam`` — the executor's optimizer step: Adam over expert-sized tensors one call each, as
  :meth:`RankExecutor._optimizer_step` walks the slots; ``host_adam`` / ``copy`` — the host
  Adam and host copies over sizes;
- ``collectives`` — every collective kind the programs use, compiled by
  :meth:`RankExecutor.compile` from a synthetic op (the interpreter's async start + wait, its
  buffers), and the token all-to-all of :func:`~moesim.executor.moe_layer.dispatch_fwd` /
  ``combine_fwd`` (row gather, uneven ``all_to_all_single``, gate-weighted scatter-add); over
  groups of the first ``n`` ranks (``n = 2..N``) for sizes from 4 KiB to 4 MiB (nccl-tests'
  size convention), timed as the executor's records time them (see
  :func:`bench_collectives`).

Measurement hygiene: one intra-op thread per rank (:func:`init_distributed`), warm-up calls
excluded, and compute measured on *all ranks at once* — a run's ranks compute at the same time,
so the concurrency slowdown (ranks sharing cores, memory bandwidth) is in the measured numbers
and the profile's ``cores_shared_by`` is 1; ``concurrency`` also times one expert forward on
rank 0 alone and on all ranks together, for the record. Compute times are means over
sustained blocks, averaged over ranks; collective times are medians over repeats (a one-off
preemption by another process is not the collective's cost). Rank 0 writes
``{"compute": [...], "collectives": [...], "concurrency": {...}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_layer as ml
from moesim.executor.interpreter import Adam, RankExecutor
from moesim.executor.replay import expert_weights, torch_dtype
from moesim.executor.worker import Heartbeat, init_distributed
from moesim.ops import AllGather, AllReduce, Broadcast, Reduce, ReduceScatter, SendRecv
from moesim.specs import ModelSpec, load_model

M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SIZES = tuple(4096 * 4**k for k in range(6))          # 4 KiB .. 4 MiB
GROUP_KINDS = {"all_reduce": AllReduce, "all_gather": AllGather,
               "reduce_scatter": ReduceScatter, "broadcast": Broadcast, "reduce": Reduce}
KINDS = ("all_to_all", *GROUP_KINDS, "send_recv")


def _dev() -> torch.device:
    """The device the executor would use on this rank (CUDA under NCCL, else CPU)."""
    from moesim.executor.worker import _device

    return _device()


def _sync() -> None:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def _mean_time(fn: Callable[[], object], reps: int, warmup: int = 2,
               min_total_s: float = 0.03) -> float:
    """Mean seconds per call over a sustained block (at least ``reps`` calls and
    ``min_total_s``), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync()
    count, t0 = 0, time.perf_counter()
    while count < reps or time.perf_counter() - t0 < min_total_s:
        fn()
        count += 1
    _sync()
    return (time.perf_counter() - t0) / count


def _together(fn: Callable[[], object], reps: int) -> float:
    """:func:`_mean_time` of ``fn`` on every rank at once (started after a barrier), averaged
    over ranks: compute under the run's concurrency."""
    dist.barrier()
    t = torch.tensor([_mean_time(fn, reps)], dtype=torch.float64, device=_dev())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _reps(m: int) -> int:
    return 15 if m <= 256 else 7


def _expert_pass(model: ModelSpec, slots: int, m: int) -> tuple[Callable, Callable]:
    """Forward and backward closures of one layer-pass's expert op: ``slots`` local slots of
    ``m`` rows each (rows of one slot interleaved with the others', as a receive buffer from
    several sources holds them)."""
    dev, dt, H = _dev(), torch_dtype(model), model.hidden_size
    params = [expert_weights(model, 0, e).to(device=dev, dtype=dt) for e in range(slots)]
    grads = [torch.zeros_like(p) for p in params]
    rows = torch.arange(slots * m, device=dev).view(m, slots)
    lp = ml.LayerPass(inputs=None, tok_K=torch.zeros(0, dtype=torch.long),
                      gate_K=torch.zeros(0), send_split_W=[], recv_split_W=[],
                      slot_rows=[rows[:, s].contiguous() for s in range(slots)])
    lp.recv_MH = torch.randn(slots * m, H).to(dev, dt)
    lp.grad_recv_MH = torch.randn(slots * m, H).to(dev, dt)
    ml.expert_fwd(lp, params, model)
    saved = list(lp.saved)

    def bwd() -> None:
        lp.saved = saved
        ml.expert_bwd(lp, params, grads, model)
    return (lambda: ml.expert_fwd(lp, params, model)), bwd


def bench_expert(model: ModelSpec, world: int) -> list[dict]:
    """Per-slot expert forward / backward time vs rows ``m`` (all ranks computing)."""
    slots = max(1, model.num_experts // world)
    out = []
    for m in M_SWEEP:
        fwd, bwd = _expert_pass(model, slots, m)
        t_f, t_b = _together(fwd, _reps(m)) / slots, _together(bwd, _reps(m)) / slots
        for passes, t in ((1, t_f), (2, t_b)):
            out.append({"kind": "expert", "m": m, "passes": passes, "t": t, "slots": slots,
                        "flops": passes * m * model.expert_flops_per_token,
                        "bytes": passes * model.expert_weight_bytes})
    return out


def bench_gemm(model: ModelSpec) -> list[dict]:
    """The stand-in matmul ``[m, H] @ [H, n]`` for a few ``(m, n)`` (all ranks computing)."""
    dt, h = torch_dtype(model), model.hidden_size
    out = []
    for m in (64, 256, 1024):
        for n in (8, 64, 4 * h, 16 * h):
            a, b = torch.randn(m, h).to(_dev(), dt), torch.randn(h, n).to(_dev(), dt)
            c = torch.empty(m, n, dtype=dt, device=_dev())
            t = _together(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), _reps(m))
            out.append({"kind": "gemm", "m": m, "n": n, "t": t, "flops": 2.0 * m * h * n,
                        "bytes": float((m * h + h * n + m * n) * a.element_size())})
    return out


def bench_memory(model: ModelSpec) -> list[dict]:
    """The optimizer step as the executor runs it (Adam over expert-sized tensors, one call
    each), host Adam and host copies (all ranks computing)."""
    dt, out, chunk = torch_dtype(model), [], model.params_per_expert
    for k in (1, 2, 4, 8, 16):
        ps = [torch.zeros(chunk, dtype=dt, device=_dev()) for _ in range(k)]
        gs = [torch.randn(chunk).to(_dev(), dt) for _ in range(k)]
        adam = Adam(0.0)

        def step(ps=ps, gs=gs, adam=adam) -> None:
            for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
                adam.step(i, p, g)
        out.append({"kind": "adam", "numel": k * chunk, "calls": k, "t": _together(step, 7)})
    for numel in (2**14, 2**16, 2**18, 2**20):
        hp, hg, host_adam = torch.zeros(numel), torch.randn(numel), Adam(0.0)
        out.append({"kind": "host_adam", "numel": numel,
                    "t": _together(lambda p=hp, g=hg, a=host_adam: a.step("k", p, g), 7)})
        src = torch.zeros(numel * 4, dtype=torch.uint8, device=_dev())  # device → host
        dst = torch.empty(numel * 4, dtype=torch.uint8, pin_memory=src.is_cuda)
        out.append({"kind": "copy", "bytes": numel * 4,
                    "t": _together(lambda s=src, d=dst: d.copy_(s), 7)})
    return out


def bench_concurrency(model: ModelSpec, world: int, m: int = 128) -> dict:
    """One layer-pass expert forward at ``m`` rows per slot, on rank 0 alone (others wait)
    and on all ranks at once: ``together_s / alone_s`` is the concurrency slowdown that the
    compute measurements above already contain."""
    fwd, _ = _expert_pass(model, max(1, model.num_experts // world), m)
    alone = _mean_time(fwd, _reps(m)) if dist.get_rank() == 0 else 0.0
    return {"alone_s": alone, "together_s": _together(fwd, _reps(m)), "m": m}


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


def _compiled(ex: RankExecutor, kind: str, nbytes: int, members: list[int]
              ) -> Callable[[], None]:
    """The executor's compiled work for a synthetic ``kind`` op of ``nbytes`` over
    ``members`` (send/recv: a ring, each member sends ``nbytes`` to the next)."""
    ranks = np.array(members, dtype=np.int64)
    if kind == "send_recv":
        op = SendRecv(phase="relayout", src_N=ranks, dst_N=np.roll(ranks, -1),
                      bytes_N=np.full(len(ranks), float(nbytes)))
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
    straggler alignment), median over ``reps``. The token all-to-all runs two all-to-alls per
    call (dispatch + combine): its time is halved."""
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
            for nbytes in SIZES:
                hb.beat()
                fn = None
                if rank < n:
                    fn = (_token_a2a(model, nbytes, members, group) if kind == "all_to_all"
                          else _compiled(ex, kind, nbytes, members))
                t = _time_collective(fn, reps, busy_s, stagger_s, work)
                rows.append({"kind": kind, "n": n, "bytes": nbytes,
                             "t": t / 2 if kind == "all_to_all" else t})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moesim.executor.calibrate_bench", description=__doc__)
    p.add_argument("--model", default="tiny-cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--heartbeat-dir", default=None)
    args = p.parse_args(argv)
    rank, world = init_distributed(300.0)
    hb = Heartbeat(args.heartbeat_dir, rank)
    model = load_model(args.model)
    compute = bench_expert(model, world)
    hb.beat(force=True)
    compute += bench_gemm(model) + bench_memory(model)
    hb.beat(force=True)
    concurrency = bench_concurrency(model, world)
    coll = bench_collectives(model, rank, world, hb, args.reps)
    if rank == 0:
        meta = {"world_size": world, "cpu_count": os.cpu_count(), "backend": dist.get_backend(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "model": model.name, "compute_concurrent": True,
                "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        Path(args.out).write_text(json.dumps({"compute": compute, "collectives": coll,
                                              "concurrency": concurrency, "meta": meta}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
