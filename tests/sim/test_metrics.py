"""moesim.metrics against hand-worked cases, and its columns in both backends' records."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import metrics
from moesim.ops import AllGather, AllReduce, AllToAll, Broadcast, Compute, Reduce, SendRecv


def test_overload_factor_hand_worked():
    # one micro-batch, two layers, four ranks; layer 0: 6 2 2 2 (mean 3 -> 2.0), layer 1 flat
    t = np.array([[[6, 2, 2, 2], [3, 3, 3, 3]]])
    of = metrics.overload_factor_MLG(t)
    assert of.shape == (1, 2, 1)
    assert of[0, :, 0].tolist() == [2.0, 1.0]
    # two EP groups {0,1} {2,3}: layer 0 -> 6/4 = 1.5 and 2/2 = 1
    of2 = metrics.overload_factor_MLG(t, [np.array([0, 1]), np.array([2, 3])])
    assert of2[0, 0].tolist() == [1.5, 1.0]
    assert of2[0, 1].tolist() == [1.0, 1.0]


def test_overload_factor_empty_group_is_left_out():
    t = np.array([[[0, 0, 4, 0]]])
    of = metrics.overload_factor_MLG(t, [np.array([0, 1]), np.array([2, 3])])
    assert np.isnan(of[0, 0, 0]) and of[0, 0, 1] == 2.0
    cols = metrics.summary_columns(t, np.ones((1, 2)), [], np.zeros((4, 4)), 4,
                                   [np.array([0, 1]), np.array([2, 3])])
    assert cols["overload_mean"] == 2.0 and cols["overload_max"] == 2.0


def test_cumulative_overload_hand_worked():
    # two micro-batches x one layer, two ranks: mb0 puts 3:1, mb1 1:3; forward then backward
    # per micro-batch, so at most one is held: peak on a rank 3, peak balanced 2 -> 1.5
    t = np.array([[[3, 1]], [[1, 3]]])
    order = metrics.pass_order([], 2, 1)
    assert order == [("fwd", 0, 0), ("bwd", 0, 0), ("fwd", 1, 0), ("bwd", 1, 0)]
    assert metrics.cumulative_overload(t, order) == pytest.approx(1.5)
    # both forwards first (a pipeline holding both): rank totals 4:4 -> balanced, 1.0
    both = [("fwd", 0, 0), ("fwd", 1, 0), ("bwd", 1, 0), ("bwd", 0, 0)]
    assert metrics.cumulative_overload(t, both) == pytest.approx(1.0)


def test_pass_order_follows_the_program():
    ops = [Compute(phase="expert", direction=d, layer=l, micro_batch=m,
                   flops_R=np.zeros(2), bytes_R=np.zeros(2))
           for d, m, l in [("fwd", 0, 0), ("fwd", 0, 1), ("bwd", 0, 1), ("bwd", 0, 1),
                           ("bwd", 0, 0)]]
    assert metrics.pass_order(ops, 1, 2) == [("fwd", 0, 0), ("fwd", 0, 1), ("bwd", 0, 1),
                                             ("bwd", 0, 0)]


def test_imbalance_sums_micro_batches_first():
    # mb0 4:0, mb1 0:4 -> per-mb overload 2 each, but the iteration is balanced
    t = np.array([[[4, 0]], [[0, 4]]])
    assert metrics.imbalance(t) == 0.0
    assert metrics.overload_factor_MLG(t).mean() == 2.0
    # 3 ranks totals 6 3 3 -> (6 - 4) / 4 = 0.5
    assert metrics.imbalance(np.array([[[6, 3, 3]]])) == pytest.approx(0.5)


def test_node_imbalance_balanced_nodes_unbalanced_gpus():
    # DeepEP issue 343's case: two nodes of two GPUs, each node holds 8 but as 7:1
    t = np.array([[[7, 1, 1, 7]]])
    node, intra = metrics.node_imbalance(t, 2)
    assert node == 0.0
    assert intra == pytest.approx(0.75)  # (7 - 4) / 4
    node, intra = metrics.node_imbalance(np.array([[[4, 4, 1, 1]]]), 2)
    assert node == pytest.approx(0.6) and intra == 0.0  # nodes 8:2, mean 5


def test_traffic_all_to_all_and_send_recv():
    B = np.array([[5, 1, 2], [3, 7, 0], [0, 4, 9]], dtype=float)
    ops = [AllToAll(phase="dispatch", bytes_RR=B),
           AllToAll(phase="combine", bytes_RR=B.T),
           AllToAll(phase="dispatch", bytes_RR=np.array([[1, 2], [3, 4.0]]),
                    ranks=np.array([0, 2])),
           SendRecv(phase="relayout", src_N=np.array([0, 1, 2]), dst_N=np.array([2, 1, 2]),
                    bytes_N=np.array([10, 99, 99.0]))]
    T = metrics.traffic_FRR(ops, 3)
    P = metrics.PHASE_INDEX
    assert T[P["dispatch"]].tolist() == [[0, 1, 2 + 2], [3, 0, 0], [0 + 3, 4, 0]]
    assert T[P["combine"]].tolist() == [[0, 3, 0], [1, 0, 4], [2, 0, 0]]
    assert T[P["relayout"]].tolist() == [[0, 0, 10], [0, 0, 0], [0, 0, 0]]
    assert T[P["expert"]].sum() == 0


def test_traffic_group_collectives_ring_and_chain():
    groups = (np.array([0, 1, 2, 3]), np.array([4]))
    ar = AllReduce(phase="grad_sync", groups=groups, bytes_G=np.array([8.0, 100.0]))
    ag = AllGather(phase="param_gather", groups=(np.array([1, 3]),), bytes_G=np.array([6.0]))
    bc = Broadcast(phase="param_gather", groups=(np.array([0, 1, 2]),), bytes_G=np.array([5.0]),
                   roots_G=np.array([1]))
    rd = Reduce(phase="grad_sync", groups=(np.array([0, 1, 2]),), bytes_G=np.array([5.0]),
                roots_G=np.array([1]))
    T = metrics.traffic_FRR([ar, ag, bc, rd], 5)
    P = metrics.PHASE_INDEX
    g = T[P["grad_sync"]]
    # ring all-reduce: each member sends 2 (n-1)/n B = 12 to the next; the singleton nothing
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 0)]:
        assert g[a, b] >= 12
    # reduce to root 1 along the chain 1 -> 2 -> 0 reversed: 0 -> 2 -> 1, 5 bytes each
    assert g[0, 2] == 5 and g[2, 1] == 5 and g[1, 2] == 12
    assert g.sum() == 4 * 12 + 10 and g[4].sum() == 0
    p = T[P["param_gather"]]
    assert p[1, 3] == 3 and p[3, 1] == 3  # all-gather (n-1)/n of 6
    assert p[1, 2] == 5 and p[2, 0] == 5 and p[0, 1] == 0  # broadcast chain from root 1


def test_hottest_links_and_link_split():
    T = np.array([[0, 5, 1, 0], [2, 0, 0, 9], [0, 0, 0, 0], [4, 0, 0, 0.0]])
    assert metrics.hottest_links(T, 3) == [(1, 3, 9.0), (0, 1, 5.0), (3, 0, 4.0)]
    assert metrics.hottest_links(np.zeros((2, 2))) == []
    intra, inter = metrics.link_split(T, 2)  # nodes {0,1} {2,3}
    assert (intra, inter) == (7.0, 14.0)


def test_expert_load_stats_hand_worked():
    load = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0]])  # balance 4, 1, 2
    s = metrics.expert_load_stats(load)
    assert s["expert_balance_p50"] == 2.0
    assert s["expert_balance_p95"] == pytest.approx(2 + 0.9 * 2)  # linear interpolation
    assert s["expert_tokens_min"] == 0 and s["expert_tokens_max"] == 4
    assert s["expert_tokens_std"] == pytest.approx((np.sqrt(3) + 0 + 1) / 3)


def test_simulated_run_carries_the_columns_and_traffic(tmp_path):
    from moesim.results import load_run
    from moesim.simulate import simulate
    from moesim.specs import load_cluster, load_model
    from moesim.traces import SynthConfig, synthesize

    trace = synthesize(SynthConfig(num_layers=2, num_ranks=4, num_experts=8, top_k=2,
                                   tokens_per_rank=64, micro_batches_per_iteration=2,
                                   num_iterations=2), rng=0)
    model = load_model("tiny-cpu").replace(num_layers=2, num_experts=8, top_k=2)
    cluster = load_cluster("cpu-gloo-4")
    simulate(trace, model, cluster, "static_ep", out_dir=tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    for col in metrics.COLUMNS:
        assert col in run.summary, col
    T = run["traffic_bytes"]
    assert T.shape == (2, len(metrics.PHASE_INDEX), 4, 4)
    # the dispatch matrix is the off-diagonal token bytes: positive, nothing to self
    d = T[:, metrics.PHASE_INDEX["dispatch"]]
    assert d.sum() > 0 and np.all(np.diagonal(d, axis1=1, axis2=2) == 0)
    # the hottest link column names the pair with the largest total
    tot = T[0].sum(axis=0)
    src, dst = divmod(int(np.argmax(tot)), 4)
    assert (run.summary["hottest_link_src"][0], run.summary["hottest_link_dst"][0]) == (src, dst)
    assert run.summary["overload_max"][0] >= run.summary["overload_mean"][0] >= 1.0
