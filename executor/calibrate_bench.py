"""Microbenchmarks of the executor's own work, run on every rank of a calibration launch.

``python -m moesim.executor.calibrate_bench --model M --out raw.json`` (N ranks, started by
``moesim calibrate`` like the worker) measures, with the same code paths the executor uses:

- ``expert`` — one slot's expert FFN on ``m`` rows, forward and backward (dgrad + wgrad),
  including the row gather / scatter the executor does per slot, for ``m`` over a sweep;
- ``gemm`` — the stand-in matmul ``[m, H] @ [H, n]`` for a few shapes (attention, router);
- ``adam`` / ``host_adam`` / ``copy`` — the optimizer step, the host Adam and a host copy over
  a sweep of sizes;
- ``collectives`` — all-to-all, all-reduce, all-gather, reduce-scatter and broadcast over groups
  of the first ``n`` ranks (``n = 2..N``) for sizes from 4 KiB to 4 MiB (nccl-tests' size
  convention), with staggered arrivals, timed from the last member's arrival to the last end
  (see :func:`bench_collectives`).

Compute is timed on rank 0 alone while the others wait; ``concurrency`` then times the same
expert forward on all ranks at once (the slowdown is the profile's ``cores_shared_by``). Times
are means over sustained blocks of repeats after a warm-up (so time lost to other processes on
shared cores counts, as it does in a real run). Rank 0 writes ``{"compute": [...],
"collectives": [...], "concurrency": {...}, "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor.interpreter import Adam
from moesim.executor.replay import expert_weights, ffn_backward, ffn_forward, torch_dtype
from moesim.executor.worker import Heartbeat, init_distributed
from moesim.specs import ModelSpec, load_model

M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SIZES = tuple(4096 * 4**k for k in range(6))          # 4 KiB .. 4 MiB
KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast")


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
    ``min_total_s``): like a real program, it includes the time the process loses to other
    processes sharing its cores, which the median of short calls would hide."""
    for _ in range(warmup):
        fn()
    _sync()
    count, t0 = 0, time.perf_counter()
    while count < reps or time.perf_counter() - t0 < min_total_s:
        fn()
        count += 1
    _sync()
    return (time.perf_counter() - t0) / count


def _reps(m: int) -> int:
    return 15 if m <= 256 else 7


def _expert_times(model: ModelSpec, w: torch.Tensor, m: int) -> tuple[float, float]:
    """Median forward and backward seconds of one slot with ``m`` rows (the executor's
    per-slot work: row gather, FFN, row scatter)."""
    recv = torch.randn(2 * m, model.hidden_size).to(w.dtype).to(w.device)
    rows = torch.arange(0, 2 * m, 2, device=w.device)
    buf, grad = torch.empty_like(recv), torch.zeros_like(w)
    _, saved = ffn_forward(recv.index_select(0, rows), w, model)

    def fwd():
        y, _ = ffn_forward(recv.index_select(0, rows), w, model)
        buf.index_copy_(0, rows, y)

    def bwd():
        dx = ffn_backward(recv.index_select(0, rows), saved, w, grad, model)
        buf.index_copy_(0, rows, dx)

    return _mean_time(fwd, _reps(m)), _mean_time(bwd, _reps(m))


def bench_expert(model: ModelSpec) -> list[dict]:
    """Per-slot expert FFN forward / backward time vs rows ``m``."""
    w = expert_weights(model, 0, 0).to(device=_dev(), dtype=torch_dtype(model))
    out = []
    for m in M_SWEEP:
        t_f, t_b = _expert_times(model, w, m)
        out.append({"kind": "expert", "m": m, "passes": 1, "t": t_f,
                    "flops": m * model.expert_flops_per_token,
                    "bytes": model.expert_weight_bytes})
        out.append({"kind": "expert", "m": m, "passes": 2, "t": t_b,
                    "flops": 2 * m * model.expert_flops_per_token,
                    "bytes": 2 * model.expert_weight_bytes})
    return out


def bench_gemm(model: ModelSpec) -> list[dict]:
    """The stand-in matmul ``[m, H] @ [H, n]`` for a few ``(m, n)``."""
    dt, h = torch_dtype(model), model.hidden_size
    out = []
    for m in (64, 256, 1024):
        for n in (8, 64, 4 * h, 16 * h):
            a, b = torch.randn(m, h).to(_dev(), dt), torch.randn(h, n).to(_dev(), dt)
            c = torch.empty(m, n, dtype=dt, device=_dev())
            t = _mean_time(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), _reps(m))
            out.append({"kind": "gemm", "m": m, "n": n, "t": t, "flops": 2.0 * m * h * n,
                        "bytes": float((m * h + h * n + m * n) * a.element_size())})
    return out


