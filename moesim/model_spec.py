"""The model description (:class:`ModelSpec`): MoE layers, widths, experts, bytes per element,
attention shape, and the per-token work and parameters derived from them.

Units are in the names (see :mod:`moesim.specs`); presets live in ``moesim/presets/models/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import MoesimError
from moesim.spec_checks import (
    check_integral,
    check_non_negative,
    check_positive,
    check_text,
)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One MoE model's shape and training set-up.

    ``num_layers`` counts MoE layers only. An expert is an FFN of ``hidden_size ×
    ffn_hidden_size`` with 3 matrices when ``gated`` (SwiGLU) else 2. ``tokens_per_rank`` is the
    tokens one rank feeds one micro-batch (sequence length × micro-batch size); an iteration has
    ``micro_batches`` of them. Bytes per element: weights, gradients, optimizer state (mixed
    precision Adam: fp32 master + m + v = 12). ``dense_flops_per_token`` is the forward FLOPs of one
    layer's non-MoE part (attention, dense FFN, router) per token; 0 means "derive from the shape":
    ``8·H² + 4·seq·H`` (QKV+output projections, and causal-masked score/value products).
    ``dense_params_per_layer`` likewise (0: ``4·H²`` plus shared experts). ``other_params`` counts
    the parameters outside the MoE layers (embeddings, output head, dense-only layers) so that
    :attr:`total_params` matches the published model size; the simulator does not move them.

    Optional shape facts for the parallel-layout formulas (PARALLELISM.md; 0 = unknown / not
    used, so a spec without them computes exactly what it did before they existed):
    ``num_attention_heads``, ``num_kv_heads`` (GQA query groups; 0 = one per head),
    ``head_dim`` (0 = ``hidden_size / num_attention_heads``); DeepSeek's multi-head latent
    attention (MLA: ``kv_lora_rank`` > 0 turns it on; ``q_lora_rank`` 0 = queries not
    compressed, as in DeepSeek-V2-Lite; ``qk_nope_head_dim``, ``qk_rope_head_dim``,
    ``v_head_dim`` per head); ``vocab_size``; ``tied_embeddings`` (the output head shares the
    embedding table); ``num_dense_layers`` transformer layers with a dense FFN of
    ``dense_ffn_hidden_size`` (0 = ``ffn_hidden_size``) beside the MoE layers, e.g.
    DeepSeek-V3's first 3 (their parameters stay counted in ``other_params``);
    ``dense_blocks_per_moe_layer`` whole dense transformer blocks folded into each MoE layer's
    ``dense_*`` fields (1 where MoE sits in every other layer, GShard / DeepSpeed-MoE style, as
    the GPT-MoE presets do), so the memory model counts their activations.
    """

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    gated: bool = True
    seq_len: int = 2048
    tokens_per_rank: int = 2048
    micro_batches: int = 1
    bytes_weight: float = 2.0
    bytes_grad: float = 2.0
    bytes_optim: float = 12.0
    bytes_activation: float = 2.0
    num_shared_experts: int = 0
    dense_flops_per_token: float = 0.0
    dense_params_per_layer: float = 0.0
    other_params: float = 0.0
    num_attention_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = False
    num_dense_layers: int = 0
    dense_ffn_hidden_size: int = 0
    dense_blocks_per_moe_layer: int = 0
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        check_text(self, "name", "description", "source")
        check_non_negative(self, *SHAPE_FIELDS)
        check_integral(self, *SHAPE_FIELDS)
        if not isinstance(self.tied_embeddings, (bool, np.bool_)):
            raise MoesimError(f"ModelSpec.tied_embeddings must be true or false, got "
                              f"{self.tied_embeddings!r}")
        object.__setattr__(self, "tied_embeddings", bool(self.tied_embeddings))
        _check_attention_shape(self)
        check_positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
                  "seq_len", "tokens_per_rank", "micro_batches", "bytes_weight", "bytes_grad",
                  "bytes_activation")
        check_non_negative(self, "bytes_optim", "num_shared_experts", "dense_flops_per_token",
                      "dense_params_per_layer", "other_params")
        check_integral(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
                  "seq_len", "tokens_per_rank", "micro_batches", "num_shared_experts")
        if not isinstance(self.gated, (bool, np.bool_)):
            raise MoesimError(f"ModelSpec.gated must be true or false, got {self.gated!r}")
        object.__setattr__(self, "gated", bool(self.gated))
        if self.top_k > self.num_experts:
            raise MoesimError(
                f"ModelSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "lower top_k or raise num_experts"
            )

    @property
    def params_per_expert(self) -> int:
        """Weights in one expert FFN (3·H·F gated, 2·H·F otherwise)."""
        return (3 if self.gated else 2) * self.hidden_size * self.ffn_hidden_size

    @property
    def expert_flops_per_token(self) -> float:
        """Forward FLOPs of one expert on one token (2 per multiply-add)."""
        return 2.0 * self.params_per_expert

    @property
    def expert_weight_bytes(self) -> float:
        return self.params_per_expert * self.bytes_weight

    @property
    def attention_flops_per_token(self) -> float:
        """Forward FLOPs of a layer's non-MoE part per token (see class docstring)."""
        if self.dense_flops_per_token > 0:
            return self.dense_flops_per_token
        h, s = self.hidden_size, self.seq_len
        shared = self.num_shared_experts * self.expert_flops_per_token
        return 8.0 * h * h + 4.0 * s * h + shared

    @property
    def dense_params(self) -> float:
        """Non-expert parameters of one layer (attention 4·H² plus shared experts) unless given."""
        if self.dense_params_per_layer > 0:
            return self.dense_params_per_layer
        return 4.0 * self.hidden_size**2 + self.num_shared_experts * self.params_per_expert

    @property
    def expert_params_per_layer(self) -> int:
        """Routed-expert weights of one MoE layer: ``num_experts · params_per_expert``."""
        return self.num_experts * self.params_per_expert

    @property
    def total_params(self) -> float:
        """Whole-model parameter count: MoE layers (experts + dense part) + ``other_params``."""
        return self.num_layers * (self.expert_params_per_layer + self.dense_params) \
            + self.other_params

    @property
    def active_params(self) -> float:
        """Parameters one token touches: top-k experts and the dense part of every MoE layer,
        plus ``other_params`` (an upper bound: all of the embedding table is counted)."""
        return self.num_layers * (self.top_k * self.params_per_expert + self.dense_params) \
            + self.other_params

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state on the wire."""
        return self.hidden_size * self.bytes_activation

    # -- shape facts for the layout formulas (fields documented in the class docstring) ------
    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3) rather than multi-/grouped-query."""
        return self.kv_lora_rank > 0

    @property
    def num_query_groups(self) -> int:
        """KV heads (GQA groups): ``num_kv_heads``, else one per attention head (0: unknown)."""
        return self.num_kv_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        """Per-head width of queries/keys/values (non-MLA): ``head_dim`` or ``H / heads``."""
        if self.head_dim:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0

    @property
    def attention_params(self) -> float:
        """Weights of one layer's attention block (see :func:`attention_params`)."""
        return attention_params(self)

    @property
    def dense_ffn_size(self) -> int:
        """FFN width of the dense layers: ``dense_ffn_hidden_size``, else ``ffn_hidden_size``."""
        return self.dense_ffn_hidden_size or self.ffn_hidden_size

    @property
    def dense_layer_params(self) -> float:
        """Parameters of one dense-only transformer layer: attention + an FFN of
        :attr:`dense_ffn_size` (3 matrices gated, else 2) + two RMSNorm weight vectors (2·H)."""
        mats = 3 if self.gated else 2
        return self.attention_params + mats * self.hidden_size * self.dense_ffn_size \
            + 2.0 * self.hidden_size

    @property
    def embedding_params(self) -> float:
        """Token-embedding table ``vocab · H`` (0 when ``vocab_size`` is unknown)."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def output_head_params(self) -> float:
        """Output head ``vocab · H``, 0 when tied to the embedding (or the vocab unknown)."""
        return 0.0 if self.tied_embeddings else self.embedding_params

    @property
    def final_norm_params(self) -> float:
        """The final RMSNorm before the output head (``H`` weights)."""
        return float(self.hidden_size)

    @property
    def total_transformer_layers(self) -> int:
        """Dense-only layers + MoE layers: the layers a pipeline layout cuts into stages
        (blocks folded into MoE layers, ``dense_blocks_per_moe_layer``, ride with them)."""
        return self.num_dense_layers + self.num_layers

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


SHAPE_FIELDS = ("num_attention_heads", "num_kv_heads", "head_dim", "q_lora_rank",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "vocab_size", "num_dense_layers", "dense_ffn_hidden_size",
                 "dense_blocks_per_moe_layer")
_MLA_DIMS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _check_attention_shape(m: ModelSpec) -> None:
    """Heads, GQA groups and MLA dimensions must describe one consistent attention block."""
    heads = m.num_attention_heads
    if not heads and (m.num_kv_heads or m.head_dim or m.is_mla):
        raise MoesimError("ModelSpec: num_kv_heads, head_dim and the MLA dimensions need "
                          "num_attention_heads; set it")
    if m.num_kv_heads and (m.num_kv_heads > heads or heads % m.num_kv_heads):
        raise MoesimError(f"ModelSpec.num_kv_heads={m.num_kv_heads} must divide "
                          f"num_attention_heads={heads}; fix one of them")
    mla_given = [n for n in ("q_lora_rank", *_MLA_DIMS) if getattr(m, n)]
    if not m.is_mla:
        if mla_given:
            raise MoesimError(f"ModelSpec: {', '.join(mla_given)} describe MLA attention, "
                              "which needs kv_lora_rank > 0; set it or drop them")
        if heads and not m.head_dim and m.hidden_size % heads:
            raise MoesimError(f"ModelSpec: hidden_size={m.hidden_size} is not a multiple of "
                              f"num_attention_heads={heads}; set head_dim")
        return
    missing = [n for n in _MLA_DIMS if not getattr(m, n)]
    if missing:
        raise MoesimError(f"ModelSpec: MLA attention (kv_lora_rank > 0) needs "
                          f"{', '.join(missing)}; set them")
    if m.num_kv_heads not in (0, heads) or m.head_dim:
        raise MoesimError("ModelSpec: MLA attention takes no head_dim and no num_kv_heads "
                          "other than num_attention_heads (its per-head sizes are "
                          "qk_nope/qk_rope/v_head_dim); drop them")


def attention_params(m: ModelSpec) -> float:
    """Weights of one layer's attention block.

    Heads unknown: ``4·H²`` (ModelSpec's long-standing convention). Multi-/grouped-query
    attention: ``Q`` and the output projection ``H·a·d`` each, ``K`` and ``V`` ``H·g·d`` each
    (``a`` heads, ``g`` query groups, ``d`` head dim), no biases (Llama/Mixtral; Megatron's
    ``theoretical_memory_usage.py`` counts the same). MLA (DeepSeek-V2 arXiv 2405.04434 §2.1,
    the released ``modeling_deepseek.py`` shapes): query down ``H·q_lora`` + its RMSNorm
    ``q_lora`` + query up ``q_lora·a·(nope + rope)`` (or ``H·a·(nope + rope)`` uncompressed),
    joint KV down ``H·(kv_lora + rope)`` + its RMSNorm ``kv_lora``, KV up
    ``kv_lora·a·(nope + v)``, output ``a·v·H``.
    """
    h, a = m.hidden_size, m.num_attention_heads
    if not a:
        return 4.0 * h * h
    if not m.is_mla:
        d, g = m.attention_head_dim, m.num_query_groups
        return float(2 * h * a * d + 2 * h * g * d)
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        q = m.q_lora_rank * (h + 1 + a * qk)
    else:
        q = h * a * qk
    kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank \
        + m.kv_lora_rank * a * (m.qk_nope_head_dim + m.v_head_dim)
    return float(q + kv + a * m.v_head_dim * h)
