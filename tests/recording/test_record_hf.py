"""Recording from Hugging Face MoE models: captured choices equal an independent recomputation.

Tiny models are built from configs (random weights, no downloads). The whole module skips when
transformers is not installed (CI installs only ``.[dev]``; ``pip install -e '.[hf]'`` runs it).
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install "
                                   "'moesim[hf]')")

from moesim.errors import MoesimError  # noqa: E402
from moesim.traces.record_hf import (  # noqa: E402
    build_tiny_model,
    find_routers,
    load_hf_model,
    record_hf,
    tiny_configs,
)
from moesim.traces.record_train import counts_from_topk  # noqa: E402

RANKS, TOKENS, SEQ = 2, 64, 32


def tokens(n_passes: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n_passes * RANKS * TOKENS)


def softmax_choice(x: torch.Tensor, router) -> torch.Tensor:
    """Mixtral / OLMoE / Qwen-MoE: top-k of softmax(x Wᵀ)."""
    logits = x.float() @ router.weight.float().t()
    return torch.topk(torch.softmax(logits, -1), router.top_k, -1).indices


def deepseek_choice(x: torch.Tensor, router) -> torch.Tensor:
    """DeepSeek-V3 (paper §2.1.2): sigmoid scores + bias; keep the top ``topk_group`` groups
    by the sum of each group's two best biased scores; top-k of the rest."""
    s = torch.sigmoid(x.float() @ router.weight.float().t()) + router.e_score_correction_bias
    G = router.num_group
    grouped = s.view(len(s), G, -1)
    best = grouped.topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(best, dtype=torch.bool)
    keep.scatter_(1, best.topk(router.topk_group, -1).indices, True)
    masked = torch.where(keep[:, :, None], grouped, torch.tensor(-np.inf)).view(len(s), -1)
    return masked.topk(router.top_k, -1).indices


def recompute_counts(model, ids: np.ndarray, choose) -> np.ndarray:
    """Counts ``[T, L, R, E]`` from the routers' inputs, with our own choice function."""
    routers, _ = find_routers(model)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0])))
             for _, m in routers]
    per_pass = RANKS * TOKENS
    out = []
    try:
        for t in range(len(ids) // per_pass):
            inputs.clear()
            batch = torch.from_numpy(ids[t * per_pass:(t + 1) * per_pass].reshape(-1, SEQ))
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
            topk = np.stack([choose(x.reshape(-1, x.shape[-1]), mod).numpy()
                             .reshape(RANKS, TOKENS, -1) for mod, x in inputs])
            out.append(counts_from_topk(topk, routers[0][1].weight.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    return np.stack(out)


def available(name: str) -> bool:
    return hasattr(transformers, tiny_configs()[name][0])


# DeepSeek-V3 below; JetMoE's gate (a `.layer` Linear, sorted dispatch) in test_record_hf_inputs
@pytest.mark.parametrize("name", [n for n in tiny_configs()
                                  if n not in ("tiny-deepseek-v3", "tiny-jetmoe")])
def test_softmax_routers_match_recomputation(name):
    if not available(name):
        pytest.skip(f"transformers {transformers.__version__} lacks {tiny_configs()[name][0]}")
    model = build_tiny_model(name)
    ids = tokens()
    trace = record_hf(model, ids, ranks=RANKS, tokens_per_rank=TOKENS, seq_len=SEQ)
    assert trace.counts_TLRE.shape == (2, 2, RANKS, 8)
    assert (trace.counts_TLRE.sum(-1) == TOKENS * 2).all()
    assert np.array_equal(trace.counts_TLRE, recompute_counts(model, ids, softmax_choice))
    assert trace.meta.extra["choices"] == "captured"


def test_deepseek_v3_captures_biased_group_limited_choices():
    if not available("tiny-deepseek-v3"):
        pytest.skip("no DeepseekV3Config in this transformers")
    model = build_tiny_model("tiny-deepseek-v3")
    routers, how = find_routers(model)
    assert len(routers) == 2  # first_k_dense_replace=1 of 3 layers
    gen = torch.Generator().manual_seed(0)
    for _, r in routers:
        r.e_score_correction_bias.copy_(torch.rand(8, generator=gen) * 0.5)
    ids = tokens()
    trace = record_hf(model, ids, ranks=RANKS, tokens_per_rank=TOKENS, seq_len=SEQ)
    assert np.array_equal(trace.counts_TLRE, recompute_counts(model, ids, deepseek_choice))
    # logits alone (softmax top-k) would not reproduce the choices
    assert not np.array_equal(trace.counts_TLRE, recompute_counts(model, ids, softmax_choice))


def test_local_weights_directory_and_config_json(tmp_path):
    model = build_tiny_model("tiny-mixtral", seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded, how = load_hf_model(str(tmp_path / "ckpt"))
    assert how.startswith("weights")
    ids = tokens(1)
    a = record_hf(model, ids, ranks=RANKS, tokens_per_rank=TOKENS, seq_len=SEQ)
    b = record_hf(loaded, ids, ranks=RANKS, tokens_per_rank=TOKENS, seq_len=SEQ)
    assert np.array_equal(a.topk_TLRNK, b.topk_TLRNK)
    from_cfg, how = load_hf_model(str(tmp_path / "ckpt" / "config.json"), seed=1)
    assert "random weights" in how and type(from_cfg).__name__ == "MixtralForCausalLM"


def test_errors_are_one_line_moesim_errors():
    with pytest.raises(MoesimError, match="never downloads"):
        load_hf_model("no-such-org/no-such-model")
    model = build_tiny_model("tiny-olmoe")
    with pytest.raises(MoesimError, match="fill 0 pass"):
        record_hf(model, tokens(1)[:10], ranks=RANKS, tokens_per_rank=TOKENS, seq_len=SEQ)