def bench_memory(model: ModelSpec) -> list[dict]:
    """Adam (device and host) and host copies over sizes (elements / bytes)."""
    dt, out = torch_dtype(model), []
    for numel in (2**14, 2**16, 2**18, 2**20):
        p, g = torch.zeros(numel, dtype=dt, device=_dev()), torch.randn(numel).to(_dev(), dt)
        adam = Adam(0.0)
        out.append({"kind": "adam", "numel": numel,
                    "t": _mean_time(lambda p=p, g=g, a=adam: a.step("k", p, g), 7)})
        hp, hg, host_adam = torch.zeros(numel), torch.randn(numel), Adam(0.0)
        out.append({"kind": "host_adam", "numel": numel,
                    "t": _mean_time(lambda p=hp, g=hg, a=host_adam: a.step("k", p, g), 7)})
        src = torch.zeros(numel * 4, dtype=torch.uint8, device=_dev())  # device → host
        dst = torch.empty(numel * 4, dtype=torch.uint8, pin_memory=src.is_cuda)
        out.append({"kind": "copy", "bytes": numel * 4,
                    "t": _mean_time(lambda s=src, d=dst: d.copy_(s), 7)})
    return out


def _collective(kind: str, nbytes: int, n: int, group: object | None) -> Callable[[], None]:
    """A closure running one ``kind`` collective of ``nbytes`` (nccl-tests size) in a group."""
    numel = max(n, nbytes // 4 // n * n)
    x = torch.zeros(numel, device=_dev())
    if kind == "all_to_all":
        y = torch.empty_like(x)
        return lambda: dist.all_to_all_single(y, x, group=group)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather":
        part = torch.zeros(numel // n, device=_dev())
        return lambda: getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(
            x, part, group=group)
    if kind == "reduce_scatter":
        part = torch.empty(numel // n, device=_dev())
        return lambda: getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(
            part, x, group=group)
    return lambda: dist.broadcast(x, src=0, group=group)


def bench_concurrency(model: ModelSpec, world: int, m: int = 128) -> dict:
    """Every rank: one slot's expert forward at ``m`` rows, first on rank 0 alone (others
    wait), then on all ranks at once; ``together_s / alone_s`` is what the simulator's
    ``cores_shared_by`` stands for (ranks sharing cores, and any other load on the machine)."""
    w = expert_weights(model, 0, 0).to(device=_dev(), dtype=torch_dtype(model))
    alone = _expert_times(model, w, m)[0] if dist.get_rank() == 0 else 0.0
    dist.barrier()
    together = torch.tensor([_expert_times(model, w, m)[0]], dtype=torch.float64,
                            device=_dev())
    dist.all_reduce(together)
    return {"alone_s": alone, "together_s": float(together) / world, "m": m}


def _busy(seconds: float, work: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Compute (small matmuls) for about ``seconds``, as a rank of a real program does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.matmul(*work)


def bench_collectives(rank: int, world: int, hb: Heartbeat, reps: int,
                      stagger_s: float = 2e-4, busy_s: float = 1e-3) -> list[dict]:
    """Every rank: collectives over the first ``n`` ranks, timed as the executor times them.

    After a barrier every rank computes for ``busy_s + r · stagger_s`` (the executor's ranks
    compute between collectives, which changes how fast a blocked rank is woken when its peers
    share cores; and members arrive one after another), then runs the collective; the time is
    ``max end − max arrival`` over the members (the executor's collective busy time after its
    straggler alignment), mean over ``reps``."""
    work = (torch.randn(64, 64, device=_dev()), torch.randn(64, 64, device=_dev()))
    groups = {n: (dist.new_group(list(range(n))) if n < world else None)
              for n in range(2, world + 1)}
    rows = []
    for n, group in groups.items():
        for kind in KINDS:
            for nbytes in SIZES:
                hb.beat()
                fn = _collective(kind, nbytes, n, group) if rank < n else None
                ts = []
                for i in range(reps + 2):
                    dist.barrier()
                    _busy(busy_s + rank * stagger_s, work)
                    arrive = time.perf_counter() if fn is not None else 0.0
                    if fn is not None:
                        fn()
                        _sync()
                    # one host: perf_counter is the shared monotonic clock, so max over ranks
                    # of absolute times is meaningful (no barrier-exit skew)
                    both = torch.tensor([arrive, time.perf_counter() if fn else 0.0],
                                        dtype=torch.float64, device=_dev())
                    dist.all_reduce(both, op=dist.ReduceOp.MAX)
                    both = both.cpu()
                    if i >= 2:
                        ts.append(float(both[1] - both[0]))
                rows.append({"kind": kind, "n": n, "bytes": nbytes, "t": float(np.mean(ts))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moesim.executor.calibrate_bench", description=__doc__)
    p.add_argument("--model", default="tiny-cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--heartbeat-dir", default=None)
    args = p.parse_args(argv)
    rank, world = init_distributed(300.0)
    hb = Heartbeat(args.heartbeat_dir, rank)
    model = load_model(args.model)
    compute = []
    if rank == 0:
        compute = bench_expert(model) + bench_gemm(model) + bench_memory(model)
    hb.beat(force=True)
    dist.barrier()
    concurrency = bench_concurrency(model, world)
    coll = bench_collectives(rank, world, hb, args.reps)
    if rank == 0:
        meta = {"world_size": world, "cpu_count": os.cpu_count(), "backend": dist.get_backend(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "model": model.name}
        Path(args.out).write_text(json.dumps({"compute": compute, "collectives": coll,
                                              "concurrency": concurrency, "meta": meta}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
