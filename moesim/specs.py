"""Model, hardware and cluster descriptions, and the preset files they load from.

Units are in the names: ``*_bytes``, ``*_s`` (seconds), ``*_GBps`` (1e9 bytes/s), ``*_flops``
(floating-point operations per second for throughputs, plain counts otherwise), ``*_GiB``.

Presets are TOML files under ``moesim/presets/{models,clusters,hardware}/``; every number in them
carries its source in a comment. ``load_model("mixtral-8x7b-e8k2")`` finds a preset by name;
``load_model("path/to/my_model.toml")`` loads a user's copy. The same goes for clusters and
hardware profiles (a cluster names its hardware profile by name or path).
``list_presets(kind)`` and ``preset_descriptions(kind)`` list them (``moesim presets``); errors in
a file raise :class:`MoesimError` naming the file, the table and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"
MAX_COUNT = 2**31  # layers, experts, hidden sizes, tokens, GPUs: far above any real model


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (_is_number(value) and value > 0):
            raise MoesimError(
                f"{type(obj).__name__}.{name} must be a positive number, got {value!r}; "
                f"fix the value in the spec"
            )


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (_is_number(value) and value >= 0):
            raise MoesimError(
                f"{type(obj).__name__}.{name} must be a number >= 0, got {value!r}; "
                f"fix the value in the spec"
            )


def _integral(obj: Any, *names: str) -> None:
    """Counts must be whole numbers (an int, or a float like 8.0, which is stored as 8)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            object.__setattr__(obj, name, int(value))
        elif isinstance(value, numbers.Real) and float(value).is_integer():
            object.__setattr__(obj, name, int(value))
        else:
            raise MoesimError(
                f"{type(obj).__name__}.{name} must be a whole number, got {value!r}; "
                f"fix the value in the spec"
            )
        if abs(getattr(obj, name)) > MAX_COUNT:
            raise MoesimError(f"{type(obj).__name__}.{name} = {value!r} is too large to be real "
                              f"(the limit is {MAX_COUNT:.2g}); fix the value in the spec")


def _text(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, str):
            raise MoesimError(f"{type(obj).__name__}.{name} must be a string, got {value!r}")


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
        _text(self, "name", "description", "source")
        _non_negative(self, *_SHAPE_FIELDS)
        _integral(self, *_SHAPE_FIELDS)
        if not isinstance(self.tied_embeddings, (bool, np.bool_)):
            raise MoesimError(f"ModelSpec.tied_embeddings must be true or false, got "
                              f"{self.tied_embeddings!r}")
        object.__setattr__(self, "tied_embeddings", bool(self.tied_embeddings))
        _check_attention_shape(self)
        _positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
                  "seq_len", "tokens_per_rank", "micro_batches", "bytes_weight", "bytes_grad",
                  "bytes_activation")
        _non_negative(self, "bytes_optim", "num_shared_experts", "dense_flops_per_token",
                      "dense_params_per_layer", "other_params")
        _integral(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
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


_SHAPE_FIELDS = ("num_attention_heads", "num_kv_heads", "head_dim", "q_lora_rank",
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


COLLECTIVE_KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
                    "reduce", "send_recv")
#: Op classes of ``HardwareProfile.context_factors`` keys: compute, host work, each collective.
CONTEXT_CLASSES = ("compute", "host_compute", "host_copy", *COLLECTIVE_KINDS)


@dataclass(frozen=True, kw_only=True)
class CollectiveLink:
    """One collective kind's own bus bandwidth and latency on a link level (see
    :attr:`LinkLevel.per_kind`). ``latency_per_peer_s`` (optional) adds latency per member
    beyond the first: a group of ``n`` pays ``latency_s + (n − 1) · latency_per_peer_s``
    (gloo's ring steps on oversubscribed CPUs); for ``send_recv`` ``n`` is a rank's number of
    transfers (gloo pays per message)."""

    bw_GBps: float
    latency_s: float
    latency_per_peer_s: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "bw_GBps")
        _non_negative(self, "latency_s", "latency_per_peer_s")


