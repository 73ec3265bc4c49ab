"""Memory under a parallel layout, as formulas of scalars: activations per layer, in-flight
micro-batches per pipeline stage, and weight / gradient / optimizer bytes under ZeRO 0–3.

:mod:`moesim.memory_stage` assembles them per stage and rank; this module only computes.
Notation (PARALLELISM.md): ``T = s·b`` tokens of one micro-batch of one model replica,
``s`` sequence length, ``h`` hidden, ``a`` heads, ``F`` FFN width, ``t`` TP, ``c`` CP,
``et`` expert TP, ``p`` PP stages, ``v`` virtual chunks, ``m`` micro-batches, ``d`` the DP size a
state is sharded over. Bytes throughout; activations at ``b_act`` bytes per element and dropout
masks at 1 byte per element, as Korthikanti et al. count them.

Activations — Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (MLSys 2023, arXiv 2205.05198), §4 and Table 2, counted tensor by tensor so that the
table's rows come out exactly for a 4h FFN with ``b_act = 2``:

- attention ``11·T·h + 5·a·s·T``: its input, Q, K, V and the output projection's input
  (``5·h`` elements per token; GQA and MLA change Q/K/V's widths, see :class:`AttentionDims`),
  the output dropout mask (``h`` bytes), and the scores: softmax output, its dropout mask and
  the dropout output (``2 + 1 + 2`` bytes per score). Flash attention, like selective
  recompute of ``core_attn``, keeps no scores.
- MLP ``19·T·h`` for ``F = 4h``: its input (``h``), the first GEMM's output (``F``; ``2F``
  gated) and the activation output (``F``), and the dropout mask (``h`` bytes): per token
  ``b_act·(h + 2F) + h`` plain, ``b_act·(h + 3F) + h`` gated (SwiGLU keeps both halves of its
  input and its product).
- LayerNorms ``4·T·h``: the inputs of the two norms.
- Without SP the block inputs, norms and masks (``10·T·h``) are replicated on every TP rank and
  the rest divides by ``t``; with SP everything divides by ``t``. CP divides every term by ``c``
  (each rank holds ``s/c`` of each sequence; its queries still see all ``s`` keys).
- Recompute (Megatron-Core ``TransformerConfig.recompute_modules``: ``core_attn``, ``mlp``,
  ``moe`` checkpoint their module and keep its input; ``moe_act``, ``layernorm``,
  ``mla_up_proj`` discard their output): ``core_attn`` drops the scores, ``mlp`` the MLP's
  intermediates, ``layernorm`` the norms' outputs (the attention and MLP inputs),
  ``mla_up_proj`` MLA's up-projected Q/K/V, ``moe_act`` each routed row's activation output,
  ``moe`` the whole MoE block but its input. ``full`` keeps each layer's input, ``2·T·h``.
- MoE layers replace the MLP term by the rows that rank's experts actually compute: per row
  ``b_act·(h + n·F/et)`` (``n`` = 3 gated, 2 plain; ``moe_act`` drops ``F/et``), plus per
  routed token its input, the dropout mask, the router's fp32 probabilities ``4·E`` and the
  shared experts' intermediates — the same accounting as :mod:`moesim.memory`.

The embedding and output layer follow Megatron's ``theoretical_memory_usage.py``: 8 bytes of
token ids and an ``h``-byte dropout mask per token on the first stage; the final norm's
output and the fp32 logits, ``4·T·(h + V)`` split by TP, on the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.errors import MoesimError
from moesim.specs import ModelSpec

MASK_BYTES = 1.0
ROUTER_PROB_BYTES = 4.0
TOKEN_ID_BYTES = 8.0
LOGIT_BYTES = 4.0
SELECTIVE_MODULES = ("core_attn", "mlp", "moe_act", "layernorm", "mla_up_proj", "moe")


@dataclass(frozen=True, kw_only=True)
class ActivationSplit:
    """How one rank's share of a layer's activations is cut: TP ``t`` (with ``sp``), CP ``c``,
    expert TP ``et``, the selectively recomputed ``modules`` and whether attention is fused
    (``flash``: no scores kept, as every FlashAttention / cuDNN fused kernel)."""

    t: int = 1
    sp: bool = False
    c: int = 1
    et: int = 1
    modules: tuple[str, ...] = ()
    flash: bool = False

    def __post_init__(self) -> None:
        for name in ("t", "c", "et"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoesimError(f"ActivationSplit.{name} must be an integer >= 1, got "
                                  f"{value!r}")
        unknown = set(self.modules) - set(SELECTIVE_MODULES)
        if unknown:
            raise MoesimError(f"ActivationSplit: unknown recompute module(s) {sorted(unknown)}"
                              f"; choose from {', '.join(SELECTIVE_MODULES)}")

    @property
    def seq_split(self) -> int:
        """What the replicated-without-SP terms divide by: ``t`` with SP, else 1."""
        return self.t if self.sp else 1


@dataclass(frozen=True, kw_only=True)
class AttentionDims:
    """Per-token widths of the tensors an attention block keeps: ``q``, ``k``, ``v`` (the
    core-attention inputs), ``o`` (the output projection's input) and ``latent`` (MLA's
    compressed query and KV latents, before and after their norms, and the shared rope key)."""

    hidden: int
    heads: int
    q: int
    k: int
    v: int
    o: int
    latent: int = 0


def attention_dims(model: ModelSpec) -> AttentionDims:
    """The :class:`AttentionDims` of ``model``: multi-head (``h`` each: Table 2's case, also
    when the heads are unknown), grouped-query (K/V of ``g·d``), or MLA (DeepSeek-V2 arXiv
    2405.04434 §2.1: Q, K of ``a·(nope + rope)``, V and output of ``a·v_head_dim``)."""
    h, a = model.hidden_size, model.num_attention_heads
    if model.is_mla:
        qk = a * (model.qk_nope_head_dim + model.qk_rope_head_dim)
        latent = 2 * model.q_lora_rank + 2 * model.kv_lora_rank + model.qk_rope_head_dim
        vo = a * model.v_head_dim
        return AttentionDims(hidden=h, heads=a, q=qk, k=qk, v=vo, o=vo, latent=latent)
    if not a:
        return AttentionDims(hidden=h, heads=0, q=h, k=h, v=h, o=h)
    d, g = model.attention_head_dim, model.num_query_groups
    return AttentionDims(hidden=h, heads=a, q=a * d, k=g * d, v=g * d, o=a * d)


def attention_bytes(tokens: float, seq_len: int, dims: AttentionDims, split: ActivationSplit,
                    b_act: float = 2.0) -> float:
    """One attention block's kept activations on one rank (module docstring): ``(11·T·h +
    5·a·s·T)`` bytes for multi-head attention at ``b_act = 2`` without parallelism. The
    scores need the head count: unknown heads are refused unless attention is fused."""
    mods, h = split.modules, dims.hidden
    per_tok_rep = (0.0 if "layernorm" in mods else b_act * h) + MASK_BYTES * h
    up = 0 if "mla_up_proj" in mods else dims.q + dims.k + dims.v
    per_tok_tp = b_act * (up + dims.o)
    out = tokens * (per_tok_rep / split.seq_split + per_tok_tp / split.t
                    + b_act * dims.latent) / split.c
    if not (split.flash or "core_attn" in mods):
        if not dims.heads:
            raise MoesimError("attention scores' memory needs the model's num_attention_heads;"
                              " set it, or count fused (flash) attention")
        out += 5.0 * dims.heads * seq_len * tokens / (split.t * split.c)
    return out


def layernorm_bytes(tokens: float, hidden: int, split: ActivationSplit,
                    b_act: float = 2.0) -> float:
    """The two norms' inputs, ``4·T·h`` at ``b_act = 2`` (divided by ``t`` with SP, ``c``)."""
    return tokens * 2.0 * b_act * hidden / (split.seq_split * split.c)


