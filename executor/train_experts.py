"""Train mode's distributed experts: master copies at home ranks, slot copies per step, and
the differentiable token all-to-all (see :mod:`moesim.executor.train` for the step).

Shape legend: ``L`` MoE layers, ``E`` experts, ``W`` ranks, ``S`` slots per rank, ``P = W·S``
slots, ``N`` tokens per rank, ``D`` model width, ``F`` expert width, ``K`` top-k, ``A``
assignments, ``M`` received rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from moesim.placement import Decision
from moesim.routing import split_tokens
from moesim.specs import Cluster
from moesim.traces.tinylm import Adam, TinyMoELM, expert_ffn

# ----------------------------------------------------------------------------- placement maps

def home_rank(e: int, num_experts: int, world: int) -> int:
    """The rank holding expert ``e``'s master weights and optimizer state."""
    return e * world // num_experts


def slot_moves(decision: Decision, src: int, dst: int, E: int, W: int) -> list[tuple[int, int]]:
    """``(layer, expert)`` of each slot of rank ``dst`` whose master lives on ``src``, in order."""
    pl = decision.placement
    S = pl.slots_per_rank
    out = []
    for l in range(pl.num_layers):
        for p in range(dst * S, (dst + 1) * S):
            e = int(pl.phy2log_LP[l, p])
            if e >= 0 and home_rank(e, E, W) == src:
                out.append((l, e))
    return out


class Experts:
    """This rank's master experts (+ Adam) and the slot copies of the current step."""

    def __init__(self, full: TinyMoELM, rank: int, world: int, lr: float) -> None:
        E = full.cfg.num_experts
        self.rank, self.world, self.E = rank, world, E
        self.master = {}
        for l, block in enumerate(full.blocks):
            for e in range(E):
                if home_rank(e, E, world) == rank:
                    w = torch.cat([block.moe.w1[e].detach().reshape(-1),
                                   block.moe.w2[e].detach().reshape(-1)])
                    self.master[l, e] = torch.nn.Parameter(w.clone())
        self.opt = Adam(list(self.master.values()), lr=lr) if self.master else None
        self.shape = (full.cfg.d_model, full.cfg.ffn_hidden)
        self.slots: dict[tuple[int, int], torch.Tensor] = {}

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D, F = self.shape
        return flat[:D * F].view(D, F), flat[D * F:].view(F, D)

    def gather(self, decision: Decision) -> None:
        """``param_gather``: slot copies ``{(layer, slot): flat weights}`` from the homes."""
        W, E, S = self.world, self.E, decision.placement.slots_per_rank
        send = [torch.cat([self.master[k].detach() for k in slot_moves(decision, self.rank, d,
                                                                       E, W)] or [_empty()])
                for d in range(W)]
        moves = [slot_moves(decision, s, self.rank, E, W) for s in range(W)]
        recv = _exchange(send, [len(m) * self._numel() for m in moves])
        by_key = {}
        for s in range(W):
            for i, key in enumerate(moves[s]):
                by_key.setdefault(key, []).append(recv[s][i * self._numel():(i + 1)
                                                          * self._numel()])
        self.slots = {}
        pl = decision.placement
        for l in range(pl.num_layers):
            for j, p in enumerate(range(self.rank * S, (self.rank + 1) * S)):
                e = int(pl.phy2log_LP[l, p])
                if e >= 0:
                    self.slots[l, j] = by_key[l, e].pop(0).clone().requires_grad_(True)

    def _numel(self) -> int:
        D, F = self.shape
        return 2 * D * F

    def reduce_grads(self, decision: Decision) -> None:
        """``grad_sync``: replica gradients summed onto the masters, averaged over ranks."""
        W, E, S = self.world, self.E, decision.placement.slots_per_rank
        pl = decision.placement
        per_dst: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for l in range(pl.num_layers):
            for j, p in enumerate(range(self.rank * S, (self.rank + 1) * S)):
                e = int(pl.phy2log_LP[l, p])
                if e >= 0:
                    t = self.slots[l, j]
                    g = t.grad if t.grad is not None else torch.zeros_like(t)
                    per_dst[home_rank(e, E, W)].append(g)
        send = [torch.cat(x) if x else _empty() for x in per_dst]
        moves = [slot_moves(decision, self.rank, s, E, W) for s in range(W)]
        recv = _exchange(send, [len(m) * self._numel() for m in moves])
        for p in self.master.values():
            p.grad = torch.zeros_like(p)
        for s in range(W):
            for i, key in enumerate(moves[s]):
                self.master[key].grad += recv[s][i * self._numel():(i + 1) * self._numel()]
        for p in self.master.values():
            p.grad /= W


def _empty() -> torch.Tensor:
    return torch.zeros(0)


