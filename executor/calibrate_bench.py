"""Microbenchmarks of the executor's own work, run on every rank of a calibration launch.

``python -m moesim.executor.calibrate_bench --model M --out raw.json`` (N ranks, started by
``moesim calibrate`` like the worker) measures, through the executor's own code paths:

- ``expert`` — the expert op of one layer-pass (:func:`~moesim.executor.moe_layer.expert_fwd` /
  ``expert_bwd``: row gather, FFN or dgrad + wgrad, row scatter) over ``S = E / N`` local
  slots of ``m`` rows each, for ``m`` over a sweep; recorded per slot (``t / S``), so the cost
  model's per-slot sum reproduces it — cycling over independent layer-passes so each call
  finds its weights and rows out of the core's cache, as in a run (a hot loop over one
  slot's data is 1.2–1.5× faster than the run's expert op);
- ``gemm`` — the stand-in matmul ``[m, H] @ [H, n]`` for a few shapes, back to back (per-op
  overhead: ``launch_s``);
- ``standin`` — the executor's stand-in for attention / router work at the FLOPs the lowering
  gives those ops (the simulator prices them with the dense efficiency this yields);
- ``attention_block`` — the real attention block a parallel layout runs, forward, backward and
  recompute at every TP shard size (:mod:`moesim.executor.calibrate_block`);
- ``op_overhead`` — the interpreter's own time between two ops (:func:`bench_op_overhead`);
- ``adam`` — the executor's optimizer step: Adam over expert-sized tensors one call each, as
  :meth:`RankExecutor._optimizer_step` walks the slots; ``host_adam`` / ``copy`` — the host
  Adam and host copies over sizes;
- ``collectives`` — every collective kind the programs use, compiled by
  :meth:`RankExecutor.compile` from a synthetic op (the interpreter's async start + wait, its
  buffers), and the token all-to-all of :func:`~moesim.executor.moe_layer.dispatch_fwd` /
  ``combine_fwd`` (row gather, uneven ``all_to_all_single``, gate-weighted scatter-add); over
  groups of the first ``n`` ranks (``n = 2..N``) for sizes from 4 KiB to 4 MiB (nccl-tests'
  size convention), send/recv as a ring over all ranks with 1, 2 and 4 transfers per rank
  (gloo pays a fixed cost per message), timed as the executor's records time them (see
  :func:`~moesim.executor.calibrate_collectives.bench_collectives`).

Measurement hygiene: one intra-op thread per rank (:func:`init_distributed`), warm-up calls
excluded, and compute measured as a run does it (:func:`_together`): *all ranks at once*, one
call after each barrier (so the process has blocked and been woken, as between a run's ops),
median over calls, averaged over ranks — the concurrency slowdown (ranks sharing cores,
memory bandwidth) is in the measured numbers and the profile's ``cores_shared_by`` is 1
(``concurrency`` also times one expert forward on rank 0 alone and on all ranks together, for
the record); memory-bound work (optimizer, copies) and expert / stand-in compute cycle over
enough tensors to run out of cache as a run's once-per-pass work does; collective times are
medians over repeats (a burst of another process's work on a shared machine is not the op's
cost; validation takes the median over repeated runs likewise). Rank 0 writes
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

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_layer as ml
from moesim.executor.calibrate_block import bench_attention_block
from moesim.executor.calibrate_collectives import (  # noqa: F401  (re-exported)
    GROUP_KINDS,
    KINDS,
    SEND_RECV_TRANSFERS,
    SIZES,
    _compiled,
    _time_collective,
    _token_a2a,
    bench_collectives,
)
from moesim.executor.interpreter import RankExecutor
from moesim.executor.optim import HOST_ADAM_CHUNK, Adam
from moesim.executor.replay import expert_weights, torch_dtype
from moesim.executor.worker import Heartbeat, init_distributed
from moesim.specs import ModelSpec, load_model

M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # extended by :func:`m_sweep`


def _dev() -> torch.device:
    """The device the executor would use on this rank (CUDA under NCCL, else CPU)."""
    from moesim.executor.worker import _device

    return _device()


def _sync() -> None:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def _mean_time(fn: Callable[[], object], reps: int, warmup: int = 2,
               min_total_s: float = 0.03) -> float:
    """Seconds per call: the best over blocks of calls (at least ``reps`` calls and
    ``min_total_s`` in all, 5 blocks or more), after ``warmup`` untimed calls. Each block's
    mean keeps the cost of back-to-back calls; the best block is the one no other process
    interrupted (bursts of other jobs on a shared machine are not the program's cost; the
    validation runs take the median over repeats, at raised priority, for the same reason)."""
    for _ in range(warmup):
        fn()
    _sync()
    blocks, t_end = [], time.perf_counter() + min_total_s
    per_block = max(1, -(-reps // 5))
    while len(blocks) < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        _sync()
        blocks.append((time.perf_counter() - t0) / per_block)
    return float(np.min(blocks))


def _together_loop(fn: Callable[[], object], reps: int) -> float:
    """:func:`_mean_time` on every rank at once, averaged over ranks: back-to-back calls (a
    per-op overhead, as between consecutive compute ops of a run)."""
    dist.barrier()
    t = torch.tensor([_mean_time(fn, reps)], dtype=torch.float64, device=_dev())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _together(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Seconds of one call of ``fn`` as a run makes it: every rank calls it at the same time
    right after a collective (a barrier: the process blocked and was woken, as between a
    run's ops), one call per barrier; the median over ``reps`` calls, averaged over ranks.
    Back-to-back calls in a hot loop run 1.5–2× faster than the same op in a program."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor([float(np.median(ts))], dtype=torch.float64, device=_dev())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _reps(m: int) -> int:
    return 15 if m <= 256 else 7


COLD_BYTES = 16 * 2**20  # > both cores' L2: a run touches each op's data once per pass


def _rotating(make: Callable[[int], Callable[[], None]], set_bytes: float
              ) -> Callable[[], None]:
    """A closure that runs ``make(i)``'s work for ``i`` cycling over enough independent
    tensor sets (``set_bytes`` each) to span :data:`COLD_BYTES`, so each call finds its data
    out of the core's cache, as a run's once-per-iteration optimizer step and copies do."""
    works = [make(i) for i in range(max(1, int(np.ceil(COLD_BYTES / max(set_bytes, 1.0)))))]
    state = [0]

    def run() -> None:
        works[state[0] % len(works)]()
        state[0] += 1
    return run


def bench_standin(model: ModelSpec, rank: int, world: int) -> list[dict]:
    """The executor's stand-in for a layer's non-expert work (:meth:`RankExecutor._standin`)
    at the FLOPs the lowering gives it: dense forward (``attention_flops_per_token · T``),
    dense backward (2 × (dense + router)) and the router (``2·H·E·T``); ``rows`` is the GEMM
    shape the op names (``T`` = tokens per rank)."""
    T, H, F = model.tokens_per_rank, model.hidden_size, model.ffn_hidden_size
    dense, router = model.attention_flops_per_token * T, 2.0 * H * model.num_experts * T
    set_bytes = model.expert_weight_bytes + T * (3 * H + 3 * F) * model.bytes_activation
    out = []
    for name, flops in (("dense_fwd", dense), ("dense_bwd", 2 * (dense + router)),
                        ("router", router)):
        def make(i: int, flops: float = flops) -> Callable[[], None]:
            return RankExecutor(model, rank, world, _dev())._standin(flops)
        out.append({"kind": "standin", "name": name, "rows": T, "flops": flops,
                    "t": _together(_rotating(make, set_bytes), 15)})
    return out


def m_sweep(model: ModelSpec, world: int) -> tuple[int, ...]:
    """Rows per slot to measure: :data:`M_SWEEP`, extended by powers of two up to the most
    rows one slot can receive in a micro-batch (every rank's every token: a token picks an
    expert at most once), so a run's ``m`` is never past the measured range (a skewed real
    trace sends every token of a micro-batch to its two hottest experts)."""
    most = world * model.tokens_per_rank  # tokens_per_rank: one micro-batch's
    sweep = list(M_SWEEP)
    while sweep[-1] < most:
        sweep.append(sweep[-1] * 2)
    return tuple(sweep)


_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _weights(model: ModelSpec, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weights on this rank's device, made once per calibration (seeded
    generation on the CPU costs ~1 s per Mixtral-sized expert; the sweep reuses them)."""
    key = (model.name, expert)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = expert_weights(model, 0, expert).to(device=_dev(),
                                                            dtype=torch_dtype(model))
    return _WEIGHTS[key]


