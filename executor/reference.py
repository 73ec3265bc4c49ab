"""A single-process MoE layer that is obviously correct, for checking the distributed executor.

It sees every rank's tokens at once and computes, per logical expert, the FFN on exactly the
assignments routed to any replica of that expert — one expert's weights, no slots, no
communication — in float64, with autograd for the gradients. The distributed layer must agree on

- ``out[r]`` — rank ``r``'s layer output ``[N_r, H]`` (dropped assignments contribute 0);
- ``grad_x[r]`` — d(loss)/d(x) of rank ``r``'s tokens ``[N_r, H]``;
- ``grad_w[e]`` — d(loss)/d(weights of expert e) ``[expert_numel]``: the sum over all its
  replicas' gradients, which is what the gradient-sync ops must produce;

for ``loss = Σ_r Σ out[r] ⊙ grad_out[r]`` (so the upstream gradient is ``grad_out``).
Token data come from :func:`moesim.executor.replay.layer_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moesim.executor.replay import expert_weights, ffn, layer_inputs
from moesim.ops import LayerRoute
from moesim.specs import ModelSpec


@dataclass
class ReferenceResult:
    """Per-rank outputs and input grads, and per-expert weight grads (float64)."""

    out: list[torch.Tensor]
    grad_x: list[torch.Tensor]
    grad_w: dict[int, torch.Tensor]


def moe_outputs(route: LayerRoute, inputs: list, xs: list[torch.Tensor],
                ws: dict[int, torch.Tensor], model: ModelSpec) -> list[torch.Tensor]:
    """Every source's MoE output ``[N_r, H]`` (float64, differentiable): per logical expert,
    its FFN on exactly the assignments routed to any of its replicas, gate-weighted."""
    phy2log = np.asarray(route.phy2log_P)
    outs = [torch.zeros_like(x) for x in xs]
    for r, inp in enumerate(inputs):
        kept = inp.slot_A >= 0
        logical_A = np.where(kept, phy2log[np.maximum(inp.slot_A, 0)], -1)
        for e in sorted(ws):
            sel = np.flatnonzero(logical_A == e)
            if len(sel) == 0:
                continue
            tok = torch.from_numpy(inp.token_A[sel])
            y = ffn(xs[r][tok], ws[e], model) * inp.gate_A[sel].double()[:, None]
            outs[r] = outs[r].index_add(0, tok, y)
    return outs


def reference_layer(route: LayerRoute, model: ModelSpec, iteration: int, micro_batch: int,
                    layer: int) -> ReferenceResult:
    """Run one layer-pass of every rank in one process; see the module docstring."""
    R = np.asarray(route.kept_RP).shape[0]
    inputs = [layer_inputs(route, r, model, iteration, micro_batch, layer) for r in range(R)]
    xs = [i.x_NH.double().requires_grad_(True) for i in inputs]
    phy2log = np.asarray(route.phy2log_P)
    experts = sorted({int(e) for e in phy2log if e >= 0})
    ws = {e: expert_weights(model, layer, e).double().requires_grad_(True) for e in experts}
    outs = moe_outputs(route, inputs, xs, ws, model)
    loss = sum((o * i.grad_out_NH.double()).sum() for o, i in zip(outs, inputs, strict=True))
    params = xs + [ws[e] for e in experts]
    if not loss.requires_grad:  # nothing kept: every output and gradient is zero
        grads = (None,) * len(params)
    else:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grad_x = [g if g is not None else torch.zeros_like(x)
              for g, x in zip(grads[:R], xs, strict=True)]
    grad_w = {e: (g if g is not None else torch.zeros_like(ws[e]))
              for e, g in zip(experts, grads[R:], strict=True)}
    return ReferenceResult(out=[o.detach() for o in outs], grad_x=grad_x, grad_w=grad_w)
