"""The attention block and residual stream of the executor's model under a parallel layout.

Under a layout the executor runs a real transformer stack, not a stand-in: each MoE layer is

    h_mid = h + Attn(LN(h))          (the layer's ``dense`` Compute; its TP region)
    h_out = h_mid + MoE(h_mid)       (route, dispatch, expert, combine)

with a pre-LayerNorm without affine parameters (so SP's sequence-sharded LayerNorm has no
weights whose gradients would need a TP all-reduce the program does not emit), causal
multi-head self-attention over sequences of ``seq_len`` tokens, QKV ``[H, 3H]`` and output
``[H, H]`` projections (``4·H²`` weights = :attr:`ModelSpec.dense_params`), and a router
``[H, E]`` whose logits are computed (``2·H·E`` FLOPs per token, the route op's) while the
routing itself stays forced from the trace, gates included (replay mode: which expert a token
goes to and with what weight is the trace's, :mod:`moesim.executor.replay`).

FLOPs agree with the simulator's: per token the projections are ``8·H²`` and the score and
value products ``4·s·H`` (all ``s×s`` products are computed, then the causal mask applied, as
Megatron's unfused path does), which is :attr:`ModelSpec.attention_flops_per_token` for a
model that derives it from its shape (``dense_flops_per_token = 0``, no shared experts;
:func:`check_model` refuses others). The backward op is priced at twice the attention's and
the router's forward; the executor runs the attention's backward (autograd: dgrad and wgrad of
each projection, both score/value products) but no router backward, since forced gates give
the router no gradient — ``4·H·E`` FLOPs per token fewer than priced (1.5 % of the backward op
for tiny-cpu: H 64, E 8, s 128).

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", arXiv 1909.08053): the QKV
projection is column-parallel and the output projection row-parallel, heads split over the TP
group (rank ``i`` of ``t`` holds heads ``[i·a/t, (i+1)·a/t)``), so each rank's output is a
partial sum that the TP group's reduce-scatter (SP) sums. Sequence parallelism (Korthikanti et
al. 2022, arXiv 2205.05198): outside the TP region each rank holds ``T`` of the group's
``T·t`` tokens (its sequence shard); the region's all-gather and reduce-scatter move the real
activations. LayerNorm is per token, so applying it to the gathered tokens inside the region
gives exactly SP's sharded LayerNorm (it costs ``t``× its elementwise work, which is not priced
separately).

Heads: ``num_attention_heads`` when the model gives them, else :data:`DEFAULT_HEADS`; the FLOPs
do not depend on the head count.

Shape legend: ``N`` tokens of the TP region (``T·t``), ``T`` tokens of one rank, ``H`` hidden,
``a`` heads of this rank, ``d`` head width, ``E`` experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moesim.errors import MoesimError
from moesim.executor.replay import _generator
from moesim.specs import ModelSpec

DEFAULT_HEADS = 4
_SEED_DENSE = 0x5EED_0003
_SEED_STREAM = 0x5EED_0004


def num_heads(model: ModelSpec) -> int:
    """Attention heads of the executor's model (module docstring)."""
    return model.num_attention_heads or DEFAULT_HEADS


def check_model(model: ModelSpec, tp: int, tokens_per_region: int) -> None:
    """Refuse, in one line, a model the layout dataflow cannot run with the program's FLOPs."""
    a, H = num_heads(model), model.hidden_size
    problems = []
    if model.dense_flops_per_token > 0 or model.num_shared_experts:
        problems.append("its dense FLOPs are given (dense_flops_per_token) or include shared "
                        "experts, which the executor's attention would not do")
    if H % a or a % tp:
        problems.append(f"{a} heads must divide hidden {H} and be divisible by tp={tp}")
    if model.num_kv_heads and model.num_kv_heads != a or model.is_mla:
        problems.append("GQA/MLA attention is not implemented in the executor")
    if tokens_per_region % model.seq_len:
        problems.append(f"a TP region's {tokens_per_region} tokens (tokens_per_rank·tp) must "
                        f"hold whole sequences of seq_len={model.seq_len}")
    if problems:
        raise MoesimError(f"the executor cannot run {model.name} under this layout: "
                          f"{'; '.join(problems)}")


