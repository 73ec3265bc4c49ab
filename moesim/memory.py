"""Per-rank memory of a plan: weights, grads, optimizer state, buffers and activations.

Shape legend: ``R`` ranks, ``L`` layers, ``P`` physical slots, ``M`` micro-batches, ``G``
destination ranks.

Static part (``default_footprint``, static EP; policies override ``Policy.memory_footprint``):

- ``weights`` = Σ_l (filled slots on the rank) · params_per_expert · b_w + L · dense · b_w
- ``grads``   = the same with b_g (gradients of every local slot and of the dense part)
- ``optimizer`` (ZeRO-1 / distributed optimizer): each expert's Adam state (b_o per param,
  fp32 master + m + v) is sharded over its replicas, the dense state over all ranks.

Dynamic part (``dynamic_memory``, from the routed tokens of the iteration):

- ``activations`` of the micro-batch in flight (gradient accumulation keeps one), per layer:
  ``15·T·H·(b_act/2)`` for attention + layer norms — Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models" (MLSys 2023), §4.1: attention 11·sbh + 5·as²b and
  layer norms 4·sbh bytes at 2-byte activations, with the ``5·as²b`` score term dropped because
  flash attention does not store it — plus the router's fp32 probabilities ``4·T·E``, plus the
  expert MLP's saved tensors per token a rank computes: ``(H + n·F)·b_act`` (input and the
  ``n`` = 3 gated / 2 plain intermediate tensors; the paper's 19·sbh for a 4h MLP is the same
  accounting). The worst micro-batch counts.
- ``a2a_buffers``: the send buffer (the ``T·k`` permuted token slots Megatron / DeepSpeed
  allocate, less drops) plus the receive buffer of the largest layer-pass dispatch.
"""

from __future__ import annotations

import numpy as np

from moesim.placement import Decision, Placement
from moesim.specs import Cluster, ModelSpec


def slots_filled_R(placement: Placement) -> np.ndarray:
    """Filled slots per rank summed over layers: ``[R]``."""
    filled_LRS = (placement.phy2log_LP >= 0).reshape(placement.num_layers, placement.num_ranks,
                                                       placement.slots_per_rank)
    return filled_LRS.sum(axis=(0, 2))


def expert_optimizer_params_R(placement: Placement, params_per_expert: int) -> np.ndarray:
    """Expert parameters whose optimizer state each rank owns, each expert's state split
    over its replicas (slots): ``[R]``."""
    phy = placement.phy2log_LP
    cnt_LE = np.stack([np.bincount(row[row >= 0], minlength=placement.num_experts)
                       for row in phy])
    share_LP = np.where(phy >= 0, 1.0 / np.maximum(np.take_along_axis(
        cnt_LE, np.maximum(phy, 0), axis=1), 1), 0.0)
    share_R = share_LP.reshape(phy.shape[0], placement.num_ranks, -1).sum(axis=(0, 2))
    return share_R * params_per_expert


def optimizer_params_R(placement: Placement, model: ModelSpec, world: int) -> np.ndarray:
    """Parameters whose optimizer state each rank owns under ZeRO-1: ``[R]`` — each expert's
    state split over its replicas (slots), the dense state over all ranks."""
    return expert_optimizer_params_R(placement, model.params_per_expert) \
        + model.num_layers * model.dense_params / world


def default_footprint(decision: Decision, model: ModelSpec, cluster: Cluster
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Static EP's ``(gpu, host)`` per-rank bytes (see the module docstring); host is empty."""
    placement = decision.placement
    expert_params_R = slots_filled_R(placement) * float(model.params_per_expert)
    dense = model.num_layers * model.dense_params
    gpu = {
        "weights": (expert_params_R + dense) * model.bytes_weight,
        "grads": (expert_params_R + dense) * model.bytes_grad,
        "optimizer": optimizer_params_R(placement, model, cluster.world_size) * model.bytes_optim,
    }
    return gpu, {}


def dynamic_memory(rows_MLP: np.ndarray, dropped_MLR: np.ndarray, model: ModelSpec,
                   placement: Placement) -> dict[str, np.ndarray]:
    """``activations`` and ``a2a_buffers`` per rank, ``[R]`` bytes each (module docstring);
    ``rows_MLP`` are the tokens each slot computes, ``dropped_MLR`` each source's drops."""
    M, L, P = rows_MLP.shape
    R = P // placement.slots_per_rank
    T, H = model.tokens_per_rank, model.hidden_size
    n_mats = 3 if model.gated else 2
    rows_MLR = rows_MLP.reshape(M, L, R, placement.slots_per_rank).sum(axis=3)
    per_token = (H + n_mats * model.ffn_hidden_size) * model.bytes_activation
    fixed = L * (15.0 * T * H * model.bytes_activation / 2 + 4.0 * T * model.num_experts)
    acts_R = fixed + (rows_MLR.sum(axis=1) * per_token).max(axis=0)
    sent_MLR = T * model.top_k - dropped_MLR
    buffers_R = (sent_MLR + rows_MLR).max(axis=(0, 1)) * model.token_bytes
    return {"activations": acts_R.astype(np.float64), "a2a_buffers": buffers_R.astype(float)}


def peak_R(memory_bytes: dict[str, np.ndarray], num_ranks: int) -> np.ndarray:
    """Sum of all components per rank: ``[R]`` bytes."""
    total = np.zeros(num_ranks)
    for arr in memory_bytes.values():
        total = total + np.asarray(arr, dtype=np.float64)
    return total