def _expert_pass(model: ModelSpec, slots: int, m: int, first_expert: int = 0
                 ) -> tuple[Callable, Callable]:
    """Forward and backward closures of one layer-pass's expert op: ``slots`` local slots of
    ``m`` rows each, laid out as a receive buffer from every rank holds them."""
    dev, dt, H = _dev(), torch_dtype(model), model.hidden_size
    params = [_weights(model, first_expert + e) for e in range(slots)]
    grads = [torch.zeros_like(p) for p in params]
    # the receive buffer holds, per source rank, its rows slot by slot (moe_layer.plan_pass)
    sources = dist.get_world_size()
    per_src = [m // sources + (1 if w < m % sources else 0) for w in range(sources)]
    slot_of_row = np.concatenate([np.repeat(np.arange(slots), c) for c in per_src])
    lp = ml.LayerPass(inputs=None, tok_K=torch.zeros(0, dtype=torch.long),
                      gate_K=torch.zeros(0), send_split_W=[], recv_split_W=[],
                      slot_rows=[torch.from_numpy(np.flatnonzero(slot_of_row == s)).to(dev)
                                 for s in range(slots)])
    lp.recv_MH = torch.randn(slots * m, H).to(dev, dt)
    lp.grad_recv_MH = torch.randn(slots * m, H).to(dev, dt)
    ml.expert_fwd(lp, params, model)
    saved = list(lp.saved)

    def bwd() -> None:
        lp.saved = saved
        ml.expert_bwd(lp, params, grads, model)
    return (lambda: ml.expert_fwd(lp, params, model)), bwd


def _expert_sets(model: ModelSpec, slots: int, m: int) -> tuple[Callable, Callable]:
    """Forward and backward closures cycling over enough independent layer-passes (own
    weights, rows, activations) to span :data:`COLD_BYTES`: a run's expert op finds its
    weights and rows out of the core's cache, as other layers' work ran in between."""
    H, F = model.hidden_size, model.ffn_hidden_size
    per_set = slots * (model.expert_weight_bytes + m * (3 * H + 4 * F) * model.bytes_activation)
    passes = [_expert_pass(model, slots, m, i * slots)
              for i in range(max(1, int(np.ceil(COLD_BYTES / per_set))))]
    state = [0, 0]

    def fwd() -> None:
        passes[state[0] % len(passes)][0]()
        state[0] += 1

    def bwd() -> None:
        passes[state[1] % len(passes)][1]()
        state[1] += 1
    return fwd, bwd


def bench_expert(model: ModelSpec, world: int) -> list[dict]:
    """Per-slot expert forward / backward time vs rows ``m`` (all ranks computing, data out
    of cache)."""
    slots = max(1, model.num_experts // world)
    out = []
    for m in m_sweep(model, world):
        fwd, bwd = _expert_sets(model, slots, m)
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
            t = _together_loop(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), _reps(m))
            out.append({"kind": "gemm", "m": m, "n": n, "t": t, "flops": 2.0 * m * h * n,
                        "bytes": float((m * h + h * n + m * n) * a.element_size())})
    return out


def bench_memory(model: ModelSpec, world: int = 1) -> list[dict]:
    """The optimizer step as the executor runs it (Adam over expert-sized tensors, one call
    each), host Adam and host copies (all ranks computing, data out of cache)."""
    dt, dev, out, chunk = torch_dtype(model), _dev(), [], model.params_per_expert
    elem = torch.empty(0, dtype=dt).element_size()

    def adam_set(k: int) -> Callable[[int], Callable[[], None]]:
        def make(i: int) -> Callable[[], None]:
            ps = [torch.zeros(chunk, dtype=dt, device=dev) for _ in range(k)]
            gs = [torch.randn(chunk).to(dev, dt) for _ in range(k)]
            adam = Adam(0.0)

            def step() -> None:
                for j, (p, g) in enumerate(zip(ps, gs, strict=True)):
                    adam.step(j, p, g)
            return step
        return make

    for k in (1, 2, 4, 8, 16):
        fn = _rotating(adam_set(k), 4 * k * chunk * elem)  # p, g, m, v
        out.append({"kind": "adam", "numel": k * chunk, "calls": k, "t": _together(fn, 7)})

    def host_adam_set(numel: int) -> Callable[[int], Callable[[], None]]:
        def make(i: int) -> Callable[[], None]:
            p, g, adam = torch.zeros(numel), torch.randn(numel), Adam(0.0, HOST_ADAM_CHUNK)
            return lambda: adam.step("k", p, g)
        return make

    def copy_set(nbytes: int) -> Callable[[int], Callable[[], None]]:
        def make(i: int) -> Callable[[], None]:
            src = torch.zeros(nbytes, dtype=torch.uint8, device=dev)  # device → host
            dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=src.is_cuda)
            return lambda: dst.copy_(src)
        return make

    for numel in _host_sizes(model, world):
        out.append({"kind": "host_adam", "numel": numel,
                    "t": _together(_rotating(host_adam_set(numel), 16 * numel), 7)})
        out.append({"kind": "copy", "bytes": numel * 4,
                    "t": _together(_rotating(copy_set(numel * 4), 8 * numel), 7)})
    return out


