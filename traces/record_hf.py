"""Record routing traces from Hugging Face ``transformers`` MoE models (inference passes).

Shape legend: ``T`` passes, ``L`` MoE layers, ``R`` simulated data-parallel ranks, ``N`` tokens
per rank per pass, ``K`` top-k, ``E`` experts, ``H`` hidden size.

How routers are found (module paths differ between models, so we match router *classes*):

1. transformers v5 names the router class in ``model._can_record_outputs["router_logits"]``
   (an ``OutputRecorder`` with ``target_class`` / ``class_name`` / ``layer_name``);
2. otherwise (v4, remote code) every module whose class name contains ``Router``, ``Gate`` or
   ``TopK`` — or an ``nn.Linear`` named ``gate``/``router`` inside a class whose name contains
   ``moe`` — whose weight has ``E`` rows (``E`` from the config) is a router.

What is captured: the router's *chosen* expert ids. In v5 every router returns
``(logits [N, E], weights [N, K], indices [N, K])`` and the indices are taken as they are —
necessary for DeepSeek-V3, whose sigmoid scores, correction bias and group-limited top-k are not
reproduced by a top-k of the logits. Only when a router returns no integer ids (v4 ``nn.Linear``
gates) are the choices recomputed as ``topk(softmax(logits), K)``; the trace then says so in
``meta.extra["choices"] = "recomputed"`` (exact for Mixtral/OLMoE/Qwen-MoE style softmax gates,
wrong for biased or grouped gates).

Each pass feeds ``R · N / S`` sequences of ``S`` tokens in one batch; the router flattens the
batch sequence-major, so rank ``r`` owns rows ``[r·N, (r+1)·N)`` (``N/S`` whole sequences).

transformers is optional (``pip install moesim[hf]``); nothing is ever downloaded: named models
load with ``local_files_only=True`` (local directories or the local HF cache only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moesim.errors import MoesimError
from moesim.traces.format import RoutingTrace, TraceMeta

_ROUTER_NAME = re.compile(r"Router|Gate(?!d)|TopK|Topk")
_ATTENTION_PART = re.compile(r"(^|\.)(self_attention|self_attn|attention|attn)\.")
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoesimError("recording from Hugging Face models needs transformers; "
                          "pip install 'moesim[hf]'") from None
    return transformers


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


# ----------------------------------------------------------------------------- tiny models

def tiny_configs() -> dict[str, tuple[str, dict]]:
    """Built-in tiny random-weight models: name → (config class name, kwargs)."""
    common = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "tiny-mixtral": ("MixtralConfig", dict(common, num_local_experts=8,
                                               num_experts_per_tok=2)),
        "tiny-olmoe": ("OlmoeConfig", dict(common, num_experts=8, num_experts_per_tok=2)),
        "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(common, num_experts=8, num_experts_per_tok=2,
                                                  moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=32)),
        "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(common, num_experts=8, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, head_dim=8)),
        "tiny-jetmoe": ("JetMoeConfig", dict(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_key_value_heads=2, kv_channels=8, max_position_embeddings=256,
            num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)),
        "tiny-deepseek-v3": ("DeepseekV3Config", dict(
            common, num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1,
            moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            v_head_dim=8, qk_nope_head_dim=8)),
    }


def build_tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised causal LM of a built-in config (offline, CPU)."""
    tf = _transformers()
    if name not in tiny_configs():
        raise MoesimError(f"unknown tiny model {name!r}; choose one of "
                          f"{', '.join(tiny_configs())}")
    cls_name, kwargs = tiny_configs()[name]
    if not hasattr(tf, cls_name):
        raise MoesimError(f"transformers {tf.__version__} has no {cls_name}; upgrade it")
    config = getattr(tf, cls_name)(**kwargs)
    return _from_config(config, seed)


def _from_config(config, seed: int) -> nn.Module:
    tf = _transformers()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)