@dataclass(frozen=True, kw_only=True)
class LinkLevel:
    """One level of the interconnect, per GPU: bus bandwidth (nccl-tests' busbw) and latency.

    ``per_kind`` optionally overrides both for one collective kind (a name of
    :data:`COLLECTIVE_KINDS`): ``{"all_reduce": {"bw_GBps": 0.9, "latency_s": 1.4e-3}}``, in TOML
    ``[intra.per_kind.all_reduce]``; a missing field takes the level's value. Backends whose
    collectives differ a lot in fixed cost (gloo's all-reduce vs its all-to-all) need it; kinds
    not named use ``bw_GBps`` / ``latency_s``.
    """

    bw_GBps: float
    latency_s: float
    per_kind: dict[str, CollectiveLink] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _positive(self, "bw_GBps")
        _non_negative(self, "latency_s")
        object.__setattr__(self, "per_kind", _per_kind(self.per_kind, self))

    def for_kind(self, kind: str) -> tuple[float, float]:
        """``(bw_GBps, latency_s)`` of collective ``kind`` on this level."""
        link = self.per_kind.get(kind)
        return (self.bw_GBps, self.latency_s) if link is None else (link.bw_GBps,
                                                                     link.latency_s)

    def latency_per_peer_s(self, kind: str) -> float:
        """Extra latency per group member beyond the first for ``kind`` (0 unless given)."""
        link = self.per_kind.get(kind)
        return 0.0 if link is None else link.latency_per_peer_s


