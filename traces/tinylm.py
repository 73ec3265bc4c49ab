"""A tiny byte-level Mixture-of-Experts language model in plain torch (for recording real traces).

Shape legend: ``B`` sequences, ``S`` sequence length, ``N`` tokens (``B·S``), ``D`` model width,
``F`` expert FFN width, ``E`` experts, ``K`` top-k, ``G`` routing groups (simulated DP ranks),
``V`` vocabulary (256 bytes).

Each of the ``num_layers`` blocks is pre-norm causal self-attention followed by an MoE FFN:

- a linear router (no bias, initialised N(0, ``router_init_std``) as in Megatron, so routing
  starts near-uniform and the skew that develops is learned) gives logits ``[N, E]``; softmax
  probabilities; the top-``K`` experts are chosen and their probabilities renormalised to sum
  to 1 (Mixtral's gate);
- the Switch-Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (``f_e`` the fraction of
  assignments to ``e``, ``P_e`` the mean router probability), computed per routing group and
  averaged, weighted by ``aux_loss_coef``;
- with a ``capacity_factor``, each group may send expert ``e`` at most
  ``ceil(cf · N_g · K / E)`` assignments; first choices of all tokens queue before second choices
  (GShard's priority), over-capacity assignments are dropped (their output is zero; the residual
  carries the token) and counted.

A *routing group* is the tokens one simulated data-parallel rank holds: the batch's sequences are
split into ``G`` equal contiguous parts, so routing statistics and drops are per rank, exactly as
a ``G``-rank data-parallel run would see them. ``forward(..., expert_fn=...)`` lets the
distributed executor (``moesim.executor.train``) replace the expert computation while reusing
everything else, so both run the same model.

This module imports torch (an install requirement of moesim) but never ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moesim.errors import MoesimError

ExpertFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    """Model knobs. ``capacity_factor=None`` is dropless."""

    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    ffn_hidden: int = 128
    num_experts: int = 16
    top_k: int = 2
    seq_len: int = 128
    aux_loss_coef: float = 0.01
    capacity_factor: float | None = None
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "ffn_hidden",
                     "num_experts", "top_k", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MoesimError(f"TinyLMConfig.{name}={value!r} must be a positive integer")
        if self.d_model % self.num_heads:
            raise MoesimError(f"TinyLMConfig.d_model={self.d_model} must be a multiple of "
                              f"num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise MoesimError(f"TinyLMConfig.top_k={self.top_k} exceeds num_experts="
                              f"{self.num_experts}; lower top_k")
        if self.aux_loss_coef < 0:
            raise MoesimError("TinyLMConfig.aux_loss_coef must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise MoesimError("TinyLMConfig.capacity_factor must be > 0, or None for dropless")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Routing:
    """One MoE layer's routing of ``N`` tokens: choices, gate weights, kept mask, aux loss."""

    topk_NK: torch.Tensor
    gates_NK: torch.Tensor
    keep_NK: torch.Tensor
    aux_loss: torch.Tensor

    @property
    def dropped(self) -> int:
        return int((~self.keep_NK).sum())