def dense_weights(model: ModelSpec, layer: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights of MoE layer ``layer``'s attention and router, on CPU:
    ``qkv [H, 3, a, d]``, ``out [a, d, H]``, ``router [H, E]``."""
    g = _generator(_SEED_DENSE, layer)
    H, a = model.hidden_size, num_heads(model)
    d = H // a
    qkv = torch.randn(H, 3, a, d, generator=g) / H**0.5
    out = torch.randn(a, d, H, generator=g) / H**0.5
    router = torch.randn(H, model.num_experts, generator=g) / H**0.5
    return {"qkv": qkv, "out": out, "router": router}


def tp_shard(weights: dict[str, torch.Tensor], index: int, tp: int) -> dict[str, torch.Tensor]:
    """TP rank ``index``'s shard: its heads' QKV columns and output rows (the router is
    replicated: it works on the rank's own tokens)."""
    a = weights["qkv"].shape[2]
    heads = slice(index * a // tp, (index + 1) * a // tp)
    return {"qkv": weights["qkv"][:, :, heads].contiguous(),
            "out": weights["out"][heads].contiguous(), "router": weights["router"].clone()}


def stream_input(model: ModelSpec, iteration: int, micro_batch: int, source: int, tokens: int
                 ) -> torch.Tensor:
    """The first layer's input ``[T, H]`` of token source ``source`` (a stage rank)."""
    g = _generator(_SEED_STREAM, iteration, micro_batch, source, 0)
    return torch.randn(tokens, model.hidden_size, generator=g)


def stream_grad(model: ModelSpec, iteration: int, micro_batch: int, source: int, tokens: int
                ) -> torch.Tensor:
    """The upstream gradient ``[T, H]`` of the last layer's output (``loss = Σ h ⊙ grad``)."""
    g = _generator(_SEED_STREAM, iteration, micro_batch, source, 1)
    return torch.randn(tokens, model.hidden_size, generator=g)


def qkv_projection(x_NH: torch.Tensor, qkv_H3ad: torch.Tensor) -> torch.Tensor:
    """``LN(x) @ W_qkv``: ``[N, 3, a, d]`` (column-parallel: this rank's heads)."""
    xn = F.layer_norm(x_NH, (x_NH.shape[-1],))
    H, _, a, d = qkv_H3ad.shape
    return (xn @ qkv_H3ad.reshape(H, 3 * a * d)).view(-1, 3, a, d)


def core_attention(qkv_N3ad: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Causal softmax attention per sequence of ``seq_len`` tokens: ``[N, a·d]``."""
    N, _, a, d = qkv_N3ad.shape
    q, k, v = (qkv_N3ad[:, i].reshape(N // seq_len, seq_len, a, d).transpose(1, 2)
               for i in range(3))
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(N, a * d)


def out_projection(ctx_NA: torch.Tensor, out_adH: torch.Tensor) -> torch.Tensor:
    """Row-parallel output projection: this rank's partial ``[N, H]``."""
    a, d, H = out_adH.shape
    return ctx_NA @ out_adH.reshape(a * d, H)


def attention(x_NH: torch.Tensor, w: dict[str, torch.Tensor], seq_len: int) -> torch.Tensor:
    """The whole attention block of one (TP shard of) weights: ``[N, H] → [N, H]``."""
    return out_projection(core_attention(qkv_projection(x_NH, w["qkv"]), seq_len), w["out"])


def router_logits(x_TH: torch.Tensor, router_HE: torch.Tensor) -> torch.Tensor:
    """The router's logits ``[T, E]`` (computed; routing and gates stay forced)."""
    return x_TH @ router_HE
