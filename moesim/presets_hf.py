"""A ModelSpec preset from a Hugging Face ``config.json`` (``moesim presets from-hf``).

Reads the field names of Mixtral / PhiMoE (``num_local_experts``, ``intermediate_size`` per
expert), Qwen2-MoE / Qwen3-MoE (``num_experts``, ``moe_intermediate_size``, ``decoder_sparse_step``,
``mlp_only_layers``, Qwen2-MoE's ``shared_expert_intermediate_size``), OLMoE (``num_experts``,
q/k norms) and DeepSeek-V2/V3 (``n_routed_experts``, ``n_shared_experts``,
``first_k_dense_replace``, ``moe_layer_freq``, MLA's ``q_lora_rank`` / ``kv_lora_rank`` /
``qk_nope_head_dim`` / ``qk_rope_head_dim`` / ``v_head_dim``). Every value written carries the
config field(s) it came from in a comment.

What a ``config.json`` cannot say: the training sequence length (``max_position_embeddings`` is
the context limit), tokens per rank and micro-batches, precision. They come from ``seq_len`` /
``tokens_per_rank`` (defaults noted in the file) and ModelSpec's defaults (bf16 weights and
gradients, Adam with fp32 master + m + v).

Counting follows the shipped presets (``moesim presets models deepseek-v3``): the non-routed
part of an MoE layer is attention (+ its biases and norms), the router, shared experts and two
RMSNorms; its forward FLOPs are 2 per weight plus ``2 · heads · (qk_dim + v_dim) · seq`` for
scores and values (no causal halving). Dense-only layers, embeddings, an untied head and the
final norm go to ``other_params``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import MoesimError
from moesim.results import atomic_write_bytes
from moesim.specs import ModelSpec

EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
DEFAULT_SEQ_LEN = 4096
MAX_CONFIG_BYTES = 4 << 20


@dataclass(frozen=True)
class Field:
    """One line of the preset: a value and where it came from."""

    name: str
    value: int | float | bool | str
    source: str


def read_hf_config(path: str | os.PathLike) -> dict:
    """A ``config.json`` (or a directory holding one) as a dict; MoesimError when unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MoesimError(f"no config.json at {path}; pass a Hugging Face config.json or its "
                          "folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise MoesimError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MoesimError(f"{path} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise MoesimError(f"{path} is not a JSON object of config fields")
    return data.get("text_config", data) if "num_hidden_layers" not in data else data


def _int(cfg: dict, *keys: str, default: int | None = None) -> tuple[int, str]:
    """The first of ``keys`` holding a non-negative int, and its name."""
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, key
    if default is not None:
        return default, f"default {default} ({' / '.join(keys)} absent)"
    raise MoesimError(f"config.json has none of {', '.join(keys)}; is it an MoE model's "
                      "config?")


def moe_layer_ids(cfg: dict) -> tuple[list[int], str]:
    """Indices of the layers that have routed experts, and how they were decided."""
    n, _ = _int(cfg, "num_hidden_layers")
    first_dense, _ = _int(cfg, "first_k_dense_replace", default=0)
    freq, _ = _int(cfg, "moe_layer_freq", default=1)
    step, _ = _int(cfg, "decoder_sparse_step", default=1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    ids = [i for i in range(n) if i >= first_dense and i % max(freq, 1) == 0
           and (i + 1) % max(step, 1) == 0 and i not in dense_only]
    rule = (f"num_hidden_layers {n} less first_k_dense_replace {first_dense}"
            + (f", moe_layer_freq {freq}" if freq != 1 else "")
            + (f", decoder_sparse_step {step}" if step != 1 else "")
            + (f", mlp_only_layers {sorted(dense_only)}" if dense_only else ""))
    if not ids:
        raise MoesimError(f"config.json has no MoE layer ({rule}); not an MoE model")
    return ids, rule


def _attention(cfg: dict, H: int, seq: int) -> tuple[int, int, int, str]:
    """``(weights, other params (biases, norms), score FLOPs per token, description)``."""
    heads, _ = _int(cfg, "num_attention_heads")
    if cfg.get("kv_lora_rank"):                         # DeepSeek MLA
        ql, kvl = cfg.get("q_lora_rank") or 0, cfg["kv_lora_rank"]
        nope, rope = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
        v = cfg["v_head_dim"]
        q = H * ql + ql * heads * (nope + rope) if ql else H * heads * (nope + rope)
        weights = q + H * (kvl + rope) + kvl * heads * (nope + v) + heads * v * H
        return (weights, ql + kvl, 2 * heads * (nope + rope + v) * seq,
                f"MLA: {heads} heads, q_lora_rank {ql}, kv_lora_rank {kvl}, qk {nope}+{rope}, "
                f"v {v}")
    kv, _ = _int(cfg, "num_key_value_heads", default=heads)
    hd = cfg.get("head_dim") or H // heads
    weights = 2 * H * heads * hd + 2 * H * kv * hd
    extra = 0
    if cfg.get("model_type") == "qwen2_moe" or cfg.get("attention_bias"):
        extra += heads * hd + 2 * kv * hd                # q, k, v biases
    if cfg.get("model_type") == "qwen3_moe":
        extra += 2 * hd                                  # per-head q_norm, k_norm
    elif cfg.get("model_type") == "olmoe":
        extra += heads * hd + kv * hd                    # q_norm, k_norm over the projections
    return (weights, extra, 4 * heads * hd * seq,
            f"{heads} heads, {kv} KV heads, head_dim {hd}")


def hf_fields(cfg: dict, *, seq_len: int | None = None,
              tokens_per_rank: int | None = None) -> list[Field]:
    """The ModelSpec fields a config gives, each with its source."""
    seq = seq_len or DEFAULT_SEQ_LEN
    seq_src = (f"--seq-len {seq_len}" if seq_len else
               f"not in config.json (max_position_embeddings = "
               f"{cfg.get('max_position_embeddings')} is the context limit); moesim's "
               f"default {DEFAULT_SEQ_LEN}, set --seq-len to the training length")
    return [*_expert_fields(cfg),
            Field("seq_len", seq, seq_src),
            Field("tokens_per_rank", tokens_per_rank or seq,
                  "--tokens-per-rank" if tokens_per_rank else "one sequence per rank per "
                  "micro-batch (assumed); set --tokens-per-rank"),
            *_count_fields(cfg, seq), *_shape_fields(cfg)]


def _expert_fields(cfg: dict) -> list[Field]:
    E, e_key = _int(cfg, *EXPERT_KEYS)
    k, k_key = _int(cfg, *TOPK_KEYS)
    H, _ = _int(cfg, "hidden_size")
    F, f_key = _int(cfg, "moe_intermediate_size", "intermediate_size")
    ids, rule = moe_layer_ids(cfg)
    shared_n, _, shared_text = _shared(cfg, H, F)
    return [
        Field("num_layers", len(ids), f"MoE layers: {rule}"),
        Field("hidden_size", H, "hidden_size"),
        Field("ffn_hidden_size", F, f"{f_key} (one routed expert)"),
        Field("num_experts", E, e_key),
        Field("top_k", k, k_key),
        Field("gated", True, f"SwiGLU experts (gate, up, down); hidden_act = "
              f"{cfg.get('hidden_act', 'silu')}"),
        Field("num_shared_experts", shared_n, shared_text),
    ]


def _count_fields(cfg: dict, seq: int) -> list[Field]:
    """``dense_flops_per_token``, ``dense_params_per_layer`` and ``other_params``."""
    E, _ = _int(cfg, *EXPERT_KEYS)
    H, _ = _int(cfg, "hidden_size")
    F, _ = _int(cfg, "moe_intermediate_size", "intermediate_size")
    attn_w, attn_extra, scores, attn_text = _attention(cfg, H, seq)
    _, shared_w, _ = _shared(cfg, H, F)
    router_w, router_b = E * H, (E if cfg.get("model_type") == "deepseek_v3" else 0)
    dense_w = attn_w + router_w + shared_w
    vocab, tied, dense_layers, dense_ffn, dense_ffn_key = _outside_moe(cfg)
    other = vocab * H * (1 if tied else 2) + H \
        + dense_layers * (attn_w + attn_extra + 2 * H + 3 * H * dense_ffn)
    return [
        Field("dense_flops_per_token", float(2 * dense_w + scores),
              f"2 x (attention {attn_w:,} [{attn_text}] + router {router_w:,} + shared "
              f"{shared_w:,}) + scores/values {scores:,} at seq {seq}"),
        Field("dense_params_per_layer", float(dense_w + attn_extra + router_b + 2 * H),
              f"attention {attn_w:,} + biases/q-k norms {attn_extra:,} + router {router_w:,}"
              f" (+ bias {router_b}) + shared {shared_w:,} + 2 RMSNorms {2 * H:,}"),
        Field("other_params", float(other),
              f"embedding {vocab}x{H}" + (" (head tied)" if tied else " + untied head")
              + f" + final norm + {dense_layers} dense layer(s) x (attention + "
              f"3 x {H} x {dense_ffn} FFN [{dense_ffn_key}] + norms)"),
    ]


def _outside_moe(cfg: dict) -> tuple[int, bool, int, int, str]:
    """``(vocab, tied embeddings, dense-only layers, their FFN width, its field)``."""
    vocab, _ = _int(cfg, "vocab_size")
    n_layers, _ = _int(cfg, "num_hidden_layers")
    dense_ffn, dense_ffn_key = _int(cfg, "intermediate_size", default=0)
    dense_layers = n_layers - len(moe_layer_ids(cfg)[0])
    return vocab, bool(cfg.get("tie_word_embeddings", False)), dense_layers, dense_ffn, \
        dense_ffn_key


def _shape_fields(cfg: dict) -> list[Field]:
    """The attention / vocabulary / dense-layer shape facts (ModelSpec's optional fields)."""
    vocab, tied, dense_layers, dense_ffn, dense_ffn_key = _outside_moe(cfg)
    heads, _ = _int(cfg, "num_attention_heads")
    out = [Field("num_attention_heads", heads, "num_attention_heads")]
    if cfg.get("kv_lora_rank"):
        out += [Field(name, int(cfg.get(name) or 0), name + " (MLA)")
                for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                             "qk_rope_head_dim", "v_head_dim")]
    else:
        kv, kv_key = _int(cfg, "num_key_value_heads", default=heads)
        out.append(Field("num_kv_heads", kv, kv_key))
        if cfg.get("head_dim"):
            out.append(Field("head_dim", int(cfg["head_dim"]), "head_dim"))
    out += [Field("vocab_size", vocab, "vocab_size"),
            Field("tied_embeddings", tied, "tie_word_embeddings"
                  + ("" if "tie_word_embeddings" in cfg else " (absent: false)"))]
    if dense_layers:
        out += [Field("num_dense_layers", dense_layers, "layers without routed experts "
                      "(num_layers' rule above)"),
                Field("dense_ffn_hidden_size", dense_ffn, dense_ffn_key + " (their FFN)")]
    return out


def _shared(cfg: dict, H: int, F: int) -> tuple[int, int, str]:
    """``(num_shared_experts, shared weights per layer, description)``."""
    n = cfg.get("n_shared_experts") or 0
    if n:
        return n, n * 3 * H * F, f"n_shared_experts (each {F} wide, in dense_* below)"
    width = cfg.get("shared_expert_intermediate_size") or 0
    if width:           # Qwen2-MoE: one shared expert of its own width, and a sigmoid gate
        count = width // F if width % F == 0 else 0
        return (count, 3 * H * width + H,
                f"shared_expert_intermediate_size {width} = {count} x {F} (in dense_* below, "
                "with its gate)" if count else f"shared_expert_intermediate_size {width} (not "
                f"a multiple of {F}: counted in dense_* below only)")
    return 0, 0, "no shared expert in config.json"


def preset_toml(fields: list[Field], *, name: str, description: str, source: str) -> str:
    """TOML text: ``name = value  # source`` per field, validated as a ModelSpec first."""
    spec = {f.name: f.value for f in fields}
    try:
        ModelSpec(name=name, description=description, source=source, **spec)
    except MoesimError as exc:
        raise MoesimError(f"the config gives an invalid model: {exc}") from None
    lines = [f"# Written by `moesim presets from-hf` from {source}.",
             "# Each value's config.json field(s) in its comment. Not in config.json and left",
             "# at ModelSpec's defaults: micro_batches 1, bf16 weights/grads/activations,",
             "# Adam fp32 master + m + v (bytes_optim 12).",
             f"description = {json.dumps(description)}", f"source = {json.dumps(source)}", ""]
    for f in fields:
        lines.append(f"# {f.source}")
        lines.append(f"{f.name} = {_toml_value(f.value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def write_preset(config_path: str | os.PathLike, out: str | os.PathLike, *,
                 seq_len: int | None = None, tokens_per_rank: int | None = None) -> Path:
    """Read a config.json, write the ModelSpec TOML to ``out`` atomically; return ``out``."""
    cfg = read_hf_config(config_path)
    out = Path(out)
    fields = hf_fields(cfg, seq_len=seq_len, tokens_per_rank=tokens_per_rank)
    values = {f.name: f.value for f in fields}
    kind = cfg.get("model_type", "unknown")
    description = (f"{kind} from config.json: {values['num_layers']} MoE layers, H "
                   f"{values['hidden_size']}, {values['num_experts']} experts of F "
                   f"{values['ffn_hidden_size']}, top-{values['top_k']}, seq "
                   f"{values['seq_len']}")
    text = preset_toml(fields, name=out.stem, description=description,
                       source=f"Hugging Face config.json {Path(config_path).name} "
                              f"(model_type {kind})")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode("utf-8"))
    return out