def _exchange(send: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
    """Plain (non-autograd) ``all_to_all_single`` of per-destination flat float tensors."""
    inp = torch.cat(send).contiguous()
    out = torch.empty(sum(recv_sizes))
    dist.all_to_all_single(out, inp, recv_sizes, [t.numel() for t in send])
    return list(torch.split(out, recv_sizes))


# ----------------------------------------------------------------------------- the MoE layer

class DistributedExperts:
    """``expert_fn`` for :class:`TinyMoELM`: dispatch to the slots, compute, combine."""

    def __init__(self, experts: Experts, decision: Decision, cluster: Cluster, K: int) -> None:
        self.ex, self.dec, self.cluster, self.K = experts, decision, cluster, K
        self.counts_LE: dict[int, np.ndarray] = {}
        self.dropped = 0

    def slot_of_assignments(self, layer: int, e_A: np.ndarray) -> np.ndarray:
        """Slot of each assignment (``A = K·N`` in choice-major order), ``-1`` if dropped."""
        pl, W, E = self.dec.placement, self.ex.world, self.ex.E
        counts_RE = np.zeros((W, E), dtype=np.int64)
        counts_RE[self.ex.rank] = np.bincount(e_A, minlength=E)
        tokens_P = split_tokens(counts_RE, pl.layer(layer), W, pl.slots_per_rank,
                                self.dec.routing, self.cluster.gpus_per_node,
                                self.dec.info.get("ep_size"))[self.ex.rank]
        order = np.argsort(e_A, kind="stable")
        slot_sorted = np.concatenate([np.repeat(np.flatnonzero(pl.layer(layer) == e),
                                                tokens_P[pl.layer(layer) == e])
                                      for e in range(E)] + [np.zeros(0, np.int64)])
        slot_A = np.empty_like(e_A)
        slot_A[order] = slot_sorted
        cap = self.dec.slot_capacity
        if cap is not None:
            pos = _rank_within(slot_A)
            slot_A = np.where(pos < cap, slot_A, -1)
        return slot_A

    def __call__(self, layer: int, h_ND: torch.Tensor, topk_NK: torch.Tensor,
                 gates_NK: torch.Tensor, keep_NK: torch.Tensor) -> torch.Tensor:
        N, K = topk_NK.shape
        e_A = topk_NK.t().reshape(-1).numpy().astype(np.int64)
        self.counts_LE[layer] = np.bincount(e_A, minlength=self.ex.E)
        slot_A = self.slot_of_assignments(layer, e_A)
        kept = np.flatnonzero(slot_A >= 0)
        kept = kept[np.argsort(slot_A[kept], kind="stable")]
        self.dropped += int(len(e_A) - len(kept))
        tok, choice = kept % N, kept // N
        P, S = self.dec.placement.num_slots, self.dec.placement.slots_per_rank
        kept_P = torch.from_numpy(np.bincount(slot_A[kept], minlength=P))
        all_P = [torch.zeros_like(kept_P) for _ in range(self.ex.world)]
        dist.all_gather(all_P, kept_P)
        kept_RP = torch.stack(all_P).numpy()
        send_split = kept_RP[self.ex.rank].reshape(-1, S).sum(1).tolist()
        mine = kept_RP[:, self.ex.rank * S:(self.ex.rank + 1) * S]
        recv_split = mine.sum(1).tolist()
        recv = _a2a(h_ND[torch.from_numpy(tok)], recv_split, send_split)
        out = self.compute(layer, recv, mine)
        back = _a2a(out, send_split, recv_split)
        w = gates_NK[torch.from_numpy(tok), torch.from_numpy(choice)]
        return torch.zeros_like(h_ND).index_add(0, torch.from_numpy(tok), back * w[:, None])

    def compute(self, layer: int, recv_MD: torch.Tensor, mine_RS: np.ndarray) -> torch.Tensor:
        """``expert``: rows arrive grouped by source, then by local slot; outputs keep order."""
        slot_M = np.concatenate([np.repeat(np.arange(mine_RS.shape[1]), row) for row in mine_RS]
                                + [np.zeros(0, np.int64)])
        pieces, index = [], []
        for j in range(mine_RS.shape[1]):
            rows = np.flatnonzero(slot_M == j)
            if len(rows):
                w1, w2 = self.ex.split(self.ex.slots[layer, j])
                pieces.append(expert_ffn(recv_MD[torch.from_numpy(rows)], w1, w2))
                index.append(rows)
        if not pieces:
            return recv_MD * 0.0
        inv = np.argsort(np.concatenate(index))
        return torch.cat(pieces)[torch.from_numpy(inv)]


def _rank_within(slot_A: np.ndarray) -> np.ndarray:
    """Position of each assignment among those (earlier in order) with the same slot."""
    order = np.argsort(slot_A, kind="stable")
    s = slot_A[order]
    starts = np.searchsorted(s, s, side="left")
    pos = np.empty_like(slot_A)
    pos[order] = np.arange(len(s)) - starts
    return pos


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single``: the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, out_split: list[int], in_split: list[int]):
        ctx.splits = (out_split, in_split)
        out = x_MD.new_empty(sum(out_split), x_MD.shape[1])
        dist.all_to_all_single(out, x_MD.contiguous(), out_split, in_split)
        return out

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        out_split, in_split = ctx.splits
        grad_in = grad_MD.new_empty(sum(in_split), grad_MD.shape[1])
        dist.all_to_all_single(grad_in, grad_MD.contiguous(), in_split, out_split)
        return grad_in, None, None


def _a2a(x_MD: torch.Tensor, out_split: list[int], in_split: list[int]) -> torch.Tensor:
    return _AllToAll.apply(x_MD, out_split, in_split)
