"""Router discovery without ``_can_record_outputs`` (transformers v4 / remote code): a plain
``nn.Linear`` gate returning logits only; choices are recomputed and the trace says so."""

import numpy as np
import torch
from torch import nn

from moesim.traces.record_hf import find_routers, record_hf


class Config:
    num_local_experts = 4
    num_experts_per_tok = 2
    hidden_size = 8
    model_type = "fake-moe"


class FakeSparseMoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.shared_expert_gate = nn.Linear(8, 1, bias=False)  # not a router: 1 output

    def forward(self, x):
        logits = self.gate(x.reshape(-1, 8))
        return x + 0.0 * logits.sum() + self.shared_expert_gate(x)


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = Config()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(FakeSparseMoeBlock() for _ in range(2))

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_fallback_finds_linear_gates_and_recomputes():
    torch.manual_seed(0)
    model = FakeModel()
    routers, how = find_routers(model)
    assert [n for n, _ in routers] == ["layers.0.gate", "layers.1.gate"]
    assert how == "class-name match"
    ids = np.random.default_rng(0).integers(0, 16, 2 * 16)
    trace = record_hf(model, ids, ranks=2, tokens_per_rank=16, seq_len=8)
    assert trace.meta.extra["choices"] == "recomputed"
    x = model.embed(torch.from_numpy(ids[:16]))
    want = torch.topk(model.layers[0].gate(x), 2).indices.numpy()
    got = trace.topk_TLRNK[0, 0, 0]
    assert (np.sort(got, 1) == np.sort(want, 1)).all()
