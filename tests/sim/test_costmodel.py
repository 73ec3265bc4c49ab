"""Cost model formulas against hand computation (toy hardware in conftest)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costmodel import CostModel, bus_factor
from moesim.ops import (
    AllGather,
    AllReduce,
    AllToAll,
    Broadcast,
    Compute,
    HostCompute,
    HostCopy,
    ReduceScatter,
    SendRecv,
)

from .simtoys import EFF, INTER_BW, INTER_LAT, INTRA_BW, INTRA_LAT, LAUNCH, MEM_BW, NCCL_LAT, PEAK


def test_expert_gemm_formula(cluster):
    rows = np.array([[400, 0], [10, 1000], [0, 0], [5, 5]])
    w, f = 32768.0, 32768.0
    op = Compute(phase="expert", kind="expert_ffn", gemm_tokens_RS=rows, gemm_passes=2,
                 flops_R=np.zeros(4), bytes_R=np.zeros(4), weight_bytes=w, flops_per_token=f)
    got = CostModel(cluster).duration(op)

    def slot(m):
        return 0.0 if m == 0 else max(2 * w / MEM_BW, 2 * m * f / (PEAK * EFF)) + LAUNCH
    want = [sum(slot(m) for m in r) for r in rows]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_other_compute_and_cores_shared(cluster):
    op = Compute(phase="dense", flops_R=np.full(4, 1e9), bytes_R=np.full(4, 1e6), gemm_rows=64)
    t = max(1e6 / MEM_BW, 1e9 / (PEAK * EFF)) + LAUNCH
    np.testing.assert_allclose(CostModel(cluster).duration(op), t)
    shared = cluster.replace(hardware=cluster.hardware.__class__(
        **{**cluster.hardware.__dict__, "cores_shared_by": 3.0}))
    np.testing.assert_allclose(CostModel(shared).duration(op), 3 * t)


FACTORS = {AllReduce: lambda n: 2 * (n - 1) / n, AllGather: lambda n: (n - 1) / n,
           ReduceScatter: lambda n: (n - 1) / n, Broadcast: lambda n: 1.0}


@pytest.mark.parametrize("cls", list(FACTORS))
def test_group_collectives_alpha_beta(cluster, cls):
    factor = FACTORS[cls]
    groups = (np.array([0, 1]), np.array([2, 3]))  # each group inside one node
    op = cls(phase="grad_sync", groups=groups, bytes_G=np.array([1e6, 2e6]))
    want = NCCL_LAT + INTRA_LAT + factor(2) * np.array([1e6, 2e6]) / INTRA_BW
    np.testing.assert_allclose(CostModel(cluster).duration(op), want)
    spanning = cls(phase="grad_sync", groups=(np.arange(4),), bytes_G=np.array([1e6]))
    np.testing.assert_allclose(CostModel(cluster).duration(spanning),
                               NCCL_LAT + INTER_LAT + factor(4) * 1e6 / INTER_BW)
    assert np.allclose(bus_factor(op, np.array([4])), factor(4))


def test_single_rank_group_is_free(cluster):
    op = AllReduce(phase="grad_sync", groups=(np.array([3]),), bytes_G=np.array([1e9]))
    assert CostModel(cluster).duration(op)[0] == 0.0


def test_all_to_all_intra_only_uses_nvlink(cluster):
    B = np.zeros((4, 4))
    B[0, 1], B[1, 0], B[2, 3] = 5e5, 2e5, 1e6
    B[0, 0] = 1e12  # self traffic is free
    t = CostModel(cluster).duration(AllToAll(phase="dispatch", bytes_RR=B))[0]
    assert t == pytest.approx(NCCL_LAT + INTRA_LAT + 1e6 / INTRA_BW)


def test_all_to_all_slowest_rank_and_directions(cluster):
    B = np.zeros((4, 4))
    B[0, 2] = 3e5           # inter, rank 0 out / rank 2 in
    B[1, 2] = 4e5           # inter, rank 2 in total 7e5
    B[3, 2] = 1e7           # intra (node 1) → 1e7 / 10 GB/s = 1 ms, vs 7e5 / 1 GB/s = 0.7 ms
    t = CostModel(cluster).duration(AllToAll(phase="dispatch", bytes_RR=B))[0]
    assert t == pytest.approx(NCCL_LAT + INTER_LAT + max(1e7 / INTRA_BW, 7e5 / INTER_BW))


def test_all_to_all_matches_nccl_tests_busbw(cluster):
    """Uniform all-to-all within a node: busbw = algbw · (n−1)/n, as nccl-tests define it."""
    one_node = cluster.replace(num_nodes=1, gpus_per_node=4)
    S = 4e8  # bytes per rank (nccl-tests' size)
    B = np.full((4, 4), S / 4)
    t = CostModel(one_node).duration(AllToAll(phase="dispatch", bytes_RR=B))[0]
    transfer = t - NCCL_LAT - INTRA_LAT
    algbw = S / transfer
    assert algbw * 3 / 4 == pytest.approx(INTRA_BW)


def test_transposed_matrix_costs_the_same(cluster):
    rng = np.random.default_rng(1)
    B = rng.integers(0, 1000, (4, 4)) * 128.0
    cm = CostModel(cluster)
    a = cm.duration(AllToAll(phase="dispatch", bytes_RR=B))
    b = cm.duration(AllToAll(phase="combine", bytes_RR=np.ascontiguousarray(B.T)))
    np.testing.assert_allclose(a, b)


def test_send_recv_per_rank(cluster):
    op = SendRecv(phase="relayout", src_N=np.array([0, 0, 3]), dst_N=np.array([1, 2, 3]),
                  bytes_N=np.array([1e6, 2e6, 5e9]))
    got = CostModel(cluster).duration(op)
    want = [NCCL_LAT + INTER_LAT + max(1e6 / INTRA_BW, 2e6 / INTER_BW),
            NCCL_LAT + INTRA_LAT + 1e6 / INTRA_BW,
            NCCL_LAT + INTER_LAT + 2e6 / INTER_BW, 0.0]  # 3→3 is local: free
    np.testing.assert_allclose(got, want)


def test_host_ops(cluster):
    cm = CostModel(cluster)
    np.testing.assert_allclose(cm.duration(HostCompute(phase="optimizer",
                                                       bytes_R=np.full(4, 5e9))), 1.0)
    np.testing.assert_allclose(cm.duration(HostCopy(phase="optimizer",
                                                    bytes_R=np.full(4, 2e9))), 1.0 + 1e-5)


def test_memoised_durations_equal_direct(model, cluster):
    """The program-level memo (transposed all-to-all buffers, shared compute arrays) changes
    nothing."""
    from moesim.lowering import lower_iteration
    from moesim.policies import make_policy
    from moesim.policies.base import History

    policy = make_policy("static_ep", {"ep_size": 2})
    hist = History(iteration=0, past_TLRE=np.zeros((0, 2, 4, 4), int), passes_per_iteration=2)
    m2 = model.replace(num_layers=2)
    decision = policy.decide(hist, m2, cluster, np.random.default_rng(0))
    counts = np.random.default_rng(2).integers(0, 200, (2, 2, 4, 4))
    prog = lower_iteration(policy, decision, None, counts, m2, cluster)
    cm = CostModel(cluster)
    for op, got in zip(prog.ops, cm.durations(prog), strict=True):
        np.testing.assert_array_equal(got, cm.duration(op))


# -- per-kind collective parameters ------------------------------------------------------------

AR_BW, AR_LAT = 2e9, 3e-4  # an all-reduce much slower to start than the rest (as on gloo)


def _with_kinds(cluster, intra=None, inter=None):
    from moesim.specs import LinkLevel

    def level(old, table):
        return LinkLevel(bw_GBps=old.bw_GBps, latency_s=old.latency_s, per_kind=table or {})
    return cluster.replace(intra=level(cluster.intra, intra), inter=level(cluster.inter, inter))


def _ops():
    groups = (np.array([0, 1]), np.array([2, 3]))
    B = np.zeros((4, 4))
    B[0, 1], B[3, 2] = 5e5, 1e6
    return [AllReduce(phase="grad_sync", groups=groups, bytes_G=np.array([1e6, 2e6])),
            AllGather(phase="optimizer", groups=groups, bytes_G=np.array([1e6, 2e6])),
            Broadcast(phase="relayout", groups=groups, bytes_G=np.array([1e6, 2e6])),
            AllToAll(phase="dispatch", bytes_RR=B),
            SendRecv(phase="relayout", src_N=np.array([0, 2]), dst_N=np.array([1, 3]),
                     bytes_N=np.array([1e6, 1e6]))]


def test_per_kind_override_changes_only_that_kind(cluster):
    custom = _with_kinds(cluster, intra={"all_reduce": {"bw_GBps": AR_BW / 1e9,
                                                        "latency_s": AR_LAT}})
    base, cm = CostModel(cluster), CostModel(custom)
    for op in _ops():
        got = cm.duration(op)
        if isinstance(op, AllReduce):  # nccl-tests' factor 2(n-1)/n still applies
            np.testing.assert_allclose(got, NCCL_LAT + AR_LAT + 1.0 * op.bytes_G / AR_BW)
            assert (got > base.duration(op)).all()
        else:
            np.testing.assert_array_equal(got, base.duration(op))


def test_per_kind_partial_table_keeps_the_level_bandwidth(cluster):
    custom = _with_kinds(cluster, intra={"broadcast": {"latency_s": AR_LAT}})
    op = _ops()[2]
    np.testing.assert_allclose(CostModel(custom).duration(op),
                               NCCL_LAT + AR_LAT + op.bytes_G / INTRA_BW)


def test_per_kind_all_to_all_and_send_recv(cluster):
    custom = _with_kinds(cluster, intra={"all_to_all": {"bw_GBps": 1.0, "latency_s": 1e-3},
                                         "send_recv": {"bw_GBps": 0.5, "latency_s": 2e-3}})
    cm = CostModel(custom)
    a2a, sr = _ops()[3], _ops()[4]
    assert cm.duration(a2a)[0] == pytest.approx(NCCL_LAT + 1e-3 + 1e6 / 1e9)
    np.testing.assert_allclose(cm.duration(sr), NCCL_LAT + 2e-3 + 1e6 / 0.5e9)


def test_per_kind_on_the_inter_level_for_spanning_groups(cluster):
    custom = _with_kinds(cluster, inter={"all_gather": {"bw_GBps": 0.25, "latency_s": 1e-4}})
    span = AllGather(phase="optimizer", groups=(np.arange(4),), bytes_G=np.array([1e6]))
    inside = _ops()[1]
    cm = CostModel(custom)
    np.testing.assert_allclose(cm.duration(span), NCCL_LAT + 1e-4 + 0.75 * 1e6 / 0.25e9)
    np.testing.assert_array_equal(cm.duration(inside), CostModel(cluster).duration(inside))


def test_per_kind_validation_and_round_trip(tmp_path):
    from moesim.errors import MoesimError
    from moesim.specs import LinkLevel, load_cluster, spec_to_dict

    with pytest.raises(MoesimError, match="all_two_all"):
        LinkLevel(bw_GBps=1.0, latency_s=0.0, per_kind={"all_two_all": {"bw_GBps": 1.0}})
    with pytest.raises(MoesimError, match="bw_GBps"):
        LinkLevel(bw_GBps=1.0, latency_s=0.0, per_kind={"reduce": {"bw_GBps": -1.0}})
    path = tmp_path / "c.toml"
    path.write_text('num_nodes = 1\ngpus_per_node = 2\nhardware = "cpu-gloo"\n'
                    'gpu_memory_GiB = 1.0\n[intra]\nbw_GBps = 1.0\nlatency_s = 1e-4\n'
                    '[intra.per_kind.all_reduce]\nlatency_s = 1.4e-3\n'
                    '[inter]\nbw_GBps = 1.0\nlatency_s = 1e-4\n'
                    '[host]\nbw_GBps = 10.0\nlatency_s = 1e-6\n')
    c = load_cluster(path)
    assert c.intra.for_kind("all_reduce") == (1.0, 1.4e-3)
    assert c.intra.for_kind("all_to_all") == (1.0, 1e-4)
    d = spec_to_dict(c)
    assert "per_kind" in d["intra"] and "per_kind" not in d["inter"]


def test_presets_have_no_per_kind_tables():
    from moesim.specs import list_presets, load_cluster, spec_to_dict

    for name in list_presets("clusters"):
        d = spec_to_dict(load_cluster(name))
        assert "per_kind" not in d["intra"]
        assert not {"backward_gemm_eff_curve", "op_overhead_s"} & set(d["hardware"])


def test_backward_curve_applies_to_expert_backward_only(cluster):
    hw = cluster.hardware.__class__(**{**cluster.hardware.__dict__,
                                       "backward_gemm_eff_curve": ((1.0, EFF / 2),)})
    slow = cluster.replace(hardware=hw)
    rows = np.array([[400, 0], [10, 1000], [0, 0], [5, 5]])
    w, f = 32768.0, 32768.0

    def op(passes):
        return Compute(phase="expert", kind="expert_ffn", gemm_tokens_RS=rows,
                       gemm_passes=passes, flops_R=np.zeros(4), bytes_R=np.zeros(4),
                       weight_bytes=w, flops_per_token=f)
    base, cm = CostModel(cluster), CostModel(slow)
    np.testing.assert_array_equal(cm.duration(op(1)), base.duration(op(1)))

    def slot(m):
        return 0.0 if m == 0 else max(2 * w / MEM_BW, 2 * m * f / (PEAK * EFF / 2)) + LAUNCH
    np.testing.assert_allclose(cm.duration(op(2)), [sum(slot(m) for m in r) for r in rows])


def test_op_overhead_is_added_to_every_op(cluster):
    hw = cluster.hardware.__class__(**{**cluster.hardware.__dict__, "op_overhead_s": 1e-5})
    cm, base = CostModel(cluster.replace(hardware=hw)), CostModel(cluster)
    ops = _ops() + [Compute(phase="dense", flops_R=np.full(4, 1e9), bytes_R=np.full(4, 1e6),
                            gemm_rows=64)]
    for op in ops:
        np.testing.assert_allclose(cm.duration(op), base.duration(op) + 1e-5)


def test_per_kind_latency_per_peer_grows_with_group_size(cluster):
    one_node = cluster.replace(num_nodes=1, gpus_per_node=4)
    custom = _with_kinds(one_node, intra={"all_reduce": {"latency_s": 1e-4,
                                                         "latency_per_peer_s": 1e-3}})
    op = AllReduce(phase="grad_sync", groups=(np.array([0, 1]), np.array([0, 1, 2, 3])),
                   bytes_G=np.array([1e6, 1e6]))
    want = NCCL_LAT + 1e-4 + np.array([1, 3]) * 1e-3 + np.array([1.0, 1.5]) * 1e6 / INTRA_BW
    np.testing.assert_allclose(CostModel(custom).duration(op), want)
    base = AllGather(phase="optimizer", groups=(np.arange(4),), bytes_G=np.array([1e6]))
    np.testing.assert_array_equal(CostModel(custom).duration(base),
                                  CostModel(one_node).duration(base))
