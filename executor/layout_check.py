"""Check a layout program's iteration against the whole-stack reference.

After the timed walk every rank hands rank 0 (``all_gather_object``, untimed) what its dataflow
produced; rank 0 runs :func:`moesim.executor.layout_reference.reference_stack` once and
compares, as relative errors ``max|a − b| / max|b|``:

- ``out`` — every last-stage rank's final residual stream, every micro-batch;
- ``grad_x`` — every first-stage rank's gradient of the model input, every micro-batch;
- ``grad_dense_local`` — per (held layers, TP shard): the dense gradients of the DP ranks
  holding that shard, summed, before any gradient sync;
- ``grad_dense_synced`` — each rank's dense gradient after its sync: the whole shard after an
  all-reduce, its ``1/d`` chunk after a reduce-scatter (ZeRO 1–2), each layer's chunk
  after ZeRO-3's per-layer reduce-scatters;
- ``grad_w_local`` / ``grad_w_synced`` — the experts', as :mod:`moesim.executor.check` does.

``saved_peak_bytes_r<rank>`` is reported beside the errors (every value a number, so the
worker can record them as ``check_*`` summary columns): the most activation bytes the
rank held for its backward (:mod:`moesim.executor.flow_state`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor.check import BF16_TOL, FP32_TOL, _rel, allreduce_synced
from moesim.executor.flow_zero3 import reference_chunks
from moesim.executor.layout_reference import reference_flat, reference_stack
from moesim.executor.moe_etp import shard_expert
from moesim.ops import AllReduce, Program


def flow_payload(ex) -> dict:
    """This rank's dataflow results (CPU tensors)."""
    f = ex.flow
    local: dict = {}
    # under expert TP a slot holds shard ``source mod etp`` of its expert: key (l, e, shard)
    shard = (f.source % ex.etp,) if ex.etp > 1 else ()
    for l, slots in ex.slots.items():
        for s, (e, _) in enumerate(slots):
            if e >= 0:
                g, k = ex.slot_grads[l][s].cpu(), (l, e) + shard
                local[k] = local[k] + g if k in local else g.clone()
    synced = f.dense_synced
    return {"rank": ex.rank, "source": f.source, "etp": ex.etp, "tp_index": f.tp_index,
            "dp_index": f.dp_index, "layers": tuple(sorted(f.offsets)),
            "outputs": {mb: t.cpu() for mb, t in f.outputs.items()},
            "input_grads": {mb: t.cpu() for mb, t in f.input_grads.items()},
            "dense_local": (f.dense_local if f.dense_local is not None else f.flat_grad).cpu(),
            "dense_synced": None if synced is None else (synced[0], synced[1].cpu(), synced[2]),
            "experts_local": local,
            "experts_synced": {k + shard: g.cpu() for k, g in ex.expert_grads.items()},
            "saved_peak_bytes": f.saved_peak_bytes}


def check_layout_iteration(ex, program: Program, iteration: int) -> dict | None:
    """Gather every rank's payload and compare on rank 0 (others get ``None``); collective."""
    payloads: list = [None] * ex.world
    dist.all_gather_object(payloads, flow_payload(ex))
    if ex.rank != 0:
        return None
    return compare_stack(payloads, program, ex.model, ex.flow.n, ex.flow.tp, iteration)


