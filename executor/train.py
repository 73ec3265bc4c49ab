"""Executor train mode: train the tiny MoE LM for real under a placement policy; time-to-loss.

Shape legend: ``L`` MoE layers, ``E`` experts, ``W`` ranks, ``S`` slots per rank, ``P = W·S``
slots, ``N`` tokens per rank, ``D`` model width, ``F`` expert width, ``K`` top-k.

Every step (one pass = one iteration) on each of ``W`` gloo ranks:

1. ``route`` — the policy decides this step's placement from the routing counts of earlier steps
   (``make_policy(name).decide(History(...), ModelSpec, Cluster, rng)``; every rank calls it with
   the same inputs and seed, so all hold the same :class:`~moesim.placement.Decision`).
2. ``param_gather`` — **master copies**: expert ``e``'s weights and Adam state live only on its
   home rank ``e·W // E``; each step the home sends a fresh copy to every slot holding ``e``
   (one ``all_to_all_single``). Replicas are therefore identical by construction, and a placement
   change costs nothing extra beyond this copy.
3. ``dispatch`` / ``expert`` / ``combine`` — the dense model runs data-parallel; each MoE layer
   splits a rank's token assignments over ``e``'s replicas with the Decision's routing rule
   (:func:`moesim.routing.split_tokens`, the simulator's own function), drops what exceeds
   ``slot_capacity`` per (source, slot) (first choices queue first), and moves tokens with
   differentiable ``all_to_all_single`` calls (a small autograd Function below).
4. ``grad_sync`` — dense gradients are all-reduced; every replica's gradient is sent to the
   expert's home (one ``all_to_all_single``) and summed there, i.e. replica gradients are reduced
   onto the master copy, then averaged over ranks.
5. ``optimizer`` — Adam on the dense parameters (everywhere, identically) and on the master
   experts (at their homes).

Logged per step: global mean LM loss, dropped assignments, wall time (max over ranks).
Time-to-target-loss is the wall time until the mean LM loss over the last ``smooth`` steps first
falls to the target (SwiftMoE's headline metric). The same model trained in one process with
``groups=W`` (:func:`reference_losses`) gives the same losses when nothing is dropped.

This file is longer than most (~350 lines) because the per-rank step is one piece: splitting it
across modules would scatter the order of collectives every rank must agree on.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as std_mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moesim.errors import MoesimError
from moesim.executor.launch import free_port
from moesim.executor.train_experts import DistributedExperts, Experts
from moesim.executor.train_results import (  # noqa: F401  (running_mean re-exported)
    config_dict,
    fmt,
    running_mean,
    time_to_target,
    write_results,
)
from moesim.policies import History, make_policy, policy_class
from moesim.specs import Cluster, ModelSpec, load_cluster
from moesim.traces.record_train import Corpus, load_corpus, sample_batch
from moesim.traces.tinylm import Adam, TinyLMConfig, TinyMoELM, build_model


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Knobs of one distributed training run (the same for every policy compared)."""

    model: TinyLMConfig = field(default_factory=lambda: TinyLMConfig(
        num_layers=2, d_model=64, ffn_hidden=128, num_experts=8, top_k=2, seq_len=64))
    world_size: int = 2
    tokens_per_rank: int = 256
    steps: int = 60
    lr: float = 3e-3
    seed: int = 0
    capacity_factor: float | None = 1.0
    slots_per_rank: int | None = None
    target_loss: float | None = None
    smooth: int = 5
    timeout_s: float = 300.0
    corpus_files: tuple[str, ...] | None = None
    max_corpus_bytes: int = 2_000_000

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= 16:
            raise MoesimError(f"world_size={self.world_size} must be between 1 and 16")
        if self.tokens_per_rank % self.model.seq_len:
            raise MoesimError(f"tokens_per_rank={self.tokens_per_rank} must be a multiple of "
                              f"seq_len={self.model.seq_len}")
        if self.model.capacity_factor is not None:
            raise MoesimError("set capacity_factor on TrainConfig (the policy applies it), "
                              "not on the model")
        if self.steps < 1 or self.smooth < 1 or not self.timeout_s > 0:
            raise MoesimError("steps and smooth must be >= 1 and timeout_s > 0")


def model_spec(cfg: TrainConfig) -> ModelSpec:
    """The :class:`ModelSpec` policies see for the tiny LM."""
    m = cfg.model
    return ModelSpec(name="tinylm", num_layers=m.num_layers, hidden_size=m.d_model,
                     ffn_hidden_size=m.ffn_hidden, num_experts=m.num_experts, top_k=m.top_k,
                     gated=False, seq_len=m.seq_len, tokens_per_rank=cfg.tokens_per_rank,
                     bytes_weight=4.0, bytes_grad=4.0, bytes_activation=4.0)


