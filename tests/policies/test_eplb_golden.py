"""moesim's ``eplb`` against DeepSeek's published ``eplb.py``, and the two numerical paths.

``data/eplb_golden.npz`` holds 300 tie-free random inputs and the outputs of deepseek-ai/EPLB's
``rebalance_experts`` (run with torch 2.13 on CPU, outside this repository): integer loads
(exact in float32), 1-3 layers, 4-32 experts, 1-4 nodes × 1-4 GPUs, hierarchical and global
cases, 0-2 redundant slots per GPU, drawn with no two distinct experts ever sharing a per-copy
load. Flat arrays: ``params[N, 7] = (L, E, replicas, groups, nodes, gpus, K)`` and the
concatenated ``weight``, ``phy2log``, ``log2phy``, ``logcnt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.policies.eplb_balancer import pack_row, rebalance_experts, replicate_row
from moesim.policies.stdsort import sort_desc

GOLDEN = Path(__file__).parent / "data" / "eplb_golden.npz"


def _cases():
    d = np.load(GOLDEN)
    offs = np.zeros(4, dtype=np.int64)
    for L, E, R, groups, nodes, gpus, K in d["params"].tolist():
        sizes = (L * E, L * R, L * E * K, L * E)
        parts = [d[name][o:o + n] for name, o, n in
                 zip(("weight", "phy2log", "log2phy", "logcnt"), offs, sizes, strict=True)]
        offs += sizes
        yield ((R, groups, nodes, gpus), parts[0].reshape(L, E), parts[1].reshape(L, R),
               parts[2].reshape(L, E, K), parts[3].reshape(L, E))


def test_golden_cases_match_the_reference_exactly() -> None:
    cases = list(_cases())
    assert len(cases) == 300
    diffs = {"phy2log": 0, "log2phy": 0, "logcnt": 0}
    modes = set()
    for (R, groups, nodes, gpus), w, p2l, l2p, cnt in cases:
        modes.add(groups % nodes == 0 and nodes > 1)
        mine = rebalance_experts(w, R, groups, nodes, gpus)
        for name, got, want in zip(diffs, mine, (p2l, l2p, cnt), strict=True):
            diffs[name] += got.shape != want.shape or bool((got != want).any())
    assert diffs == {"phy2log": 0, "log2phy": 0, "logcnt": 0}
    assert modes == {True, False}                     # both hierarchical and global cases


def test_float64_path_differs_only_where_documented() -> None:
    """Same loads, per-copy balance and replica counts; one-item packs and log2phy order differ."""
    w = np.array([[90.0, 132, 40, 61, 104, 165, 39, 4]])
    a = rebalance_experts(w, 8, 1, 1, 8)                  # one slot per GPU: item i -> pack i
    b = rebalance_experts(w, 8, 1, 1, 8, precision="float64")
    assert a[0].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert b[0].tolist() == [[5, 1, 4, 0, 3, 2, 6, 7]]     # heaviest first
    assert (a[2] == b[2]).all()
    # float32 rounds loads: two loads 1 apart above 2^24 become equal there
    big = np.array([[2.0 ** 25 + 1, 2.0 ** 25, 1.0, 1.0]])
    assert replicate_row(big[0], 5, "float64")[0][-1] == 0
    w32 = big[0].astype(np.float32).astype(np.float64)
    assert w32[0] == w32[1]


def test_one_item_per_pack_keeps_item_order() -> None:
    pack, rank = pack_row(np.array([1.0, 5.0, 3.0]), 3, "float32")
    assert pack.tolist() == [0, 1, 2] and rank.tolist() == [0, 0, 0]
    pack, _ = pack_row(np.array([1.0, 5.0, 3.0]), 3, "float64")
    assert pack.tolist() == [2, 0, 1]


def test_log2phy_lists_replicas_in_creation_order() -> None:
    """Expert 0's copies are made in order 0 (original), 1, 2; slots differ from that order."""
    w = np.array([[100.0, 1.0, 2.0, 3.0]])
    p2l, l2p, cnt = rebalance_experts(w, 8, 1, 1, 2)
    assert cnt[0].tolist() == [5, 1, 1, 1]
    slots = l2p[0, 0][:5]
    assert sorted(slots.tolist()) == np.flatnonzero(p2l[0] == 0).tolist()
    _, l2p64, _ = rebalance_experts(w, 8, 1, 1, 2, precision="float64")
    assert l2p64[0, 0][:5].tolist() == sorted(slots.tolist())


def test_torch_sort_order_on_ties() -> None:
    """libstdc++ introsort order, as torch 2.13's CPU sort gives (checked outside the repo):
    ties are not kept in index order once quicksort partitions (more than 16 elements)."""
    vals = np.array([3.0] * 20 + [5.0] * 3)
    order = sort_desc(vals)
    assert sorted(order[:3].tolist()) == [20, 21, 22]
    assert sorted(order.tolist()) == list(range(23))
    assert order[3:].tolist() != list(range(20))          # not a stable order
    assert sort_desc(np.array([2.0, 1.0, 2.0])).tolist() == [0, 2, 1]


@pytest.mark.parametrize(("args", "needle"), [
    ((6, 2, 2, 3), "split evenly over 2 nodes"),    # the reference asserts num_gpus % nodes
    ((6, 4, 2, 3), "divide the 6 experts"),         # hierarchical: groups must divide E
    ((7, 1, 1, 3), "multiple of 3 GPUs"),
])
def test_inputs_the_reference_rejects_raise(args, needle) -> None:
    with pytest.raises(MoesimError, match=needle):
        rebalance_experts(np.ones((1, 6)), *args)


def test_global_mode_ignores_groups_as_the_reference_does() -> None:
    """E = 6 with 4 groups on 3 nodes: 4 % 3 != 0, so global; the reference runs."""
    p2l, _, cnt = rebalance_experts(np.array([[6.0, 5, 4, 3, 2, 1]]), 6, 4, 3, 3)
    assert (cnt == 1).all() and sorted(p2l[0].tolist()) == list(range(6))
    with pytest.raises(MoesimError, match="hierarchical"):
        rebalance_experts(np.ones((1, 6)), 6, 4, 3, 3, balancing="hierarchical")
    forced = rebalance_experts(np.array([[6.0, 5, 4, 3]]), 8, 2, 2, 4, balancing="global")
    assert (forced[2].sum(1) == 8).all()
