"""Fixtures for the analysis tests: synthetic RunResult directories written with RunWriter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moesim.ops import PHASES
from moesim.results import IterationRecord, RunWriter

COMPONENTS = ("activations", "buffers", "grads", "optimizer", "weights")


def _record(it: int, rng: np.random.Generator, L: int, E: int, R: int, speed: float,
            drop: float) -> IterationRecord:
    """One synthetic iteration: skewed expert load, times that grow with the hottest rank."""
    F = len(PHASES)
    load_LE = rng.gamma(1.0, 100.0, size=(L, E)).round().astype(np.int64) + 1
    rank_LR = load_LE.reshape(L, R, E // R).sum(axis=2)
    dropped_LR = (rank_LR * drop * rng.random((L, R))).round().astype(np.int64)
    busy_LFR = rng.random((L + 1, F, R)) * 1e-3 * speed
    busy_LFR[L, :7] = 0.0
    start_LFR = np.full((L + 1, F, R), np.nan)
    end_LFR = np.full((L + 1, F, R), np.nan)
    for layer in range(L):
        for f in range(5):
            start_LFR[layer, f] = (layer * 5 + f) * 1e-3 * speed + rng.random(R) * 1e-4
            end_LFR[layer, f] = start_LFR[layer, f] + busy_LFR[layer, f]
    step = float(np.nanmax(end_LFR)) * (1 + 0.1 * rng.random())
    mem = {c: np.full(R, (k + 1) * 2**30 * speed) + rng.random(R) * 2**28
           for k, c in enumerate(COMPONENTS)}
    summary = {"step_time_s": step, "moe_time_s": step * 0.6, "a2a_time_s": step * 0.3,
               "straggler_ratio": float(rank_LR.max() / rank_LR.mean()),
               "tokens_total": float(load_LE.sum()), "tokens_dropped": float(dropped_LR.sum()),
               "peak_memory_bytes": float(sum(mem.values()).max()), "relayout_bytes": 0.0,
               "planner_time_s": 0.0}
    # GPU-pair bytes in dispatch and combine (own generator: the other draws stay as they were)
    traffic_FRR = np.random.default_rng(1000 + it).random((F, R, R)) * 1e6
    traffic_FRR *= np.isin(np.array(PHASES), ("dispatch", "combine"))[:, None, None]
    traffic_FRR *= 1 - np.eye(R)
    return IterationRecord(it, summary, busy_LFR, start_LFR, end_LFR, load_LE, rank_LR,
                           dropped_LR, mem, traffic_FRR=traffic_FRR)


def write_run(out: Path, policy: str = "static_ep", *, backend: str = "simulator",
              iterations: int = 12, L: int = 3, E: int = 8, R: int = 4, speed: float = 1.0,
              drop: float = 0.05, complete: bool = True, seed: int = 0, timeline: bool = False,
              config: dict | None = None, killed: bool = False) -> Path:
    """A synthetic run directory: complete; ``complete=False``: stopped mid-way and marked
    incomplete; ``killed=True``: SIGKILLed (status running, only ``parts/`` on disk)."""
    rng = np.random.default_rng(seed)
    cfg = config or {"policy": {"name": policy, "knobs": {}}, "model": "tiny",
                     "cluster": {"name": "c", "gpu_memory_GiB": 24.0}, "trace": "t"}
    writer = RunWriter(out, cfg, backend, chunk=4)
    for it in range(iterations):
        rec = _record(it, rng, L, E, R, speed, drop)
        if timeline and it == 1:
            rec.timeline = _chrome_events(rec, R)
        writer.add(rec)
    if killed:
        writer.flush()
    elif complete:
        writer.finish()
    else:
        writer.flush()
        writer.finish(status="incomplete", error="killed")
    return out


def _chrome_events(rec: IterationRecord, R: int) -> list[dict]:
    events = [{"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"rank {r}"}}
              for r in range(R)]
    for (layer, f, r) in zip(*np.nonzero(np.isfinite(rec.start_s_LFR)), strict=True):
        s, e = rec.start_s_LFR[layer, f, r], rec.end_s_LFR[layer, f, r]
        stream = "comm" if PHASES[f] in ("dispatch", "combine") else "compute"
        events.append({"ph": "X", "name": f"{PHASES[f]} L{layer}", "cat": PHASES[f],
                       "pid": int(r), "tid": stream, "ts": float(s) * 1e6,
                       "dur": float(e - s) * 1e6, "args": {"phase": PHASES[f]}})
    return events


@pytest.fixture(autouse=True)
def _small_figures(monkeypatch):
    """Render test figures at a low DPI: the same code paths, less rasterising on 2 cores."""
    from moesim.analysis import figio

    monkeypatch.setattr(figio, "DPI", 72)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> list[Path]:
    """Three complete simulator runs (static_ep, swiftmoe, eplb); shared: do not modify."""
    tmp = tmp_path_factory.mktemp("runs")
    return [write_run(tmp / "static_ep", "static_ep", speed=1.0, timeline=True),
            write_run(tmp / "swiftmoe", "swiftmoe", speed=0.8, seed=1, drop=0.01),
            write_run(tmp / "eplb", "eplb", speed=0.9, seed=2, drop=0.0)]


@pytest.fixture(scope="session")
def incomplete_run(tmp_path_factory) -> Path:
    """A run killed mid-way (manifest status ``incomplete``); shared: do not modify."""
    return write_run(tmp_path_factory.mktemp("killed") / "killed", "swiftmoe", complete=False,
                     seed=3)


@pytest.fixture(scope="session")
def measured_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A simulator run and an executor run of the same config; shared: do not modify."""
    tmp = tmp_path_factory.mktemp("pair")
    cfg = {"policy": {"name": "static_ep", "knobs": {}}, "model": "tiny", "trace": "t"}
    pred = write_run(tmp / "pred", backend="simulator", seed=5, config=cfg)
    meas = write_run(tmp / "meas", backend="executor", seed=6, config=cfg, speed=1.1)
    return pred, meas


@pytest.fixture
def make_run():
    """The synthetic run factory: ``make_run(out_dir, policy, **options) -> Path``."""
    return write_run


def _check_image(path: Path, min_pixels: int = 300 * 200) -> None:
    """A real, non-trivial figure: PNG decodes, is big and not one colour; PDF is a real PDF."""
    import matplotlib.image as mpimg

    path = Path(path)
    data = path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "figure not readable by others"
    if path.suffix == ".pdf":
        assert data.startswith(b"%PDF"), path
        assert len(data) > 5_000, (path, len(data))
        return
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    img = mpimg.imread(path)
    assert img.shape[0] * img.shape[1] >= min_pixels, (path, img.shape)
    assert float(np.var(img[..., :3])) > 1e-3, f"{path} is (nearly) a single colour"
    assert not list(path.parent.glob(f".{path.name}.*")), "temp file left behind"


@pytest.fixture
def check_image():
    """``check_image(path)`` asserts the file is a real, non-trivial PNG or PDF."""
    return _check_image


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