def cpu_cluster(world_size: int) -> Cluster:
    """The CPU/gloo cluster preset reshaped to one node of ``world_size`` ranks."""
    return load_cluster("cpu-gloo-4").with_shape(1, world_size)


def policy_knobs(name: str, cfg: TrainConfig) -> dict:
    """Capacity factor and slots per rank, for the policies that have those knobs."""
    fields = set(policy_class(name).Config.__dataclass_fields__)
    knobs: dict = {}
    if "capacity_factor" in fields:
        knobs["capacity_factor"] = cfg.capacity_factor
    if "slots_per_rank" in fields:
        E, W = cfg.model.num_experts, cfg.world_size
        knobs["slots_per_rank"] = cfg.slots_per_rank or math.ceil(1.5 * E / W)
    return knobs


def global_batch(corpus, cfg: TrainConfig, rng: np.random.Generator):
    """The step's whole batch ``[W·N/S, S]`` (inputs, targets); rank ``r`` takes block ``r``."""
    return sample_batch(corpus, cfg.world_size * cfg.tokens_per_rank // cfg.model.seq_len,
                        cfg.model.seq_len, rng)


# ----------------------------------------------------------------------------- one rank

def _dense_params(model: TinyMoELM) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.endswith(("moe.w1", "moe.w2"))]


def _average_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """``grad_sync`` of the dense part: one all-reduce of all gradients, divided by ``world``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, torch.split(flat, [g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)


def _local_block(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.view(world, -1, x.shape[1])[rank]


def _train_rank(rank: int, cfg: TrainConfig, policy_name: str, corpus: Corpus) -> list[dict]:
    """The training loop of one rank; returns per-step records (identical on every rank)."""
    W = cfg.world_size
    model = build_model(cfg.model, cfg.seed)
    experts = Experts(model, rank, W, cfg.lr)
    dense = _dense_params(model)
    opt = Adam(dense, lr=cfg.lr)
    policy = make_policy(policy_name, policy_knobs(policy_name, cfg))
    spec, cluster = model_spec(cfg), cpu_cluster(W)
    data_rng, policy_rng = np.random.default_rng(cfg.seed), np.random.default_rng(cfg.seed + 1)
    past: list[np.ndarray] = []
    decision, records, wall = None, [], 0.0
    for step in range(cfg.steps):
        start = time.perf_counter()
        history = History(step, _past_array(past, spec, W), 1, decision)
        decision = policy.decide(history, spec, cluster, policy_rng)
        experts.gather(decision)
        x, y = global_batch(corpus, cfg, data_rng)
        fn = DistributedExperts(experts, decision, cluster, cfg.model.top_k)
        loss, lm, _ = model(_local_block(x, rank, W), _local_block(y, rank, W), 1, fn)
        opt.zero_grad()
        loss.backward()
        _average_grads(dense, W)
        experts.reduce_grads(decision)
        opt.step()
        if experts.opt is not None:
            experts.opt.step()
        stats = torch.tensor([float(lm.detach()), float(fn.dropped)], dtype=torch.float64)
        dist.all_reduce(stats)
        counts = _gather_counts(fn, cfg, W)
        past.append(counts)
        step_s = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
        wall += float(step_s)
        records.append({"step": step, "loss": float(stats[0]) / W, "dropped": int(stats[1]),
                        "step_time_s": float(step_s), "wall_s": wall,
                        "replicas_max": int(decision.placement.logcnt_LE.max())})
    return records


def _past_array(past: list[np.ndarray], spec: ModelSpec, W: int) -> np.ndarray:
    if not past:
        return np.zeros((0, spec.num_layers, W, spec.num_experts), dtype=np.int64)
    return np.stack(past)


def _gather_counts(fn: DistributedExperts, cfg: TrainConfig, W: int) -> np.ndarray:
    """This step's chosen counts of all ranks, ``[L, R, E]``."""
    mine = torch.from_numpy(np.stack([fn.counts_LE[l] for l in range(cfg.model.num_layers)]))
    parts = [torch.zeros_like(mine) for _ in range(W)]
    dist.all_gather(parts, mine)
    return torch.stack(parts, dim=1).numpy()


