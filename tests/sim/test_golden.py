"""The simulator reproduces the golden schedules of ``tests/sim/golden`` (captured before the
scale work of issue 16): every op's start and end on every rank, the op list, and the whole
iteration record (summary, per-phase times, load, traffic, memory, timeline), to 1e-12
relative."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest

from .golden.cases import cases, flatten, run_case
from .golden.make_golden import OUT

RTOL = 1e-12


@cache
def _golden() -> dict[str, np.ndarray]:
    with np.load(OUT) as z:
        return {k: z[k] for k in z.files}


def _close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=where)
    else:
        assert got == want, where


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_golden_schedule(case) -> None:
    want = {k: v for k, v in _golden().items() if k.startswith(case[0] + "/")}
    got = flatten(case[0], run_case(case))
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        if w.dtype.kind in "US":
            if key.endswith(("summary", "timeline")):
                _close(json.loads(str(g)), json.loads(str(w)), key)
            else:
                assert str(g) == str(w), key
        else:
            assert g.shape == w.shape, key
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=0, equal_nan=True, err_msg=key)