def compare_stack(payloads: list[dict], program: Program, model, sources: int, tp: int,
                  iteration: int) -> dict:
    """Relative errors of ``payloads`` against the whole-stack reference (module docstring)."""
    ref = reference_stack(program, model, sources, tp, iteration)
    err = dict.fromkeys(("out", "grad_x", "grad_dense_local", "grad_dense_synced",
                         "grad_w_local", "grad_w_synced"), 0.0)
    seen = {"out": 0, "grad_x": 0}
    for p in payloads:
        for mb, t in p["outputs"].items():
            err["out"] = max(err["out"], _rel(t, ref.outputs[mb][p["source"]]))
            seen["out"] += 1
        for mb, t in p["input_grads"].items():
            err["grad_x"] = max(err["grad_x"], _rel(t, ref.input_grads[mb][p["source"]]))
            seen["grad_x"] += 1
    shards: dict = {}
    for p in payloads:
        key = (p["layers"], p["tp_index"])
        shards[key] = shards[key] + p["dense_local"] if key in shards else p["dense_local"]
        want = reference_flat(ref, list(p["layers"]), p["tp_index"], tp)
        if p["dense_synced"] is not None:
            kind, t, d = p["dense_synced"]
            if kind == "chunk":
                k = want.numel() // d
                want = want[p["dp_index"] * k:(p["dp_index"] + 1) * k]
            elif kind == "layers":  # ZeRO-3: each layer's own chunk
                want = reference_chunks([reference_flat(ref, [l], p["tp_index"], tp)
                                         for l in p["layers"]], p["dp_index"], d)
            err["grad_dense_synced"] = max(err["grad_dense_synced"], _rel(t, want))
    for (layers, ti), total in shards.items():
        err["grad_dense_local"] = max(err["grad_dense_local"],
                                      _rel(total, reference_flat(ref, list(layers), ti, tp)))
    _expert_errors(payloads, program, _shards(ref.expert_grads, payloads, model), err)
    tol = FP32_TOL if model.bytes_activation >= 4 else BF16_TOL
    complete = seen["out"] == seen["grad_x"] == sources * len(ref.outputs)
    return {"iteration": iteration, **err, "backward": True, "tolerance": tol,
            "checked_passes": seen["out"], "complete": complete,
            **{f"saved_peak_bytes_r{p['rank']}": float(p["saved_peak_bytes"])
               for p in payloads},
            "ok": complete and all(v <= tol for v in err.values())}


def _shards(ref_w: dict[tuple[int, int], torch.Tensor], payloads: list[dict], model
            ) -> dict[tuple, torch.Tensor]:
    """The reference expert gradients keyed as the payloads key them: ``(l, e)``, or under
    expert TP ``(l, e, i)`` for shard ``i`` (the column/row slices of the whole expert's
    gradient, :func:`~moesim.executor.moe_etp.shard_expert`)."""
    out: dict[tuple, torch.Tensor] = dict(ref_w)
    keys = {k for p in payloads for d in ("experts_local", "experts_synced") for k in p[d]}
    et = max(p["etp"] for p in payloads)
    for k in keys:
        if len(k) == 3:
            out[k] = shard_expert(ref_w[k[:2]], model, k[2], et)
    return out


def _etp_synced(program: Program, et: int) -> set[tuple[int, int, int]]:
    """Under expert TP, ``(layer, expert, shard)`` whose grad_sync has a full-size AllReduce
    over every rank holding that shard (the shard's EDP group, :mod:`moesim.expert_tp`)."""
    out: set[tuple[int, int, int]] = set()
    if et == 1:
        return out
    for op in program.ops:
        if not (isinstance(op, AllReduce) and op.phase == "grad_sync"
                and op.experts_G is not None and op.layer >= 0):
            continue
        route = next(r for (_, l), r in program.routes.items() if l == op.layer)
        ranks_R = np.asarray(route.ranks_R)
        for g, e in zip(op.groups, np.asarray(op.experts_G).tolist(), strict=True):
            held = ranks_R[np.flatnonzero(np.asarray(route.phy2log_P) == e)
                           // route.slots_per_rank]
            for i in range(et):
                mine = set(held[held % et == i].tolist())
                if e >= 0 and mine and mine <= set(np.asarray(g).tolist()):
                    out.add((op.layer, int(e), i))
    return out


def _expert_errors(payloads: list[dict], program: Program,
                   ref_w: dict[tuple[int, int], torch.Tensor], err: dict) -> None:
    synced_ok = allreduce_synced(program) | _etp_synced(program, max(p["etp"] for p in payloads))
    for key in {k for p in payloads for k in p["experts_local"]}:
        holders = [p for p in payloads if key in p["experts_local"]]
        total = sum(p["experts_local"][key] for p in holders)
        err["grad_w_local"] = max(err["grad_w_local"], _rel(total, ref_w[key]))
        if len(holders) == 1:
            err["grad_w_synced"] = max(err["grad_w_synced"],
                                       _rel(holders[0]["experts_local"][key], ref_w[key]))
        elif key in synced_ok:
            for p in holders:
                err["grad_w_synced"] = max(err["grad_w_synced"],
                                           _rel(p["experts_synced"][key], ref_w[key]))