def _worker(rank: int, cfg: TrainConfig, policy_name: str, corpus: Corpus, port: int,
            queue) -> None:
    """Process entry: join the gloo group, train, report (rank 0) or the error (any rank)."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=cfg.world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))
        try:
            records = _train_rank(rank, cfg, policy_name, corpus)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            queue.put(("ok", records))
    except Exception as exc:  # noqa: BLE001 - forwarded to the parent as one line
        last = traceback.format_exc().strip().splitlines()[-1]
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc} ({last})"))


# ----------------------------------------------------------------------------- launching

def _mp_context():
    """``forkserver`` where available: its server imports torch and moesim once, and every rank
    of every later run forks from it (a fresh process, no OpenMP state inherited from the
    caller). ``spawn`` elsewhere."""
    if "forkserver" in std_mp.get_all_start_methods():
        ctx = std_mp.get_context("forkserver")
        # not this module itself: under ``python -m`` the children re-run it as __mp_main__
        ctx.set_forkserver_preload(["torch", "moesim.policies", "moesim.traces.record_train",
                                    "moesim.routing", "moesim.specs"])
        return ctx
    return std_mp.get_context("spawn")


def run_policy(cfg: TrainConfig, policy_name: str) -> list[dict]:
    """Train under one policy on ``cfg.world_size`` spawned gloo processes; per-step records."""
    make_policy(policy_name, policy_knobs(policy_name, cfg))  # fail fast on bad knobs
    if policy_class(policy_name).oracle:
        raise MoesimError(f"{policy_name!r} is an oracle (it needs a step's routing before "
                          "deciding it); train mode runs non-oracle policies only")
    ctx = _mp_context()
    queue = ctx.Queue()
    port = free_port()
    corpus = load_corpus(cfg.corpus_files, cfg.max_corpus_bytes)
    procs = [ctx.Process(target=_worker, args=(r, cfg, policy_name, corpus, port, queue),
                         daemon=True)
             for r in range(cfg.world_size)]
    for p in procs:
        p.start()
    try:
        status, payload = queue.get(timeout=cfg.timeout_s)
    except Exception:  # queue.Empty
        status, payload = "error", f"no result within {cfg.timeout_s:.0f} s"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if status != "ok":
        raise MoesimError(f"train run with policy {policy_name!r} failed: {payload}")
    return payload


def reference_losses(cfg: TrainConfig, steps: int) -> list[float]:
    """Single-process training of the same model on the same data (``groups = W``, no drops)."""
    model = build_model(cfg.model, cfg.seed)
    opt = Adam(list(model.parameters()), lr=cfg.lr)
    corpus = load_corpus(cfg.corpus_files, cfg.max_corpus_bytes)
    rng = np.random.default_rng(cfg.seed)
    out = []
    for _ in range(steps):
        x, y = global_batch(corpus, cfg, rng)
        loss, lm, _ = model(x, y, groups=cfg.world_size)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(lm.detach()))
    return out


def compare_policies(cfg: TrainConfig, policies: list[str], out_dir: str | Path | None = None,
                     log=print) -> dict:
    """Train under each policy; summary (+ ``train_results.json`` and a PNG when ``out_dir``)."""
    runs, summary = {}, {}
    for name in policies:
        t0 = time.perf_counter()
        runs[name] = run_policy(cfg, name)
        recs = runs[name]
        summary[name] = {
            "final_loss": float(np.mean([r["loss"] for r in recs[-cfg.smooth:]])),
            "total_wall_s": recs[-1]["wall_s"],
            "dropped_fraction": sum(r["dropped"] for r in recs)
            / (len(recs) * cfg.world_size * cfg.tokens_per_rank * cfg.model.top_k
               * cfg.model.num_layers),
            "time_to_target_s": time_to_target(recs, cfg.target_loss, cfg.smooth),
            "launch_overhead_s": time.perf_counter() - t0 - recs[-1]["wall_s"],
        }
        if log:
            log(f"{name}: " + ", ".join(f"{k}={fmt(v)}" for k, v in summary[name].items()))
    result = {"config": config_dict(cfg), "policies": summary, "steps": runs}
    if out_dir is not None:
        write_results(result, Path(out_dir))
    return result


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moesim.executor.train",
                                description="Train the tiny MoE LM on gloo ranks under "
                                            "placement policies; report time-to-target-loss.")
    p.add_argument("--policies", default="static_ep", help="comma-separated policy names")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--target-loss", type=float, default=None)
    p.add_argument("--capacity-factor", type=_cf, default=1.0, help="'none' for dropless")
    p.add_argument("--slots-per-rank", type=int, default=None,
                   help="for policies with that knob (default ceil(1.5·E/W))")
    p.add_argument("--tokens-per-rank", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", "--timeout", dest="timeout", type=float, default=300.0,
                   help="seconds per policy run")
    p.add_argument("-o", "--out", "--output", dest="out", default=None,
                   help="directory for train_results.json and the PNG")
    return p


def _cf(text: str) -> float | None:
    return None if text.lower() in ("none", "dropless") else float(text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = replace(TrainConfig().model, num_experts=args.experts, num_layers=args.layers,
                        aux_loss_coef=args.aux_loss_coef)
        cfg = TrainConfig(model=model, world_size=args.world_size, steps=args.steps,
                          tokens_per_rank=args.tokens_per_rank, lr=args.lr, seed=args.seed,
                          capacity_factor=args.capacity_factor,
                          slots_per_rank=args.slots_per_rank, target_loss=args.target_loss,
                          timeout_s=args.timeout)
        compare_policies(cfg, [s.strip() for s in args.policies.split(",") if s.strip()],
                         args.out)
    except MoesimError as exc:
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
