"""The cost model's batched paths (expert GEMMs stacked by shape, block all-to-alls per
batch) give every op of a program exactly what :meth:`CostModel.duration` gives it alone, bit
for bit, on the golden programs (plain, pipeline, TP, ZeRO, recompute, overlap layouts)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from moesim.cost_batch import block_all_to_all_times, expert_gemm_times
from moesim.costmodel import CostModel
from moesim.ops import AllToAll, Compute

from .golden.cases import cases, run_case

CASES = [c for c in cases() if c[0] in (
    "default/static_ep", "default/laer_fsep", "default/static_ep_cf1", "layout/pp=2",
    "layout/tp=2,sp=true", "layout/a2a_overlap=true", "16gpu/pp=4,a2a_overlap",
    "16gpu/static_ep")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_batched_durations_are_each_ops_own(case) -> None:
    seen: list[tuple[CostModel, list, list]] = []
    real = CostModel.durations_batched

    def spy(self, program):
        out = real(self, program)
        seen.append((self, list(program.ops), out[0]))
        return out

    with mock.patch.object(CostModel, "durations_batched", spy):
        run_case(case)
    assert seen
    batched = 0
    for cost, ops, got in seen:
        batched += len(expert_gemm_times(cost, ops)) + len(block_all_to_all_times(cost, ops))
        for op, t in zip(ops, got, strict=True):
            np.testing.assert_array_equal(t, cost.duration(op), err_msg=op.label)
    kinds = {type(op) for _, ops, _ in seen for op in ops}
    assert Compute in kinds and AllToAll in kinds
    assert batched > 0  # the batched paths were taken, not only the per-op fallback
