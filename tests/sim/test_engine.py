"""Golden tests of the scheduling engine on tiny hand-written programs."""

from __future__ import annotations

import numpy as np

from moesim.engine import EventQueue, schedule
from moesim.ops import AllGather, AllReduce, AllToAll, Compute, SendRecv

Z = np.zeros(2)


def _compute(dur_note: str, **kw) -> Compute:
    return Compute(phase="dense", flops_R=Z, bytes_R=Z, label=dur_note, **kw)


def test_golden_two_rank_program():
    """Expected start/end of every op on each rank, worked out by hand:

    0 compute  r0 0→1, r1 0→3 (rank 1 is late)
    1 all-reduce (comm, waits for 0): starts when both arrived, max(1, 3) = 3 → 5 on both
    2 prefetch all-gather, no deps: overlaps op 0 on the prefetch stream, 0 → 4 on both
    3 compute waits for 1 and 2: max(stream free 1|3, 5, 4) = 5 → 6
    4 compute on rank 0 only: 6 → 8; rank 1 skips it (NaN)
    5 compute waits for 4: r0 8 → 9; r1 waits only for what 4 waited for (nothing): 6 → 7
    6 send/recv 0→1 on comm: both free at 5, so 5 → 5.5 (r0) and 5 → 5.25 (r1)
    7 all-to-all waits for 5: r0 ready 9, r1 ready 7 → both 9 → 10
    """
    ops = [
        _compute("late rank 1"),
        AllReduce(phase="grad_sync", groups=(np.array([0, 1]),), bytes_G=np.ones(1),
                  deps=(0,)),
        AllGather(phase="param_gather", stream="prefetch", groups=(np.array([0, 1]),),
                  bytes_G=np.ones(1)),
        _compute("join", deps=(1, 2)),
        _compute("rank 0 only", ranks=np.array([0])),
        _compute("after skipped", deps=(4,)),
        SendRecv(phase="relayout", src_N=np.array([0]), dst_N=np.array([1]),
                 bytes_N=np.ones(1)),
        AllToAll(phase="dispatch", bytes_RR=np.ones((2, 2)), deps=(5,)),
    ]
    durations = [np.array([1.0, 3.0]), np.array([2.0]), np.array([4.0]), np.array([1.0, 1.0]),
                 np.array([2.0, 99.0]), np.array([1.0, 1.0]), np.array([0.5, 0.25]),
                 np.array([1.0])]
    s = schedule(ops, durations, 2)
    nan = np.nan
    want_start = [[0, 0], [3, 3], [0, 0], [5, 5], [6, nan], [8, 6], [5, 5], [9, 9]]
    want_end = [[1, 3], [5, 5], [4, 4], [6, 6], [8, nan], [9, 7], [5.5, 5.25], [10, 10]]
    np.testing.assert_array_equal(s.start_OR, np.array(want_start, dtype=float))
    np.testing.assert_array_equal(s.end_OR, np.array(want_end, dtype=float))
    assert s.makespan_s == 10.0


def test_disjoint_groups_run_independently():
    op = AllReduce(phase="grad_sync", groups=(np.array([0, 2]), np.array([1, 3])),
                   bytes_G=np.ones(2), deps=(0,))
    first = Compute(phase="dense", flops_R=np.zeros(4), bytes_R=np.zeros(4))
    s = schedule([first, op], [np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0])], 4)
    np.testing.assert_array_equal(s.start_OR[1], [3, 4, 3, 4])
    np.testing.assert_array_equal(s.end_OR[1], [13, 24, 13, 24])


def test_streams_are_fifo_per_rank():
    a = Compute(phase="dense", flops_R=Z, bytes_R=Z)
    b = Compute(phase="dense", flops_R=Z, bytes_R=Z)
    s = schedule([a, b], [np.array([2.0, 1.0]), np.array([1.0, 1.0])], 2)
    np.testing.assert_array_equal(s.start_OR[1], [2, 1])


def test_event_queue_orders_by_time_priority_then_fifo():
    q, seen = EventQueue(), []
    q.schedule(2.0, lambda: seen.append("late"))
    q.schedule(1.0, lambda: seen.append("b"), priority=1)
    q.schedule(1.0, lambda: seen.append("a"), priority=0)
    q.schedule(1.0, lambda: seen.append("c"), priority=1)
    q.schedule(0.5, lambda: q.schedule(0.1, lambda: seen.append("nested")))
    assert q.run(until=1.5) == 1.5
    assert seen == ["nested", "a", "b", "c"]
    assert q.run() == 2.0 and seen[-1] == "late" and len(q) == 0
