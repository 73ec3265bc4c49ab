"""Fixtures of the simulator tests: a tiny hand-checkable model, hardware and cluster
(constants in :mod:`simtoys`)."""

from __future__ import annotations

import pytest

from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec

from .simtoys import EFF, INTER_BW, INTER_LAT, INTRA_BW, INTRA_LAT, LAUNCH, MEM_BW, NCCL_LAT, PEAK


@pytest.fixture
def hardware() -> HardwareProfile:
    return HardwareProfile(name="toy", peak_flops=PEAK, mem_bw_GBps=MEM_BW / 1e9,
                           launch_s=LAUNCH, gemm_eff_curve=((1.0, EFF),), elementwise_eff=EFF,
                           collective_latency_s=NCCL_LAT, host_optimizer_GBps=5.0)


@pytest.fixture
def cluster(hardware: HardwareProfile) -> Cluster:
    return Cluster(name="toy-2x2", num_nodes=2, gpus_per_node=2,
                   intra=LinkLevel(bw_GBps=INTRA_BW / 1e9, latency_s=INTRA_LAT),
                   inter=LinkLevel(bw_GBps=INTER_BW / 1e9, latency_s=INTER_LAT),
                   host=LinkLevel(bw_GBps=2.0, latency_s=1e-5), gpu_memory_GiB=80.0,
                   hardware=hardware)


@pytest.fixture
def model() -> ModelSpec:
    """One MoE layer, 4 experts, top-1, 400 tokens per rank, plain (2-matrix) FFN 64×128."""
    return ModelSpec(name="toy", num_layers=1, hidden_size=64, ffn_hidden_size=128,
                     num_experts=4, top_k=1, gated=False, tokens_per_rank=400, micro_batches=1,
                     dense_flops_per_token=1e6, dense_params_per_layer=1000.0)
