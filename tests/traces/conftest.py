"""Fixtures for the trace tests: tiny hand-made traces and the SmartMoE sample (when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.traces import RoutingTrace
from tests.traces.tracetoys import make_trace

REPO = Path(__file__).resolve().parents[2]
SMARTMOE_DIR = REPO.parent / "shared" / "data" / "smartmoe-trace"


@pytest.fixture
def tiny() -> RoutingTrace:
    return make_trace()


@pytest.fixture
def tiny_topk() -> RoutingTrace:
    return make_trace(with_topk=True)


@pytest.fixture(scope="session")
def smartmoe_dir() -> Path:
    if not (SMARTMOE_DIR / "table_iter1_rank0.log").exists():
        pytest.skip(f"SmartMoE sample not found at {SMARTMOE_DIR} (shared/data is not "
                    "checked out beside the repository)")
    return SMARTMOE_DIR


@pytest.fixture(scope="session")
def smartmoe_trace(smartmoe_dir):
    from moesim.traces import import_smartmoe
    return import_smartmoe(smartmoe_dir)
