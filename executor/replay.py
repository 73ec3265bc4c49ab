"""Replay mode's deterministic data: expert weights, token contents and forced routing.

Every process that needs a tensor builds it from a seed, so the distributed ranks and the
single-process reference (:mod:`moesim.executor.reference`) see identical numbers without
shipping them around.

Shape legend: ``H`` hidden size, ``F`` expert FFN size, ``N`` tokens of one rank in one
layer-pass, ``A`` token *assignments* of that rank (top-k expanded: kept + dropped), ``P``
physical slots (``ranks · slots_per_rank``), ``R`` ranks.

The forced layer-pass of rank ``r`` (:func:`layer_inputs`):

- ``A = kept_RP[r].sum() + dropped_R[r]`` assignments; ``N = ceil(A / top_k)`` tokens; assignment
  ``j`` belongs to token ``j mod N`` (so one token's ``k`` assignments usually go to different
  slots) and carries a positive gate weight ``gate_A[j]``;
- exactly ``kept_RP[r, p]`` assignments go to slot ``p`` and ``dropped_R[r]`` are dropped; which
  assignment is which is a seeded shuffle;
- the layer's output is the MoE output only (no residual): ``out[t] = Σ_{j kept, token j = t}
  gate_j · FFN_{slot j}(x[t])``, so a dropped assignment contributes 0 — the token passes
  through on the residual path outside the layer, as in DeepSpeed / Megatron;
- ``grad_out_NH`` is the seeded upstream gradient used by the backward pass.

Expert weights are a function of ``(layer, expert)`` only, so every replica of an expert is
identical. The FFN is SwiGLU ``(silu(x W1) ⊙ (x W3)) W2`` when ``gated`` else ``gelu(x W1) W2``;
one expert's parameters are one flat vector ``[W1 | W3 | W2]`` (row-major) so a collective can
move them as one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moesim.ops import LayerRoute
from moesim.specs import ModelSpec

_SEED_WEIGHTS = 0x5EED_0001
_SEED_TOKENS = 0x5EED_0002


def torch_dtype(model: ModelSpec) -> torch.dtype:
    """Tensor dtype for a model: fp32 when it stores 4-byte activations, else bf16."""
    return torch.float32 if model.bytes_activation >= 4 else torch.bfloat16


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of small non-negative ints (stable across runs)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def expert_numel(model: ModelSpec) -> int:
    """Elements in one expert's flat parameter vector (3·H·F gated, 2·H·F otherwise)."""
    return model.params_per_expert


def expert_weights(model: ModelSpec, layer: int, expert: int) -> torch.Tensor:
    """The flat fp32 parameters ``[expert_numel]`` of ``(layer, expert)``, on CPU."""
    g = _generator(_SEED_WEIGHTS, layer, expert)
    H, F = model.hidden_size, model.ffn_hidden_size
    mats = 3 if model.gated else 2
    w = torch.randn(mats * H * F, generator=g)
    w[: (mats - 1) * H * F] /= H**0.5
    w[(mats - 1) * H * F:] /= F**0.5
    return w


def split_weights(flat: torch.Tensor, model: ModelSpec) -> list[torch.Tensor]:
    """Views ``[W1 [H,F], (W3 [H,F]), W2 [F,H]]`` of one expert's flat parameters."""
    H, F = model.hidden_size, model.ffn_hidden_size
    n = H * F
    mats = [flat[:n].view(H, F)]
    if model.gated:
        mats.append(flat[n:2 * n].view(H, F))
    mats.append(flat[-n:].view(F, H))
    return mats


def ffn(x_MH: torch.Tensor, flat: torch.Tensor, model: ModelSpec) -> torch.Tensor:
    """One expert's FFN on ``M`` rows: ``[M, H] → [M, H]``."""
    mats = split_weights(flat, model)
    if model.gated:
        w1, w3, w2 = mats
        return (torch.nn.functional.silu(x_MH @ w1) * (x_MH @ w3)) @ w2
    w1, w2 = mats
    return torch.nn.functional.gelu(x_MH @ w1) @ w2