def mlp_bytes(tokens: float, hidden: int, ffn: int, gated: bool, split: ActivationSplit,
              b_act: float = 2.0) -> float:
    """A dense MLP's kept activations: ``19·T·h`` for ``F = 4h`` plain at ``b_act = 2``; in
    general ``T·(b_act·(h + n·F) + h)`` with ``n = 3`` gated, 2 plain (module docstring)."""
    mods = split.modules
    rep = (0.0 if "layernorm" in mods else b_act * hidden) + MASK_BYTES * hidden
    inter = 0.0 if "mlp" in mods else b_act * (3 if gated else 2) * ffn
    return tokens * (rep / split.seq_split + inter / split.t) / split.c


def moe_token_bytes(tokens: float, hidden: int, num_experts: int, shared_ffn: int, gated: bool,
                    split: ActivationSplit, b_act: float = 2.0) -> float:
    """An MoE block's activations outside the routed experts, on one rank: per token its input
    (``h``, dropped by ``layernorm``), the dropout mask, the router's fp32 probabilities
    (``4·E`` bytes) and the shared experts' intermediates (``n·F_shared``, TP-split); ``moe``
    recompute keeps only the input and the mask."""
    mods = split.modules
    rep = (0.0 if "layernorm" in mods else b_act * hidden) + MASK_BYTES * hidden
    if "moe" not in mods:
        rep += ROUTER_PROB_BYTES * num_experts
        shared = b_act * (3 if gated else 2) * shared_ffn / split.t
    else:
        shared = 0.0
    return tokens * (rep / split.seq_split + shared) / split.c


def expert_row_bytes(hidden: int, ffn: int, gated: bool, split: ActivationSplit,
                     b_act: float = 2.0) -> float:
    """Bytes one routed row keeps on the rank that computes it: its input ``h`` and the
    expert's intermediates ``n·F/et`` (``n`` = 3 gated, 2 plain); ``moe_act`` drops the
    activation output (``F/et``), ``moe`` all of it (module docstring)."""
    if "moe" in split.modules:
        return 0.0
    n = (3 if gated else 2) - (1 if "moe_act" in split.modules else 0)
    return b_act * (hidden + n * ffn / split.et)


