"""Calibration of the attention block a parallel layout runs (``attention_block_eff``).

Under a parallel layout the executor's dense work is the real attention block of
:mod:`moesim.executor.dense_block` (pre-LayerNorm, QKV projection, causal scores, softmax,
values, output projection), not the default layout's stand-in matmuls, and its cost per FLOP
differs from the stand-in's (the score/softmax part is elementwise-heavy; on the 2-vCPU VM the
stand-in-fitted curve priced the block at 0.36–0.88 of its measured time). So ``moesim
calibrate`` also times the block itself, as :class:`~moesim.executor.dataflow.LayoutFlow` runs
it, at every TP size ``t`` the calibration's ranks can form (``t`` dividing the world size
and the head count, ``T·t`` rows holding whole sequences):

- ``fwd`` — the forward with autograd recording (:meth:`LayoutFlow._attention_fwd`):
  ``N = T·t`` gathered rows through this rank's ``a/t`` heads;
- ``bwd`` — ``torch.autograd.grad`` of that graph for the input and both weight shards, the
  weight gradients added into a flat gradient (:meth:`LayoutFlow.attention_grads`), the graph
  built untimed before each call;
- ``recompute`` — full recomputation's forward (:func:`flow_recompute.compile_dense`: the
  same forward, graph kept), timed on its own calls.

Each is measured as a run does it (all ranks at once, each on its own TP shard, one call after
a barrier, median over calls, averaged over ranks; the layers' weights and inputs cycle so the
data is out of cache); the three passes take turns round by round, so a slow patch of a shared
machine falls on all of them (measured one after another, the forward and the recompute — the
same work — once differed by 2× on the loaded 2-vCPU VM). :func:`fit_block` turns each time
into the efficiency that makes the cost model's price of the op the lowering emits
(``StageView.layer_kw`` / ``backward_kw``: forward ``attention_flops_per_token·T`` FLOPs,
backward twice the attention's and the router's) equal the measured time at
``gemm_rows = T·t``.

Not measured here: the forward of a fully recomputed layer runs under ``no_grad`` and is priced
with the ``fwd`` curve (a little above its cost); selective ``core_attn`` recompute is priced
from its FLOPs with ``dense_gemm_eff_curve``.

Shape legend: ``N`` rows of a TP region (``T·t``), ``H`` hidden, ``K`` measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import dense_block as db
from moesim.specs import ModelSpec

PASSES = ("fwd", "bwd", "recompute")
REPS = 15
COLD_SETS = 4  # independent layers' weights and inputs cycled per measurement


def tp_sizes(model: ModelSpec, world: int) -> tuple[int, ...]:
    """TP sizes to measure: every ``t`` dividing ``world`` whose shard the layout dataflow
    can run (:func:`dense_block.check_model`)."""
    from moesim.errors import MoesimError

    out = []
    for t in range(1, world + 1):
        if world % t:
            continue
        try:
            db.check_model(model, t, model.tokens_per_rank * t)
        except MoesimError:  # a shard (or a model) the layout dataflow refuses: not run
            continue
        out.append(t)
    return tuple(out)


def priced_flops(model: ModelSpec, passes: str) -> float:
    """FLOPs of one rank's attention op of pass ``passes`` as the lowering prices it
    (:meth:`moesim.stage_context.StageView.layer_kw` / ``backward_kw``)."""
    T, H, E = model.tokens_per_rank, model.hidden_size, model.num_experts
    fwd = model.attention_flops_per_token * T
    return 2.0 * (fwd + 2.0 * H * E * T) if passes == "bwd" else fwd


def _block_set(model: ModelSpec, layer: int, index: int, tp: int, dev: torch.device,
               dtype: torch.dtype) -> dict:
    """One layer's TP shard (weights as leaves), its gathered input ``[N, H]``, an upstream
    gradient and a flat gradient to accumulate into."""
    from moesim.executor.replay import _generator

    shard = db.tp_shard(db.dense_weights(model, layer), index, tp)
    w = {k: shard[k].to(dev, dtype).requires_grad_(True) for k in ("qkv", "out")}
    N = model.tokens_per_rank * tp
    g = _generator(0x5EED_00CA, layer, index, tp)
    x = torch.randn(N, model.hidden_size, generator=g).to(dev, dtype)
    grad = torch.randn(N, model.hidden_size, generator=g).to(dev, dtype)
    flat = torch.zeros(sum(v.numel() for v in w.values()), device=dev, dtype=dtype)
    return {"w": w, "x": x, "grad": grad, "flat": flat, "graph": None}


def _forward(s: dict, seq_len: int) -> None:
    leaf = s["x"].detach().requires_grad_(True)
    with torch.enable_grad():
        out = db.attention(leaf, s["w"], seq_len)
    s["graph"] = (leaf, out)


def _backward(s: dict) -> None:
    leaf, out = s["graph"]
    g = torch.autograd.grad(out, [leaf, s["w"]["qkv"], s["w"]["out"]], s["grad"])
    n = g[1].numel()
    s["flat"][:n] += g[1].reshape(-1)
    s["flat"][n:] += g[2].reshape(-1)
    s["graph"] = None


def _timed_rounds(steps: list[tuple[Callable[[int], None], Callable[[int], None]]],
                  reps: int) -> list[float]:
    """Seconds of each step's ``run(i)`` as a run makes the call (every rank at once, right
    after a barrier; its ``prepare(i)`` untimed before it): ``reps`` rounds, each calling
    every step once in turn, so a slow patch of a shared machine hits all steps alike; the
    median over rounds per step, averaged over ranks."""
    from moesim.executor.calibrate_bench import _dev, _sync

    ts: list[list[float]] = [[] for _ in steps]
    for i in range(reps + 2):  # two warm-up rounds
        for k, (prepare, run) in enumerate(steps):
            prepare(i)
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            run(i)
            _sync()
            if i >= 2:
                ts[k].append(time.perf_counter() - t0)
    t = torch.tensor([float(np.median(x)) for x in ts], dtype=torch.float64, device=_dev())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def bench_attention_block(model: ModelSpec, rank: int, world: int, reps: int = REPS
                          ) -> list[dict]:
    """Rows ``{"kind": "attention_block", "pass", "tp", "rows", "flops", "t"}`` per TP size
    and pass (module docstring); every rank calls it."""
    from moesim.executor.calibrate_bench import _dev
    from moesim.executor.replay import torch_dtype

    dev, dtype, s_len = _dev(), torch_dtype(model), model.seq_len
    out = []
    for tp in tp_sizes(model, world):
        sets = [_block_set(model, layer, rank % tp, tp, dev, dtype) for layer in range(COLD_SETS)]

        def none(i: int) -> None:
            return None

        def fwd(i: int, sets: list = sets) -> None:  # forward, and the graph bwd runs on
            _forward(sets[i % len(sets)], s_len)

        def bwd(i: int, sets: list = sets) -> None:
            _backward(sets[i % len(sets)])

        def recompute(i: int, sets: list = sets) -> None:  # the same forward, its own set
            _forward(sets[(i + 1) % len(sets)], s_len)

        times = dict(zip(PASSES, _timed_rounds([(none, fwd), (none, bwd), (none, recompute)],
                                               reps), strict=True))
        for p in PASSES:
            out.append({"kind": "attention_block", "pass": p, "tp": tp,
                        "rows": model.tokens_per_rank * tp, "flops": priced_flops(model, p),
                        "t": times[p]})
        del sets
    return out


def fit_block(compute: dict, rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """``attention_block_eff``: per pass, at each measured row count ``N``, the efficiency
    ``flops / (peak · (t − launch))`` with which the cost model's
    ``flops / (peak · eff) + launch`` gives back the measured time ``t`` (geometric mean over
    repeated rows); empty without measurements."""
    peak, launch = compute["peak_flops"], compute["launch_s"]
    out: dict[str, list[tuple[float, float]]] = {}
    for p in PASSES:
        sel = [r for r in rows if r["pass"] == p]
        curve = []
        for m in sorted({r["rows"] for r in sel}):
            effs = [r["flops"] / (peak * max(r["t"] - launch, 1e-9))
                    for r in sel if r["rows"] == m]
            curve.append((float(m), float(np.clip(np.exp(np.mean(np.log(effs))), 1e-4, 1.0))))
        if curve:
            out[p] = curve
    return out


def summary_line(rows: list[dict]) -> str:
    """One line: the measured block times per TP size and pass."""
    parts = [f"tp{r['tp']} {r['pass']} {r['t'] * 1e3:.2f} ms" for r in rows]
    return "  attention block: " + (", ".join(parts) if parts else "not measured")