def load_balancing_loss(probs_NE: torch.Tensor, topk_NK: torch.Tensor, groups: int) -> torch.Tensor:
    """Switch loss ``E · Σ_e f_e · P_e`` per group of ``N/groups`` tokens, averaged over groups."""
    N, E = probs_NE.shape
    p_GnE = probs_NE.view(groups, N // groups, E)
    onehot = F.one_hot(topk_NK, E).sum(1).to(probs_NE.dtype).view(groups, N // groups, E)
    f_GE = onehot.mean(1) / topk_NK.shape[1]
    return E * (f_GE * p_GnE.mean(1)).sum(1).mean()


def capacity_keep(topk_NK: torch.Tensor, num_experts: int, groups: int,
                  capacity_factor: float | None) -> torch.Tensor:
    """Boolean ``[N, K]``: which assignments fit their group's per-expert capacity.

    Within a group, assignments queue choice-major (every token's first choice, then seconds).
    """
    N, K = topk_NK.shape
    if capacity_factor is None:
        return torch.ones_like(topk_NK, dtype=torch.bool)
    n = N // groups
    cap = math.ceil(capacity_factor * n * K / num_experts)
    ids = topk_NK.view(groups, n, K).transpose(1, 2).reshape(groups, K * n)
    onehot = F.one_hot(ids, num_experts)
    pos = (onehot.cumsum(1) * onehot).sum(-1) - 1
    keep = (pos < cap).view(groups, K, n).transpose(1, 2).reshape(N, K)
    return keep


class MoEFFN(nn.Module):
    """Router and ``E`` two-matrix GELU experts (weights ``w1 [E, D, F]``, ``w2 [E, F, D]``)."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.router_init_std)
        scale = 1.0 / math.sqrt(cfg.d_model)
        self.w1 = nn.Parameter(torch.randn(cfg.num_experts, cfg.d_model, cfg.ffn_hidden) * scale)
        self.w2 = nn.Parameter(torch.randn(cfg.num_experts, cfg.ffn_hidden, cfg.d_model)
                               / math.sqrt(cfg.ffn_hidden))

    def route(self, x_ND: torch.Tensor, groups: int) -> Routing:
        """Top-k choices, renormalised gates, capacity mask and aux loss of ``N`` tokens."""
        probs = F.softmax(self.router(x_ND).float(), dim=-1)
        top_v, top_i = torch.topk(probs, self.cfg.top_k, dim=-1)
        gates = top_v / top_v.sum(-1, keepdim=True)
        aux = load_balancing_loss(probs, top_i, groups)
        keep = capacity_keep(top_i, self.cfg.num_experts, groups, self.cfg.capacity_factor)
        return Routing(top_i, gates.to(x_ND.dtype), keep, aux)

    def local_experts(self, x_ND: torch.Tensor, r: Routing) -> torch.Tensor:
        """Weighted sum of the kept experts' outputs, computed here with all experts' weights."""
        y = torch.zeros_like(x_ND)
        weight = r.gates_NK * r.keep_NK
        for e in range(self.cfg.num_experts):
            tok, slot = torch.nonzero((r.topk_NK == e) & r.keep_NK, as_tuple=True)
            if tok.numel():
                out = expert_ffn(x_ND[tok], self.w1[e], self.w2[e])
                y = y.index_add(0, tok, out * weight[tok, slot, None])
        return y


def expert_ffn(x_MD: torch.Tensor, w1_DF: torch.Tensor, w2_FD: torch.Tensor) -> torch.Tensor:
    """One expert: ``gelu(x · w1) · w2``."""
    return F.gelu(x_MD @ w1_DF) @ w2_FD


class Block(nn.Module):
    """Pre-norm causal attention + MoE FFN."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoEFFN(cfg)

    def attention(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        h = self.cfg.num_heads
        q, k, v = self.qkv(self.ln1(x_BSD)).view(B, S, 3, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))

    def forward(self, x_BSD: torch.Tensor, layer: int, groups: int,
                expert_fn: ExpertFn | None) -> tuple[torch.Tensor, Routing]:
        x_BSD = x_BSD + self.attention(x_BSD)
        B, S, D = x_BSD.shape
        h = self.ln2(x_BSD).reshape(B * S, D)
        r = self.moe.route(h, groups)
        if expert_fn is None:
            y = self.moe.local_experts(h, r)
        else:
            y = expert_fn(layer, h, r.topk_NK, r.gates_NK, r.keep_NK)
        return x_BSD + y.view(B, S, D), r


class TinyMoELM(nn.Module):
    """Byte-level MoE LM. ``forward`` returns the loss and every layer's :class:`Routing`."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's init
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor, groups: int = 1,
                expert_fn: ExpertFn | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                            list[Routing]]:
        """``(total_loss, lm_loss, routings)``; ``groups`` must divide the batch size."""
        B, S = tokens_BS.shape
        if B % groups or S > self.cfg.seq_len:
            raise MoesimError(f"batch of {B}×{S} does not split into {groups} groups of whole "
                              f"sequences of at most {self.cfg.seq_len} tokens")
        x = self.embed(tokens_BS) + self.pos[:S]
        routings = []
        for layer, block in enumerate(self.blocks):
            x, r = block(x, layer, groups, expert_fn)
            routings.append(r)
        logits = self.head(self.ln_f(x))
        lm = F.cross_entropy(logits.reshape(B * S, -1).float(), targets_BS.reshape(-1))
        aux = torch.stack([r.aux_loss for r in routings]).mean()
        return lm + self.cfg.aux_loss_coef * aux, lm, routings


def build_model(cfg: TinyLMConfig, seed: int) -> TinyMoELM:
    """A freshly initialised model; the same ``seed`` gives bit-identical weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyMoELM(cfg)
    finally:
        torch.random.set_rng_state(gen_state)


class Adam:
    """Adam with optional decoupled weight decay (AdamW), the update of ``torch.optim.AdamW``.

    Written out because ``torch.optim`` imports ``torch._dynamo`` on first use (seconds in every
    freshly started process); the recorder, the distributed trainer and its single-process
    reference all use this one, so their updates agree bit for bit.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.weight_decay, self.t = weight_decay, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            if self.weight_decay:
                p.mul_(1 - self.lr * self.weight_decay)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