def load_hf_model(spec: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A model from a tiny-model name, a ``config.json``, a local directory or a cached name.

    Returns ``(model, how)``: a ``config.json`` (or a directory holding only one) gives random
    weights from ``seed``; a directory with weights or a name in the local HF cache loads them
    with ``local_files_only=True``.
    """
    tf = _transformers()
    if spec in tiny_configs():
        return build_tiny_model(spec, seed), f"built-in {spec} (random weights, seed {seed})"
    path = Path(spec)
    if path.is_file() or (path.is_dir() and not _has_weights(path)):
        cfg_file = path if path.is_file() else path / "config.json"
        try:
            data = json.loads(cfg_file.read_text())
            config = tf.AutoConfig.for_model(data.pop("model_type"), **data)
        except (OSError, ValueError, KeyError) as exc:
            raise MoesimError(f"cannot build a model from {cfg_file}: {exc}; give a "
                              "config.json with a model_type") from None
        return _from_config(config, seed), f"config {cfg_file} (random weights, seed {seed})"
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MoesimError(f"cannot load {spec!r} from local files ({str(exc).splitlines()[0]}); "
                          "moesim never downloads: pass a local directory, a config.json, or "
                          f"one of {', '.join(tiny_configs())}") from None
    return model, f"weights {spec}"


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


# ----------------------------------------------------------------------------- router discovery

def _config_int(config, keys: Sequence[str]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_routers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The FFN routers in model order, and how they were found (see :func:`router_groups`)."""
    found, _, how = router_groups(model)
    return found, how


def router_groups(model: nn.Module
                  ) -> tuple[list[tuple[str, nn.Module]], list[str], str]:
    """``(FFN routers, names of attention-expert routers left out, how they were found)``.

    Routers inside an attention block (JetMoE's mixture of attention heads routes its
    ``self_attention.experts``) choose attention experts, not the FFN experts a trace layer
    stands for, so they are left out and named in ``meta.extra["routers_excluded"]``.
    """
    spec = getattr(model, "_can_record_outputs", None) or {}
    rec = spec.get("router_logits") if isinstance(spec, dict) else None
    found, how = [], "class-name match"
    if rec is not None:
        found = [(n, m) for n, m in model.named_modules() if _matches_recorder(n, m, rec)]
        how = "_can_record_outputs"
    if not found:
        E = _config_int(model.config, _EXPERT_KEYS)
        found = [(n, m) for n, m in model.named_modules() if _looks_like_router(n, m, model, E)]
        how = "class-name match"
    ffn = [(n, m) for n, m in found if not _ATTENTION_PART.search(n)]
    if not ffn:
        raise MoesimError(f"no MoE router found in {type(model).__name__}; is it an MoE model?")
    return ffn, [n for n, _ in found if _ATTENTION_PART.search(n)], how


def _matches_recorder(name: str, module: nn.Module, rec) -> bool:
    recs = rec if isinstance(rec, (list, tuple)) else [rec]
    for r in recs:
        if isinstance(r, type):
            if isinstance(module, r):
                return True
            continue
        target = getattr(r, "target_class", None)
        cls_name = getattr(r, "class_name", None)
        layer = getattr(r, "layer_name", None)
        ok = (target is not None and isinstance(module, target)) or \
             (cls_name is not None and type(module).__name__.endswith(cls_name))
        if ok and (layer is None or layer in name):
            return True
    return False


def _looks_like_router(name: str, module: nn.Module, model: nn.Module, E: int | None) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or \
            (E is not None and weight.shape[0] != E):
        return False
    if _ROUTER_NAME.search(type(module).__name__):
        return True
    if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in ("gate", "router"):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        return "moe" in type(parent).__name__.lower()
    return False


# ----------------------------------------------------------------------------- capture

@dataclass
class _Capture:
    """Chosen ids per router call; ``recomputed`` when they came from logits."""

    top_k: int
    calls: list
    recomputed: bool = False

    def __call__(self, module: nn.Module, inputs, output) -> None:
        ids = _chosen_ids(output)
        if ids is None:
            ids = _sorted_dispatch_ids(output, self.top_k)
        if ids is None:
            logits = _logits(output)
            if logits is None:
                raise MoesimError(f"router {type(module).__name__} returned neither expert ids "
                                  "nor logits; cannot record it")
            ids = recompute_topk(logits, self.top_k)
            self.recomputed = True
        self.calls.append(ids.detach().reshape(-1, ids.shape[-1]).to(torch.int32).cpu())


def _tensors(output) -> list[torch.Tensor]:
    items = output if isinstance(output, (tuple, list)) else [output]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _chosen_ids(output) -> torch.Tensor | None:
    for t in _tensors(output):
        if not t.is_floating_point() and t.dtype != torch.bool and t.ndim >= 2:
            return t
    return None


def _sorted_dispatch_ids(output, top_k: int) -> torch.Tensor | None:
    """Per-token ids ``[N, K]`` from a gate that returns its choices sorted by expert.

    JetMoE's ``JetMoeTopKGating`` returns ``(index_sorted_experts [N·K], batch_index [N·K],
    batch_gates [N·K], expert_size (list of E ints), logits [N, E])``: position ``i`` of the
    expert-sorted order is flat choice ``index_sorted_experts[i]`` (token ``i // K``'s), and the
    sorted order holds ``expert_size[e]`` choices of expert ``e`` in turn.
    """
    items = output if isinstance(output, (tuple, list)) else [output]
    order = next((t for t in items if isinstance(t, torch.Tensor) and t.ndim == 1
                  and not t.is_floating_point() and t.dtype != torch.bool), None)
    sizes = next((x for x in items if isinstance(x, list) and x
                  and all(isinstance(v, int) for v in x)), None)
    if order is None or sizes is None or sum(sizes) != order.numel() or order.numel() % top_k:
        return None
    experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    flat = torch.empty_like(experts)
    flat[order.cpu()] = experts
    return flat.view(-1, top_k)


def _logits(output) -> torch.Tensor | None:
    for t in _tensors(output):
        if t.is_floating_point() and t.ndim >= 2:
            return t
    return None


def recompute_topk(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``topk(softmax(logits), k)`` ids — the softmax gate's choice (not DeepSeek-V3's)."""
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1).indices


# ----------------------------------------------------------------------------- recording

def text_tokens(files: Sequence[str | Path], vocab_size: int, tokenizer=None,
                why_none: str = "no tokenizer") -> tuple[np.ndarray, str]:
    """Token ids of the files' text and how they were made: the tokenizer's, or — without one,
    or when it gives no ids or ids outside the vocabulary — bytes modulo the vocabulary."""
    text = b"".join(Path(f).read_bytes() for f in files)
    why = why_none
    if tokenizer is not None:
        ids = np.asarray(tokenizer(text.decode("utf-8", "replace"))["input_ids"],
                         np.int64).reshape(-1)
        if ids.size and ids.min() >= 0 and ids.max() < vocab_size:
            return ids, f"tokenizer {type(tokenizer).__name__}"
        why = (f"the tokenizer gave {'no ids' if not ids.size else 'ids outside the vocabulary'}"
               f" for {len(text)} bytes")
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64) % vocab_size
    return ids, f"bytes modulo the vocabulary {vocab_size} ({why})"


def record_hf(model: nn.Module, token_ids: np.ndarray, *, ranks: int, tokens_per_rank: int,
              seq_len: int, passes: int | None = None, source: str = "",
              extra: dict | None = None) -> RoutingTrace:
    """Run ``model`` on consecutive chunks of ``token_ids`` and record every router's choices.

    One pass = ``ranks · tokens_per_rank`` tokens as sequences of ``seq_len``; ``passes``
    defaults to as many as the tokens fill (at least one is required).
    """
    check_sizes(ranks, tokens_per_rank, seq_len)
    per_pass = ranks * tokens_per_rank
    avail = len(token_ids) // per_pass
    passes = avail if passes is None else passes
    if passes < 1 or passes > avail:
        raise MoesimError(f"{len(token_ids)} tokens fill {avail} pass(es) of {ranks}×"
                          f"{tokens_per_rank} tokens; need {max(passes, 1)}: give more text, "
                          "fewer --ranks or fewer --tokens")
    routers, excluded, how = router_groups(model)
    k = _config_int(model.config, _TOPK_KEYS) or 1
    captures = [_Capture(k, []) for _ in routers]
    handles = [m.register_forward_hook(c) for (_, m), c in zip(routers, captures, strict=True)]
    model.eval()
    try:
        topk_T = [_one_pass(model, token_ids[t * per_pass:(t + 1) * per_pass], seq_len,
                            captures, ranks) for t in range(passes)]
    finally:
        for h in handles:
            h.remove()
    topk = np.stack(topk_T)
    E = _num_experts(model, routers)
    return _hf_trace(model, topk, E, routers, how, any(c.recomputed for c in captures),
                     source, dict(extra or {}, routers_excluded=excluded))


def check_sizes(ranks: int, tokens_per_rank: int, seq_len: int) -> None:
    """MoesimError unless ranks ≥ 1 and tokens per rank a positive multiple of the sequence
    length (the CLI calls it before loading a model)."""
    if ranks < 1:
        raise MoesimError(f"--ranks {ranks} must be >= 1")
    if min(tokens_per_rank, seq_len) < 1 or tokens_per_rank % seq_len:
        raise MoesimError(f"--tokens {tokens_per_rank} must be a positive multiple of "
                          f"--seq-len {seq_len}; change one of them")


def _one_pass(model: nn.Module, ids: np.ndarray, seq_len: int, captures: list[_Capture],
              ranks: int) -> np.ndarray:
    """One forward; returns ``topk_LRNK`` (int32)."""
    batch = torch.from_numpy(ids.reshape(-1, seq_len).astype(np.int64))
    for c in captures:
        c.calls.clear()
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    out = []
    for i, c in enumerate(captures):
        if len(c.calls) != 1:
            raise MoesimError(f"router {i} ran {len(c.calls)} times in one forward; expected 1")
        out.append(c.calls[0].numpy().reshape(ranks, -1, c.calls[0].shape[-1]))
    return np.stack(out)


def _num_experts(model: nn.Module, routers: list[tuple[str, nn.Module]]) -> int:
    E = _config_int(model.config, _EXPERT_KEYS)
    if E is None:
        E = int(routers[0][1].weight.shape[0])
    return E


def _hf_trace(model: nn.Module, topk_TLRNK: np.ndarray, E: int, routers, how: str,
              recomputed: bool, source: str, extra: dict) -> RoutingTrace:
    from moesim.traces.record_train import counts_from_topk

    counts = np.stack([counts_from_topk(t, E) for t in topk_TLRNK]).astype(np.int64)
    T, L, R, N, K = topk_TLRNK.shape
    cfg = model.config
    meta = TraceMeta(
        num_layers=L, num_ranks=R, num_experts=E, top_k=K, tokens_per_rank=N,
        hidden_size=getattr(cfg, "hidden_size", None),
        ffn_hidden_size=getattr(cfg, "moe_intermediate_size", None)
        or getattr(cfg, "intermediate_size", None),
        model=str(getattr(cfg, "model_type", type(model).__name__)),
        source=source or f"moesim trace record --hf-model ({type(model).__name__})",
        extra=dict(extra, routers=[n for n, _ in routers], router_discovery=how,
                   choices="recomputed" if recomputed else "captured",
                   router_class=type(routers[0][1]).__name__,
                   torch_version=torch.__version__,
                   transformers_version=_transformers_version()),
    )
    return RoutingTrace(counts, meta, topk_TLRNK.astype(np.int32))
