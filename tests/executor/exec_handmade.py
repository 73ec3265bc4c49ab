"""A hand-built Program that uses every op type the executor interprets (for the gloo tests).

One micro-batch, the tiny model's 2 layers, experts replicated so that gradient all-reduces,
broadcasts and point-to-point moves have real tensors to carry.
"""

from __future__ import annotations

import numpy as np

from moesim.ops import (
    AllGather,
    AllReduce,
    AllToAll,
    Broadcast,
    Compute,
    HostCompute,
    HostCopy,
    LayerRoute,
    Program,
    Reduce,
    ReduceScatter,
    SendRecv,
)
from moesim.specs import ModelSpec

LAYOUTS = {2: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 4: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]}


def _route(world: int, rng: np.random.Generator, idle_rank: int | None = None) -> LayerRoute:
    phy2log = np.array(LAYOUTS[world])
    S = len(phy2log) // world
    kept = rng.integers(0, 12, size=(world, len(phy2log)))
    kept[0, 1] = 0  # an empty (source, slot) pair
    if idle_rank is not None:  # a rank whose slots receive no token at all
        kept[:, idle_rank * S:(idle_rank + 1) * S] = 0
    return LayerRoute(kept_RP=kept, dropped_R=rng.integers(0, 6, size=world),
                      phy2log_P=phy2log, slots_per_rank=S)


def _layer_ops(prog: Program, l: int, direction: str, world: int) -> None:
    R = np.full(world, 1e6)
    if direction == "fwd":
        prog.add(Compute(phase="dense", layer=l, micro_batch=0, kind="attention", flops_R=R,
                         bytes_R=R))
        prog.add(Compute(phase="route", layer=l, micro_batch=0, kind="router", flops_R=R / 10,
                         bytes_R=R))
    steps = [("dispatch", "a2a"), ("expert", "ffn"), ("combine", "a2a")]
    if direction == "bwd":
        steps = steps[::-1]
    for phase, kind in steps:
        if kind == "a2a":
            prog.add(AllToAll(phase=phase, direction=direction, layer=l, micro_batch=0,
                              bytes_RR=np.ones((world, world))))
        else:
            prog.add(Compute(phase="expert", direction=direction, layer=l, micro_batch=0,
                             kind="expert_ffn", flops_R=R, bytes_R=R,
                             gemm_passes=1 if direction == "fwd" else 2))


def _holders(route: LayerRoute, e: int) -> np.ndarray:
    return np.unique(np.flatnonzero(route.phy2log_P == e) // route.slots_per_rank)


def _step_ops(prog: Program, model: ModelSpec, world: int) -> None:
    grad = model.params_per_expert * model.bytes_grad
    weight = model.params_per_expert * model.bytes_weight
    all_ranks = (np.arange(world),)
    for l in range(model.num_layers):
        route = prog.routes[(0, l)]
        for e in range(model.num_experts):
            h = _holders(route, e)
            if len(h) > 1:
                prog.add(AllReduce(phase="grad_sync", direction="step", layer=l, groups=(h,),
                                   bytes_G=np.array([grad]), experts_G=np.array([e])))
    prog.add(AllReduce(phase="grad_sync", direction="step", groups=all_ranks,
                       bytes_G=np.array([4096.0]), experts_G=np.array([-1])))
    prog.add(ReduceScatter(phase="grad_sync", direction="step", groups=all_ranks,
                           bytes_G=np.array([8192.0])))
    prog.add(Reduce(phase="grad_sync", direction="step", groups=all_ranks,
                    bytes_G=np.array([2048.0]), roots_G=np.array([world - 1])))
    prog.add(Compute(phase="optimizer", direction="step", kind="other",
                     flops_R=np.full(world, 1e5),
                     bytes_R=np.full(world, 3e4 * (2 * model.bytes_optim + 8))))
    prog.add(HostCopy(phase="optimizer", direction="step", bytes_R=np.full(world, 65536)))
    prog.add(HostCompute(phase="optimizer", direction="step", bytes_R=np.full(world, 8e4)))
    prog.add(HostCopy(phase="optimizer", direction="step", bytes_R=np.full(world, 65536),
                      to_host=False))
    pairs = (np.array([0, 1]),) if world == 2 else (np.array([0, 1]), np.array([2, 3]))
    prog.add(AllGather(phase="optimizer", direction="step", layer=0, groups=pairs,
                       bytes_G=np.full(len(pairs), weight),
                       experts_G=np.array([0, 4][:len(pairs)])))
    prog.add(Broadcast(phase="param_gather", direction="step", layer=1, groups=all_ranks,
                       bytes_G=np.array([weight]), experts_G=np.array([2]),
                       roots_G=np.array([_holders(prog.routes[(0, 1)], 2)[0]])))
    prog.add(SendRecv(phase="relayout", direction="step", layer=0, src_N=np.array([0, 1]),
                      dst_N=np.array([world - 1, 0]), bytes_N=np.array([weight, weight * 1.5]),
                      experts_N=np.array([1, 5])))
    prog.add(AllToAll(phase="relayout", direction="step", ranks=np.array([0, 1]),
                      bytes_RR=np.array([[0, 4000], [8000, 0]])))


def handmade_program(model: ModelSpec, world: int, seed: int = 0) -> Program:
    """The program (see the module docstring) for ``world`` ranks."""
    rng = np.random.default_rng(seed)
    prog = Program(num_ranks=world)
    for l in range(model.num_layers):
        prog.routes[(0, l)] = _route(world, rng, idle_rank=1 if l == 1 else None)
    for l in range(model.num_layers):
        _layer_ops(prog, l, "fwd", world)
    for l in reversed(range(model.num_layers)):
        _layer_ops(prog, l, "bwd", world)
    _step_ops(prog, model, world)
    return prog