def _host_sizes(model: ModelSpec, world: int) -> list[int]:
    """Parameter counts for the host Adam and copy benchmarks: 2^14 … 2^20 and on, by powers
    of 4, up to this model's expert parameters per rank (a host optimizer shard, the largest
    host op a run issues; capped at 2^24): a memory-bound rate measured only on cache-sized
    buffers overstates it for the shard a run actually steps."""
    shard = model.expert_params_per_layer * model.num_layers / max(world, 1)
    sizes = [2**14, 2**16, 2**18, 2**20]
    while sizes[-1] < min(shard, 2**24):
        sizes.append(sizes[-1] * 4)
    return sizes


def bench_concurrency(model: ModelSpec, world: int, m: int = 128) -> dict:
    """One layer-pass expert forward at ``m`` rows per slot, on rank 0 alone (others wait)
    and on all ranks at once: ``together_s / alone_s`` is the concurrency slowdown that the
    compute measurements above already contain."""
    fwd, _ = _expert_pass(model, max(1, model.num_experts // world), m)
    alone = _mean_time(fwd, _reps(m)) if dist.get_rank() == 0 else 0.0
    return {"alone_s": alone, "together_s": _together(fwd, _reps(m)), "m": m}


def bench_op_overhead(model: ModelSpec, rank: int, world: int, hb: Heartbeat,
                      ops: int = 200) -> dict:
    """Seconds the interpreter spends between two consecutive ops (its loop: waits, timer
    marks, heartbeat): :meth:`RankExecutor.run` on a program of ``ops`` empty compute ops,
    median gap between one op's end and the next one's start, averaged over ranks."""
    from moesim.ops import Compute, Program

    program = Program(num_ranks=world)
    for _ in range(ops):
        program.add(Compute(phase="dense", flops_R=np.zeros(world), bytes_R=np.zeros(world)))
    ex = RankExecutor(model, rank, world, _dev())
    gaps = []
    for i in range(4):
        events = sorted(ex.run(program, progress=hb.beat).events)
        if i:
            gaps += [b[1] - a[2] for a, b in zip(events[:-1], events[1:], strict=True)]
    gap = torch.tensor([float(np.median(gaps))], dtype=torch.float64, device=_dev())
    dist.all_reduce(gap)
    return {"gap_s": float(gap) / world, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moesim.executor.calibrate_bench", description=__doc__)
    p.add_argument("--model", default="tiny-cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", "--reps", dest="reps", type=int, default=15)
    p.add_argument("--heartbeat-dir", default=None)
    args = p.parse_args(argv)
    rank, world = init_distributed(300.0)
    hb = Heartbeat(args.heartbeat_dir, rank)
    model = load_model(args.model)
    compute = bench_expert(model, world)
    hb.beat(force=True)
    compute += bench_gemm(model) + bench_standin(model, rank, world) + bench_memory(model, world)
    compute += bench_attention_block(model, rank, world)
    hb.beat(force=True)
    concurrency = bench_concurrency(model, world)
    overhead = bench_op_overhead(model, rank, world, hb)
    coll = bench_collectives(model, rank, world, hb, args.reps)
    if rank == 0:
        meta = {"world_size": world, "cpu_count": os.cpu_count(), "backend": dist.get_backend(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "model": model.name, "compute_concurrent": True,
                **({"device": torch.cuda.get_device_name(),
                    "device_memory_GiB": round(torch.cuda.get_device_properties(
                        _dev()).total_memory / 2**30, 2)} if _dev().type == "cuda" else {}),
                "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        Path(args.out).write_text(json.dumps({"compute": compute, "collectives": coll,
                                              "concurrency": concurrency,
                                              "op_overhead": overhead, "meta": meta}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