def full_recompute_layer_bytes(tokens: float, hidden: int, split: ActivationSplit,
                               b_act: float = 2.0) -> float:
    """A fully recomputed layer keeps its input only: ``2·T·h`` (Table 2), ``/t`` with SP."""
    return tokens * b_act * hidden / (split.seq_split * split.c)


def embedding_bytes(tokens: float, hidden: int, split: ActivationSplit) -> float:
    """First stage, per micro-batch: 8-byte token ids and the embedding dropout mask
    (Megatron ``theoretical_memory_usage.py``: ``8·s·b + s·b·h``); the ids are not split by
    TP (every TP rank reads the whole micro-batch), the mask is with SP."""
    return tokens * (TOKEN_ID_BYTES + MASK_BYTES * hidden / split.seq_split) / split.c


def output_layer_bytes(tokens: float, hidden: int, vocab: int, split: ActivationSplit) -> float:
    """Last stage, per micro-batch: the final norm's output and the fp32 logits for the loss,
    ``4·s·b·h·(1 + V/h)`` (Megatron ``theoretical_memory_usage.py``); the logits split over
    TP (vocab-parallel), the norm output with SP."""
    return tokens * LOGIT_BYTES * (hidden / split.seq_split + vocab / split.t) / split.c


# --------------------------------------------------------------------------------------------
# pipeline schedules: micro-batches in flight


def interleaved_memory_penalty(p: int, v: int) -> float:
    """Megatron ``theoretical_memory_usage.py``: the interleaved schedule's first stage holds
    ``1 + (p − 1)/(p·v)`` times the activations of plain 1F1B's ``p`` micro-batches."""
    return 1.0 + (p - 1) / (p * v)


def in_flight_micro_batches(schedule: str, p: int, stage: int, m: int, v: int = 1,
                            overlap: bool = False) -> float:
    """Most micro-batches of activations stage ``stage`` holds at once, in units of one
    micro-batch through all of the stage's layers (Narayanan et al. arXiv 2104.04473 §2.2):
    GPipe ``m``; 1F1B ``min(p − i, m)``; interleaved ``min(2·(p − i − 1) + (v − 1)·p + 1,
    m·v) / v`` chunk passes (stage 0: ``p·(1 + (p − 1)/(p·v))``, the penalty above). The
    all-to-all overlap's extra warm-up forward (:mod:`moesim.pipeline`) adds one pass."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(p - stage + int(overlap), m))
    if schedule == "interleaved":
        return min(2 * (p - stage - 1) + (v - 1) * p + 1 + int(overlap), m * v) / v
    raise MoesimError(f"unknown pipeline schedule {schedule!r}; use 1f1b, interleaved or gpipe")


# --------------------------------------------------------------------------------------------
# weights, gradients and optimizer state


def state_bytes_per_param(zero: int, b_w: float, b_g: float, b_o: float, shards: int
                          ) -> tuple[float, float, float]:
    """``(weights, grads, optimizer)`` bytes per parameter on one rank when the state is
    sharded over ``shards`` data-parallel ranks (Rajbhandari et al., ZeRO, arXiv 1910.02054
    §5): stage 0 keeps all of it; 1 (Megatron's distributed optimizer) shards the optimizer
    state; 2 also the gradients; 3 (FSDP) also the weights. Megatron's 18 bytes per parameter
    are ``b_w = 2, b_g = 4, b_o = 12`` at stage 0, ``6 + 12/d`` at stage 1."""
    if zero not in (0, 1, 2, 3):
        raise MoesimError(f"ZeRO stage {zero!r}: use 0, 1, 2 or 3")
    d = float(shards)
    return (b_w / d if zero >= 3 else b_w, b_g / d if zero >= 2 else b_g,
            b_o / d if zero >= 1 else b_o)


def zero3_gather_bytes(unit_params: list[float], b_w: float, prefetch: int = 1) -> float:
    """ZeRO-3 / FSDP gathered-parameter buffers: the unsharded weights of the unit being
    computed and the ``prefetch`` units fetched ahead (PyTorch FSDP's default keeps one
    all-gather in flight ahead of compute): the largest sum over ``1 + prefetch`` consecutive
    units, in bytes."""
    if not unit_params:
        return 0.0
    k = min(1 + prefetch, len(unit_params))
    return max(sum(unit_params[i:i + k]) for i in range(len(unit_params) - k + 1)) * b_w


def stage_dense_params(model: ModelSpec, num_dense_layers: int, num_moe_layers: int,
                       first: bool, last: bool, num_stages: int) -> float:
    """Non-expert parameters a stage holds, before TP divides them: its dense-only layers
    (:attr:`ModelSpec.dense_layer_params`), the non-expert part of its MoE layers
    (:attr:`ModelSpec.dense_params`), the embedding on the first stage and the final norm and
    output head on the last; with tied embeddings and ``pp > 1`` the last stage keeps its own
    copy of the table for the head (Megatron keeps word embeddings on both ends)."""
    params = num_dense_layers * model.dense_layer_params + num_moe_layers * model.dense_params
    if first:
        params += model.embedding_params
    if last:
        params += model.final_norm_params + model.output_head_params
        if model.tied_embeddings and num_stages > 1:
            params += model.embedding_params
    return params
