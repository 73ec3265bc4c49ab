"""Check an executed iteration against the single-process reference layer.

After :meth:`RankExecutor.run`, every rank hands its layer outputs, input gradients and expert
gradients to rank 0 (``all_gather_object``, outside the timed region), which runs
:func:`moesim.executor.reference.reference_layer` for every (micro-batch, layer) and compares:

- ``out`` / ``grad_x`` — every rank's layer output and input gradient, every pass;
- ``grad_w_local`` — per (layer, expert), the wgrads of all its replicas (all slots, all ranks,
  summed over micro-batches) before any gradient sync: must equal the reference's gradient;
- ``grad_w_synced`` — per (layer, expert) whose replicas span several ranks and whose
  ``grad_sync`` is a full-size ``AllReduce`` over a group containing every holder: each holder's
  synced gradient must equal the reference (schemes that shard gradients — reduce-scatter,
  pulls of slices — are covered by ``grad_w_local``; the count of unchecked experts is reported).

Errors are relative: ``max|a − b| / max|b|`` per compared tensor, maximum over all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor.interpreter import RankExecutor
from moesim.executor.reference import reference_layer
from moesim.ops import AllReduce, Program

FP32_TOL = 1e-4
BF16_TOL = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def rank_payload(ex: RankExecutor) -> dict:
    """This rank's results to compare (CPU tensors)."""
    passes = {k: (lp.out_NH.cpu() if lp.out_NH is not None else None,
                  lp.grad_x_NH.cpu() if lp.grad_x_NH is not None else None)
              for k, lp in ex.passes.items()}
    local: dict[tuple[int, int], torch.Tensor] = {}
    for l, slots in ex.slots.items():
        for s, (e, _) in enumerate(slots):
            if e >= 0:
                g = ex.slot_grads[l][s].cpu()
                local[(l, e)] = local[(l, e)] + g if (l, e) in local else g.clone()
    synced = {k: g.cpu() for k, g in ex.expert_grads.items()}
    return {"rank": ex.rank, "passes": passes, "local": local, "synced": synced}


def allreduce_synced(program: Program) -> set[tuple[int, int]]:
    """(layer, expert) pairs whose grad_sync has a full-size AllReduce over all holders."""
    out = set()
    for op in program.ops:
        if not (isinstance(op, AllReduce) and op.phase == "grad_sync"
                and op.experts_G is not None and op.layer >= 0):
            continue
        route = next(r for (_, l), r in program.routes.items() if l == op.layer)
        S = route.slots_per_rank
        for g, e in zip(op.groups, np.asarray(op.experts_G).tolist(), strict=True):
            holders = set((np.flatnonzero(np.asarray(route.phy2log_P) == e) // S).tolist())
            if e >= 0 and holders <= set(np.asarray(g).tolist()):
                out.add((op.layer, int(e)))
    return out


def check_iteration(ex: RankExecutor, program: Program, iteration: int) -> dict | None:
    """Gather every rank's results and compare on rank 0 (others get ``None``); collective.
    Under a layout: the whole-stack check (:mod:`moesim.executor.layout_check`)."""
    if ex.flow is not None:
        from moesim.executor.layout_check import check_layout_iteration

        return check_layout_iteration(ex, program, iteration)
    payloads: list = [None] * ex.world
    dist.all_gather_object(payloads, rank_payload(ex))
    if ex.rank != 0:
        return None
    return compare(payloads, program, ex.model, iteration)


def compare(payloads: list[dict], program: Program, model, iteration: int) -> dict:
    """Relative errors of ``payloads`` (one per rank) against the reference layer."""
    err = {"out": 0.0, "grad_x": 0.0, "grad_w_local": 0.0, "grad_w_synced": 0.0}
    ref_w: dict[tuple[int, int], torch.Tensor] = {}
    backward = False
    for (mb, l), route in sorted(program.routes.items()):
        ref = reference_layer(route, model, iteration, mb, l)
        for p in payloads:
            out, gx = p["passes"][(mb, l)]
            err["out"] = max(err["out"], _rel(out, ref.out[p["rank"]]))
            if gx is not None:
                backward = True
                err["grad_x"] = max(err["grad_x"], _rel(gx, ref.grad_x[p["rank"]]))
        for e, g in ref.grad_w.items():
            ref_w[(l, e)] = ref_w[(l, e)] + g if (l, e) in ref_w else g
    synced_ok = allreduce_synced(program)
    unchecked = 0
    if backward:
        for key, ref in ref_w.items():
            total = sum(p["local"][key] for p in payloads if key in p["local"])
            err["grad_w_local"] = max(err["grad_w_local"], _rel(total, ref))
            holders = [p for p in payloads if key in p["local"]]
            if len(holders) == 1:
                err["grad_w_synced"] = max(err["grad_w_synced"],
                                           _rel(holders[0]["local"][key], ref))
            elif key in synced_ok:
                for p in holders:
                    err["grad_w_synced"] = max(err["grad_w_synced"], _rel(p["synced"][key], ref))
            else:
                unchecked += 1
    tol = FP32_TOL if model.bytes_activation >= 4 else BF16_TOL
    return {"iteration": iteration, **err, "backward": backward,
            "synced_unchecked": unchecked, "tolerance": tol,
            "ok": all(v <= tol for v in err.values())}
