"""The tiny MoE LM against naive references: capacity, aux loss, expert mixing, determinism."""

import math

import numpy as np
import pytest
import torch

from moesim.errors import MoesimError
from moesim.traces.tinylm import (
    TinyLMConfig,
    build_model,
    capacity_keep,
    expert_ffn,
    load_balancing_loss,
)

SMALL = TinyLMConfig(num_layers=2, d_model=16, num_heads=2, ffn_hidden=24, num_experts=4,
                     top_k=2, seq_len=16)


def naive_keep(topk_NK: np.ndarray, E: int, groups: int, cf: float) -> np.ndarray:
    """Queue each group's assignments choice-major; keep the first ceil(cf·n·K/E) per expert."""
    N, K = topk_NK.shape
    n = N // groups
    cap = math.ceil(cf * n * K / E)
    keep = np.zeros_like(topk_NK, dtype=bool)
    for g in range(groups):
        used = [0] * E
        for k in range(K):
            for i in range(g * n, (g + 1) * n):
                e = topk_NK[i, k]
                keep[i, k] = used[e] < cap
                used[e] += 1
    return keep


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.7])
def test_capacity_matches_naive_queue(cf):
    rng = np.random.default_rng(1)
    topk = np.stack([rng.choice(5, 2, replace=False) for _ in range(24)])
    got = capacity_keep(torch.from_numpy(topk), 5, 3, cf).numpy()
    assert (got == naive_keep(topk, 5, 3, cf)).all()


def test_aux_loss_matches_switch_formula_per_group():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(12, 4), -1)
    topk = torch.topk(probs, 2).indices
    want = []
    for g in range(3):
        p, t = probs[4 * g:4 * g + 4], topk[4 * g:4 * g + 4]
        f = torch.tensor([(t == e).sum().item() / 8 for e in range(4)])
        want.append(4 * float((f * p.mean(0)).sum()))
    assert float(load_balancing_loss(probs, topk, 3)) == pytest.approx(np.mean(want), rel=1e-6)


def test_moe_layer_equals_per_token_reference():
    model = build_model(SMALL, seed=3)
    moe = model.blocks[0].moe
    x = torch.randn(10, SMALL.d_model)
    r = moe.route(x, groups=1)
    y = moe.local_experts(x, r)
    for i in range(10):
        want = sum(r.gates_NK[i, j] * expert_ffn(x[i:i + 1], moe.w1[e], moe.w2[e])[0]
                   for j, e in enumerate(r.topk_NK[i].tolist()))
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = build_model(SMALL, 7), build_model(SMALL, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_forward_returns_one_routing_per_layer():
    model = build_model(SMALL, 0)
    x = torch.randint(0, 256, (4, 16))
    loss, lm, routings = model(x, x, groups=2)
    assert len(routings) == SMALL.num_layers and torch.isfinite(loss)
    assert routings[0].topk_NK.shape == (64, 2)
    with pytest.raises(MoesimError):
        model(x, x, groups=3)


@pytest.mark.parametrize("bad", [dict(top_k=5), dict(d_model=15), dict(capacity_factor=0.0),
                                 dict(aux_loss_coef=-1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(MoesimError):
        TinyLMConfig(num_experts=4, num_heads=2, **bad)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_textbook_update(wd):
    from moesim.traces.tinylm import Adam

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adam([p], lr=0.1, weight_decay=wd)
    ref, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for t in range(1, 4):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
        g = 2 * ref
        ref = ref * (1 - 0.1 * wd)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        ref = ref - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5)