def _per_kind(table: Any, level: LinkLevel) -> dict[str, CollectiveLink]:
    """Validate ``LinkLevel.per_kind``: known kind names; tables filled from the level."""
    if not isinstance(table, dict):
        raise MoesimError(f"LinkLevel.per_kind must be a table of collective kinds, got "
                          f"{table!r}")
    out = {}
    for kind, value in table.items():
        if kind not in COLLECTIVE_KINDS:
            raise MoesimError(f"LinkLevel.per_kind: unknown collective kind {kind!r}; choose "
                              f"from {', '.join(COLLECTIVE_KINDS)}")
        if isinstance(value, CollectiveLink):
            out[kind] = value
            continue
        if not isinstance(value, dict) or set(value) - {"bw_GBps", "latency_s",
                                                        "latency_per_peer_s"}:
            raise MoesimError(f"LinkLevel.per_kind.{kind} must be a table with bw_GBps, "
                              f"latency_s and/or latency_per_peer_s, got {value!r}")
        out[kind] = CollectiveLink(bw_GBps=value.get("bw_GBps", level.bw_GBps),
                                   latency_s=value.get("latency_s", level.latency_s),
                                   latency_per_peer_s=value.get("latency_per_peer_s", 0.0))
    return out


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Compute throughput of one GPU (or one CPU rank) and per-op overheads.

    A GEMM of ``m`` tokens against a weight of ``w`` bytes costs
    ``max(w / mem_bw, flops / (peak_flops · eff(m))) + launch_s``; ``eff(m)`` is linear in
    ``log2 m`` between the points of ``gemm_eff_curve`` (``[[m, eff], ...]``, clamped at both
    ends). Small-``m`` GEMMs are memory bound: the weight must be read whatever ``m`` is, so
    ``mem_bw_GBps`` is the *achievable* HBM read bandwidth (the presets give the datasheet figure
    next to it). ``host_optimizer_GBps`` is the CPU Adam throughput over optimizer bytes
    (SwiftMoE keeps optimizer state on the host). ``collective_latency_s`` is NCCL's fixed
    software overhead per collective (launch and protocol set-up), on top of the link latency.
    ``cores_shared_by`` > 1 says several ranks share one socket's cores (CPU executor runs), so
    concurrent compute slows down by that factor. ``backward_gemm_eff_curve`` (optional, same
    form) is ``eff(m)`` of expert backward passes (dgrad + wgrad, ``gemm_passes = 2``) where it
    differs from the forward's (measured on CPU: backward is 2.4–4× a forward, not 2×); empty
    means the forward curve serves both. ``dense_gemm_eff_curve`` (optional) likewise prices
    GEMM-shaped work outside the experts (attention, router: ``Compute`` ops with
    ``gemm_rows``), e.g. the CPU executor's stand-in for attention; empty means the forward
    curve. ``op_overhead_s`` is host time a rank spends per op
    outside the op itself (the CPU executor's interpreter loop between ops, ~10 µs); it is
    added to every op's duration. 0 for GPUs, whose per-kernel cost is ``launch_s``.
    ``context_factors`` (optional, ``{key: factor}``) multiplies the duration of ops by how
    much longer (or shorter) they ran inside a training step than the microbenchmarks that
    fitted the rest of the profile; ``key`` is ``class``, ``class.phase`` or
    ``class.phase.direction`` with ``class`` one of :data:`CONTEXT_CLASSES` (the most specific
    key present wins; see :func:`moesim.costmodel.context_factor`). ``moesim calibrate``
    measures them in a short run of its own calibration workload; empty means 1.
    """

    name: str
    peak_flops: float
    mem_bw_GBps: float
    launch_s: float = 5e-6
    gemm_eff_curve: tuple[tuple[float, float], ...] = ((1.0, 0.01), (128.0, 0.3),
                                                       (2048.0, 0.72), (16384.0, 0.76))
    elementwise_eff: float = 0.8
    host_optimizer_GBps: float = 10.0
    collective_latency_s: float = 10e-6
    cores_shared_by: float = 1.0
    backward_gemm_eff_curve: tuple[tuple[float, float], ...] = ()
    dense_gemm_eff_curve: tuple[tuple[float, float], ...] = ()
    op_overhead_s: float = 0.0
    context_factors: dict[str, float] = field(default_factory=dict, hash=False)
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        _text(self, "name", "description", "source")
        object.__setattr__(self, "context_factors", _context_factors(self.context_factors))
        _positive(self, "peak_flops", "mem_bw_GBps", "host_optimizer_GBps", "elementwise_eff",
                  "cores_shared_by")
        _non_negative(self, "launch_s", "collective_latency_s", "op_overhead_s")
        if self.elementwise_eff > 1:
            raise MoesimError(f"HardwareProfile.elementwise_eff must be in (0, 1], got "
                              f"{self.elementwise_eff!r}")
        object.__setattr__(self, "gemm_eff_curve", _eff_curve(self.gemm_eff_curve))
        for name in ("backward_gemm_eff_curve", "dense_gemm_eff_curve"):
            curve = getattr(self, name)
            object.__setattr__(self, name, _eff_curve(curve) if len(curve) else ())

    def gemm_efficiency(self, m: np.ndarray | float) -> np.ndarray:
        """Fraction of peak FLOP/s a GEMM with ``m`` rows reaches (vectorised)."""
        ms = np.log2(np.array([p[0] for p in self.gemm_eff_curve]))
        es = np.array([p[1] for p in self.gemm_eff_curve])
        return np.interp(np.log2(np.maximum(np.asarray(m, dtype=float), 1.0)), ms, es)

    def gemm_time_s(self, m: np.ndarray | float, n: int, k: int,
                    bytes_per_element: float = 2.0) -> np.ndarray:
        """Seconds for an ``[m, k] @ [k, n]`` GEMM by the class docstring's formula (vectorised
        over ``m``): the weight read or the FLOPs at ``eff(m)``, whichever is longer, + launch."""
        m = np.asarray(m, dtype=float)
        read_s = n * k * bytes_per_element / (self.mem_bw_GBps * 1e9)
        flops_s = 2.0 * m * n * k / (self.peak_flops * self.gemm_efficiency(m))
        return np.maximum(read_s, flops_s) + self.launch_s


def _context_factors(table: Any) -> dict[str, float]:
    """Validate ``HardwareProfile.context_factors``: keys ``class[.phase[.direction]]``,
    factors positive and finite."""
    from moesim.ops import DIRECTIONS, PHASES

    if not isinstance(table, dict):
        raise MoesimError(f"HardwareProfile.context_factors must be a table of factors, got "
                          f"{table!r}")
    out = {}
    for key, value in table.items():
        parts = str(key).split(".")
        if (len(parts) > 3 or parts[0] not in CONTEXT_CLASSES
                or (len(parts) > 1 and parts[1] not in PHASES)
                or (len(parts) > 2 and parts[2] not in DIRECTIONS)):
            raise MoesimError(
                f"HardwareProfile.context_factors: bad key {key!r}; use class[.phase"
                f"[.direction]] with class in {', '.join(CONTEXT_CLASSES)}, phase in "
                f"{', '.join(PHASES)} and direction in {', '.join(DIRECTIONS)}")
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not (math.isfinite(value) and value > 0)):
            raise MoesimError(f"HardwareProfile.context_factors.{key} must be a positive "
                              f"number, got {value!r}")
        out[str(key)] = float(value)
    return out


def _eff_curve(points: Any) -> tuple[tuple[float, float], ...]:
    """Validate ``gemm_eff_curve``: ``[[m, eff], ...]``, m > 0 increasing, 0 < eff <= 1."""
    bad = MoesimError("HardwareProfile.gemm_eff_curve needs a list of [m, eff] pairs with m > 0 "
                      f"strictly increasing and 0 < eff <= 1, got {points!r}")
    try:
        curve = tuple((float(m), float(e)) for m, e in points)
    except (TypeError, ValueError):
        raise bad from None
    if not curve or any(not (math.isfinite(m) and m > 0 and 0 < e <= 1) for m, e in curve):
        raise bad
    if any(b[0] <= a[0] for a, b in zip(curve[:-1], curve[1:], strict=True)):
        raise bad
    return curve


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs in ``num_nodes × gpus_per_node``; intra-node, inter-node (per-GPU NIC) and host links.

    Rank ``r`` lives on node ``r // gpus_per_node``. ``inter.bw_GBps`` is what one GPU's NIC
    moves (e.g. 400G InfiniBand ≈ 46–49 GB/s measured by nccl-tests); where several GPUs share
    one NIC it is their share of it. ``host`` is one GPU's host link (PCIe), per direction.
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    intra: LinkLevel
    inter: LinkLevel
    host: LinkLevel
    gpu_memory_GiB: float
    host_memory_GiB: float = 1024.0
    hardware: HardwareProfile
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        _text(self, "name", "description", "source")
        _positive(self, "num_nodes", "gpus_per_node", "gpu_memory_GiB", "host_memory_GiB")
        _integral(self, "num_nodes", "gpus_per_node")
        for level in ("intra", "inter", "host"):
            if not isinstance(getattr(self, level), LinkLevel):
                raise MoesimError(f"Cluster.{level} must be a table with bw_GBps and latency_s, "
                                  f"got {getattr(self, level)!r}")
        if not isinstance(self.hardware, HardwareProfile):
            raise MoesimError("Cluster.hardware must name a hardware preset, a path to one, or "
                              f"be a table; got {self.hardware!r}")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, ranks: np.ndarray | int) -> np.ndarray:
        return np.asarray(ranks) // self.gpus_per_node

    @property
    def gpu_memory_bytes(self) -> float:
        return self.gpu_memory_GiB * 2**30

    def replace(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)

    def with_shape(self, num_nodes: int, gpus_per_node: int | None = None) -> Cluster:
        """The same hardware with another node count (for scaling curves), named
        ``BASE@NODESxGPUS`` — a name :func:`load_cluster` reads back."""
        gpn = self.gpus_per_node if gpus_per_node is None else gpus_per_node
        base, _ = split_cluster_shape(self.name)
        return dataclasses.replace(self, name=f"{base}@{num_nodes}x{gpn}",
                                   num_nodes=num_nodes, gpus_per_node=gpn)


# --------------------------------------------------------------------------------------------
# preset files


KINDS = ("models", "clusters", "hardware", "parallel")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise MoesimError(f"unknown preset kind {kind!r}; choose one of {', '.join(KINDS)}")


def preset_path(kind: str, name_or_path: str | Path) -> Path:
    """The file a preset name or a path refers to (``"a100-80g"`` → the built-in TOML file)."""
    _check_kind(kind)
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = PRESET_DIR / kind / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    raise MoesimError(
        f"no {kind} preset or file {str(name_or_path)!r}; "
        f"choose one of {', '.join(list_presets(kind))} or give a path to a .toml/.json file"
    )


def _read_table(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    path = preset_path(kind, name_or_path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MoesimError(f"cannot parse {path}: {str(exc)[:100] or type(exc).__name__}; fix "
                          "the file's syntax") from None
    if not isinstance(data, dict):
        raise MoesimError(f"{path}: expected a table of fields at the top level, "
                          f"got {type(data).__name__}")
    return data, path


def _build(cls: type, data: Any, path: Path, where: str = "") -> Any:
    """``cls(**data)`` with errors that name the file, the table and the field."""
    label = f"{path}: {f'[{where}] ' if where else ''}"
    if not isinstance(data, dict):
        raise MoesimError(f"{label}expected a table of {cls.__name__} fields, got {data!r}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MoesimError(f"{label}unknown {cls.__name__} field(s) {unknown}; "
                          f"known fields are {sorted(names)}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MoesimError(f"{label}missing {cls.__name__} field(s) {missing}; add them")
    try:
        return cls(**data)
    except MoesimError as exc:
        raise MoesimError(f"{label}{exc}") from None
    except (TypeError, ValueError) as exc:
        raise MoesimError(f"{label}{cls.__name__}: {exc}; fix the field's value") from None


def list_presets(kind: str) -> list[str]:
    """Names of the built-in presets of one kind: 'models', 'clusters' or 'hardware'."""
    _check_kind(kind)
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.toml"))


def preset_descriptions(kind: str) -> dict[str, str]:
    """``{name: one-line description}`` of the built-in presets of one kind, sorted by name."""
    out = {}
    for name in list_presets(kind):
        data, _ = _read_table(kind, name)
        out[name] = str(data.get("description", "")).strip()
    return out


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name or a TOML/JSON file."""
    data, path = _read_table("models", name_or_path)
    return model_from_dict(data, path)


