"""The interpreter's communication ops (a mixin of :class:`~moesim.executor.interpreter.
RankExecutor`): token all-to-alls, group collectives and point-to-point transfers, each
resolved once into the work the timed walk runs, and the real tensors they move.

- ``AllToAll`` of phase ``dispatch`` / ``combine`` with a forced route — the real token
  all-to-alls (:mod:`moesim.executor.moe_layer`); any other ``AllToAll`` moves a buffer of its
  ``bytes_RR``;
- ``AllReduce / AllGather / ReduceScatter / Broadcast / Reduce`` — over each op group's process
  group, moving the expert tensors named by ``experts_G`` (parameters; gradients in phase
  ``grad_sync``), or a buffer of ``bytes_G`` for dense (``-1``) or unnamed groups (under a
  layout the dense ones belong to the dataflow, :mod:`moesim.executor.flow_comm`);
- ``SendRecv`` — ``dist.batch_isend_irecv`` of the named experts' parameters (or buffers).

A collective's sizes are element counts of the model's dtype (``bytes / bytes_per_element``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from moesim.executor import moe_layer as ml
from moesim.executor.groups import SELF
from moesim.executor.timing import Collective
from moesim.ops import (
    AllGather,
    AllReduce,
    AllToAll,
    Broadcast,
    GroupCollective,
    Reduce,
    ReduceScatter,
    SendRecv,
)

# torch ≥ 2.13 renamed the tensor-form all-gather / reduce-scatter; older releases have only these
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class CommOps:
    """Compilers of the communication ops; the executor supplies ``rank``, ``world``,
    ``model``, ``expert_model`` (one slot's expert: a 1/etp shard under expert TP), ``dtype``,
    ``device``, ``groups``, ``passes``, ``slots``, ``prev_slots``,
    ``slot_grads``, ``expert_grads``, ``masters`` and ``_buffer``."""

    # -- all-to-all -------------------------------------------------------------------------
    def _all_to_all(self, op: AllToAll) -> Callable[[], None]:
        members = (list(range(self.world)) if op.ranks is None
                   else [int(r) for r in np.asarray(op.ranks)])
        group = self.groups.get(tuple(sorted(members)))
        lp = self.passes.get((op.micro_batch, op.layer))
        if lp is not None and op.phase in ("dispatch", "combine") and not op.reduce:
            step = {("dispatch", "fwd"): ml.dispatch_fwd, ("combine", "fwd"): ml.combine_fwd,
                    ("combine", "bwd"): ml.combine_bwd, ("dispatch", "bwd"): ml.dispatch_bwd}
            fn = step.get((op.phase, op.direction))
            if fn is not None:
                return lambda: fn(lp, group)
        me = members.index(self.rank)
        elem = self._elem_bytes(op.phase)
        bytes_RR = np.asarray(op.bytes_RR, dtype=float)
        send = [math.ceil(b / elem) for b in bytes_RR[me]]
        recv = [math.ceil(b / elem) for b in bytes_RR[:, me]]
        buf = self._buffer(("a2a_in", sum(send)), (sum(send),))
        out = self._buffer(("a2a_out", sum(recv)), (sum(recv),))

        if group == SELF:
            return Collective(lambda: (lambda: out.copy_(buf)))

        def start() -> Callable[[], None]:
            w = dist.all_to_all_single(out, buf, output_split_sizes=recv,
                                       input_split_sizes=send, group=group, async_op=True)
            return w.wait
        return Collective(start)

    # -- group collectives ------------------------------------------------------------------
    def _group_collective(self, op: GroupCollective) -> Callable[[], Callable[[], None]]:
        """A starter for this rank's group of ``op``: issues the collective (async) and returns
        the function that waits for it and stores the result."""
        g = next(i for i, grp in enumerate(op.groups) if self.rank in np.asarray(grp))
        members = sorted(int(r) for r in np.asarray(op.groups[g]))
        if len(members) < 2:
            return lambda: (lambda: None)
        pg = self.groups.get(tuple(members))
        expert = -1 if op.experts_G is None else int(np.asarray(op.experts_G)[g])
        numel = math.ceil(float(np.asarray(op.bytes_G)[g]) / self._elem_bytes(op.phase))
        n, me = len(members), members.index(self.rank)
        if isinstance(op, (AllGather, ReduceScatter)):
            numel = math.ceil(numel / n) * n
        chunk = numel // n
        root = int(np.asarray(op.roots_G)[g]) if isinstance(op, (Broadcast, Reduce)) else 0
        kind = type(op)

        def start() -> Callable[[], None]:
            base = self._expert_tensor(op.phase, op.layer, expert)
            t = self._view(base, numel)
            out = None
            if kind is AllReduce:
                w = dist.all_reduce(t, group=pg, async_op=True)
            elif kind is AllGather:
                w = _all_gather_single(t, t[me * chunk:(me + 1) * chunk].clone(), group=pg,
                                       async_op=True)
            elif kind is ReduceScatter:
                out = torch.empty(chunk, dtype=t.dtype, device=t.device)
                w = _reduce_scatter_single(out, t, group=pg, async_op=True)
            elif kind is Broadcast:
                w = dist.broadcast(t, src=root, group=pg, async_op=True)
            else:
                w = dist.reduce(t, dst=root, group=pg, async_op=True)

            def finish() -> None:
                w.wait()
                if out is not None:
                    t[me * chunk:(me + 1) * chunk].copy_(out)
                if base is not None and t.data_ptr() != base.data_ptr():
                    k = min(base.numel(), numel)
                    base[:k].copy_(t[:k])
            return finish
        return start

    def _send_recv(self, op: SendRecv) -> Callable[[], Callable[[], None]]:
        """A starter for this rank's transfers of ``op`` (see :meth:`_group_collective`)."""
        plan = []  # (peer, numel, expert, is_send)
        for n, (s, d) in enumerate(zip(np.asarray(op.src_N).tolist(),
                                       np.asarray(op.dst_N).tolist(), strict=True)):
            if self.rank not in (s, d) or s == d:  # s == d: a local copy, nothing moves
                continue
            expert = -1 if op.experts_N is None else int(np.asarray(op.experts_N)[n])
            numel = math.ceil(float(np.asarray(op.bytes_N)[n]) / self._elem_bytes(op.phase))
            plan.append((d if s == self.rank else s, numel, expert, s == self.rank))

        def start() -> Callable[[], None]:
            p2p, copies = [], []
            for peer, numel, expert, is_send in plan:
                if is_send:
                    base = self._expert_tensor(op.phase, op.layer, expert)
                    p2p.append(dist.P2POp(dist.isend, self._view(base, numel).contiguous(),
                                          peer))
                    continue
                buf = torch.empty(numel, dtype=self.dtype, device=self.device)
                p2p.append(dist.P2POp(dist.irecv, buf, peer))
                held = self._current_slot(op.layer, expert)
                if held is not None and op.phase != "grad_sync":
                    copies.append((held, buf))
            works = dist.batch_isend_irecv(p2p) if p2p else []

            def finish() -> None:
                for w in works:
                    w.wait()
                for base, buf in copies:
                    k = min(base.numel(), buf.numel())
                    base[:k].copy_(buf[:k])
            return finish
        return start

    # -- tensors ----------------------------------------------------------------------------
    def _elem_bytes(self, phase: str) -> float:
        m = self.model
        if phase == "grad_sync":
            return m.bytes_grad
        if phase in ("dispatch", "combine", "route", "dense", "expert"):
            return m.bytes_activation
        return m.bytes_weight

    def _expert_tensor(self, phase: str, layer: int, expert: int) -> torch.Tensor | None:
        """The real tensor a collective on ``(layer, expert)`` moves: the expert's gradient
        (summed over this rank's replicas) in ``grad_sync``, else its parameters; ``None`` for
        dense / unnamed groups or an expert this rank does not hold."""
        if expert < 0 or layer < 0 or layer not in self.slots:
            return None
        if phase == "grad_sync":
            key = (layer, expert)
            if key not in self.expert_grads:
                held = [self.slot_grads[layer][s] for s, (e, _) in enumerate(self.slots[layer])
                        if e == expert]
                self.expert_grads[key] = (torch.stack(held).sum(0) if held else
                                          torch.zeros(self.expert_model.params_per_expert,
                                                      dtype=self.dtype, device=self.device))
            return self.expert_grads[key]
        for e, t in self.slots[layer] + self.prev_slots.get(layer, []):
            if e == expert:
                return t
        return self.masters.get((layer, expert))

    def _current_slot(self, layer: int, expert: int) -> torch.Tensor | None:
        """This iteration's slot tensor of ``(layer, expert)`` on this rank, if any."""
        for e, t in self.slots.get(layer, []):
            if e == expert >= 0:
                return t
        return None

    def _view(self, base: torch.Tensor | None, numel: int) -> torch.Tensor:
        """The first ``numel`` elements of ``base`` if it is big enough, else a buffer holding
        a copy of ``base``'s prefix."""
        if base is not None and base.numel() >= numel:
            return base[:numel]
        buf = torch.zeros(numel, dtype=self.dtype, device=self.device)
        if base is not None:
            buf[:base.numel()].copy_(base)
        return buf