def ffn_forward(x_MH: torch.Tensor, flat: torch.Tensor, model: ModelSpec
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`ffn` without autograd, keeping what :func:`ffn_backward` needs: ``(y, saved)``,
    ``saved = (x, h1, h3, g)`` gated, ``(x, h1, a)`` plain; its last entry is the activation
    output (:func:`ffn_activation`)."""
    mats = split_weights(flat, model)
    h1 = x_MH @ mats[0]
    if model.gated:
        saved = (x_MH, h1, x_MH @ mats[1])
        g = ffn_activation(saved, gated=True)
        return g @ mats[2], (*saved, g)
    a = ffn_activation((x_MH, h1), gated=False)
    return a @ mats[1], (x_MH, h1, a)


def ffn_activation(pre: tuple[torch.Tensor, ...], *, gated: bool) -> torch.Tensor:
    """The expert's activation output from ``(x, h1[, h3])``, the first GEMMs' outputs:
    ``silu(h1) ⊙ h3`` gated, ``gelu(h1)`` plain. Selective recomputation of ``moe_act``
    drops it after the forward and rebuilds it here before the backward."""
    if gated:
        return torch.nn.functional.silu(pre[1]) * pre[2]
    return torch.nn.functional.gelu(pre[1])


def ffn_backward(dy_MH: torch.Tensor, saved: tuple[torch.Tensor, ...], flat: torch.Tensor,
                 grad_flat: torch.Tensor, model: ModelSpec) -> torch.Tensor:
    """Hand-written backward of :func:`ffn_forward` (dgrad + wgrad, 2× its GEMMs): returns
    ``dx [M, H]`` and *adds* the weight gradient into ``grad_flat`` (same layout as ``flat``).
    Checked against autograd through the reference layer."""
    mats, gmats = split_weights(flat, model), split_weights(grad_flat, model)
    if model.gated:
        x, h1, h3, g = saved
        gmats[2].addmm_(g.t(), dy_MH)
        dg = dy_MH @ mats[2].t()
        sig = torch.sigmoid(h1)
        dh3 = dg * (h1 * sig)
        dh1 = dg * h3 * (sig * (1 + h1 * (1 - sig)))
        gmats[0].addmm_(x.t(), dh1)
        gmats[1].addmm_(x.t(), dh3)
        return torch.addmm(dh1 @ mats[0].t(), dh3, mats[1].t())
    x, h1, a = saved
    gmats[1].addmm_(a.t(), dy_MH)
    da = dy_MH @ mats[1].t()
    cdf = 0.5 * (1 + torch.erf(h1 * 0.5**0.5))
    pdf = torch.exp(-0.5 * h1 * h1) * (2 * torch.pi) ** -0.5
    dh1 = da * (cdf + h1 * pdf)
    gmats[0].addmm_(x.t(), dh1)
    return dh1 @ mats[0].t()


@dataclass
class LayerInputs:
    """One rank's forced layer-pass (see the module docstring)."""

    x_NH: torch.Tensor
    grad_out_NH: torch.Tensor
    slot_A: np.ndarray     # destination physical slot of each assignment, -1 if dropped
    token_A: np.ndarray    # token index of each assignment
    gate_A: torch.Tensor   # gate weight of each assignment

    @property
    def kept_order(self) -> np.ndarray:
        """Kept assignments sorted by destination slot (stable): the dispatch send order."""
        kept = np.flatnonzero(self.slot_A >= 0)
        return kept[np.argsort(self.slot_A[kept], kind="stable")]


def layer_inputs(route: LayerRoute, rank: int, model: ModelSpec, iteration: int,
                 micro_batch: int, layer: int, dtype: torch.dtype = torch.float32) -> LayerInputs:
    """Rank ``rank``'s tokens, gates and forced assignment for one layer-pass (CPU tensors)."""
    kept_P = np.asarray(route.kept_RP[rank], dtype=np.int64)
    dropped = int(np.asarray(route.dropped_R)[rank])
    A = int(kept_P.sum()) + dropped
    N = -(-A // model.top_k) if A else 0
    g = _generator(_SEED_TOKENS, iteration, micro_batch, layer, rank)
    slots = np.concatenate([np.repeat(np.arange(len(kept_P)), kept_P),
                            np.full(dropped, -1, dtype=np.int64)])
    perm = torch.randperm(A, generator=g).numpy()
    x = torch.randn(N, model.hidden_size, generator=g).to(dtype)
    grad_out = torch.randn(N, model.hidden_size, generator=g).to(dtype)
    gate = (0.1 + 0.9 * torch.rand(A, generator=g)).to(dtype)
    return LayerInputs(x_NH=x, grad_out_NH=grad_out, slot_A=slots[perm].astype(np.int64),
                       token_A=np.arange(A, dtype=np.int64) % max(N, 1), gate_A=gate)