def model_from_dict(data: dict[str, Any], source: Path) -> ModelSpec:
    """A :class:`ModelSpec` from a table of its fields (``source`` names it in errors and
    gives the default name), e.g. the ``model`` table of a run's ``config.json``."""
    data = dict(data)
    data.setdefault("name", source.stem)
    return _build(ModelSpec, data, source)


def _hardware_from(data: dict[str, Any], path: Path, default_name: str,
                   where: str = "") -> HardwareProfile:
    data = dict(data)
    data.setdefault("name", default_name)
    return _build(HardwareProfile, data, path, where)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A :class:`HardwareProfile` from a preset name or a TOML/JSON file."""
    data, path = _read_table("hardware", name_or_path)
    return _hardware_from(data, path, path.stem)


def split_cluster_shape(text: str) -> tuple[str, tuple[int, int | None] | None]:
    """``"NAME@NODES"`` → ``("NAME", (NODES, None))``, ``"NAME@NODESxGPUS"`` →
    ``("NAME", (NODES, GPUS))``, ``"NAME"`` → ``("NAME", None)``. The one naming scheme of
    reshaped clusters: what :meth:`Cluster.with_shape` writes, search rows and summaries show,
    and every command's ``--cluster`` takes."""
    base, sep, shape = str(text).rpartition("@")
    if not sep:
        return str(text), None
    nodes, x, gpus = shape.partition("x")
    if not (nodes.isdigit() and (not x or gpus.isdigit())):
        raise MoesimError(f"cluster {text!r}: write NAME@NODES or NAME@NODESxGPUS, e.g. "
                          "a100-4x8-ib800@2 or a100-4x8-ib800@2x8")
    shape_ng = (int(nodes), int(gpus) if x else None)
    if shape_ng[0] < 1 or (shape_ng[1] is not None and shape_ng[1] < 1):
        raise MoesimError(f"cluster {text!r}: nodes and GPUs per node must be >= 1")
    return base, shape_ng


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A :class:`Cluster` from a preset name or a TOML/JSON file, optionally reshaped:
    ``NAME@NODES`` keeps the GPUs per node, ``NAME@NODESxGPUS`` sets both (see
    :func:`split_cluster_shape`; an existing file whose name has an ``@`` is read as it is).

    ``hardware`` is a hardware preset name, a path (relative to the cluster file), or an inline
    table of :class:`HardwareProfile` fields.
    """
    if not Path(name_or_path).is_file() and "@" in str(name_or_path):
        base, shape = split_cluster_shape(str(name_or_path))
        return load_cluster(base).with_shape(*shape)
    data, path = _read_table("clusters", name_or_path)
    return cluster_from_dict(data, path)


def cluster_from_dict(data: dict[str, Any], path: Path) -> Cluster:
    """A :class:`Cluster` from a table of its fields (nested link levels and hardware as in a
    cluster file; ``path`` anchors relative hardware paths and names errors)."""
    data = dict(data)
    data.setdefault("name", path.stem)
    for level in ("intra", "inter", "host"):
        if isinstance(data.get(level), dict):
            data[level] = _build(LinkLevel, data[level], path, level)
    hw = data.get("hardware")
    if isinstance(hw, str):
        hw_path = Path(hw)
        if hw_path.suffix and not hw_path.is_absolute():
            hw_path = path.parent / hw_path
        data["hardware"] = load_hardware(hw_path if hw_path.suffix else hw)
    elif isinstance(hw, dict):
        data["hardware"] = _hardware_from(hw, path, f"{path.stem}-hw", "hardware")
    return _build(Cluster, data, path)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready dict of any of the spec dataclasses (nested ones included); optional
    fields left at their empty default (a link level's ``per_kind``, the hardware's
    ``backward_gemm_eff_curve``, ``dense_gemm_eff_curve``, ``op_overhead_s`` and
    ``context_factors``, the model's optional shape facts) are omitted,
    so a spec without them reads as it did before they existed."""
    return _drop_empty(dataclasses.asdict(spec))


_OPTIONAL_EMPTY = ("per_kind", "backward_gemm_eff_curve", "dense_gemm_eff_curve",
                   "op_overhead_s", "context_factors", *_SHAPE_FIELDS, "tied_embeddings")


def _drop_empty(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_empty(v) for k, v in obj.items()
                if not (k in _OPTIONAL_EMPTY and not v)}
    return obj

