"""SGLang ``ExpertDistributionRecorder`` dumps (``stat`` and ``per_pass`` modes, ``torch.save``
files read with ``torch.load(weights_only=True)``) and the ``--init-expert-location`` JSON → a
RoutingTrace. Field layout: ``shared/TRACE_FORMATS.md``; the token-budget rule:
:mod:`moesim.traces.importers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import (
    as_counts,
    few,
    rank_aggregated,
    to_numpy,
    token_budget,
)
from moesim.traces.validate import validate


def import_sglang(path: str | os.PathLike, top_k: int = 2, *, drop_zero_layers: bool = False,
                  micro_batches: int = 1) -> RoutingTrace:
    """Read an SGLang expert-distribution dump (sgl-project/sglang ExpertDistributionRecorder).

    - ``*.json``: the ``--init-expert-location`` file ``{"logical_count": [[E] x L]}`` (or
      ``[T, L, E]``) → one pass per row block.
    - ``*.pt`` ``stat`` mode: ``{"logical_count": int [T, L, E]}`` summed over ranks. SGLang
      keeps passes in a circular buffer, so all-zero passes (unused slots) are dropped and
      counted in ``extra["dropped_empty_passes"]``; a wrapped buffer's order is not recoverable.
    - a directory of ``*.pt`` ``per_pass`` files (one per rank) or one such file:
      ``{"records": [{"forward_pass_id", "rank", "global_physical_count": [L, P]}],
      "last_physical_to_logical_map": [L, P]}`` → per-rank counts (``rank_resolved``).

    ``.pt`` files are read with ``torch.load(weights_only=True)`` only; nothing is unpickled.
    Rank-aggregated results have ``R = 1`` (see :func:`spread_over_ranks`). All-zero layers
    (DeepSeek-V3's 3 dense layers) are kept unless ``drop_zero_layers``; keeping them makes the
    trace ``variable_k`` because their rows sum to zero.
    """
    path = Path(path)
    if path.is_dir():
        dumps = [_torch_load(p) for p in sorted(path.glob("*.pt"))]
        if not dumps:
            raise TraceError(f"{path} holds no *.pt files; pass an SGLang dump file or folder")
        return _sglang_per_pass(dumps, top_k, drop_zero_layers, str(path))
    if path.suffix == ".json":
        counts_TLE = _sglang_json(path)
    else:
        dump = _torch_load(path)
        if isinstance(dump, dict) and "records" in dump:
            return _sglang_per_pass([dump], top_k, drop_zero_layers, str(path))
        counts_TLE = _sglang_stat(dump, path)
    counts_TLE, extra = _drop_empty_passes(as_counts(counts_TLE, str(path)), path)
    if drop_zero_layers:
        counts_TLE, dropped = _drop_zero_layers(counts_TLE, path)
        extra.update(dropped)
    return rank_aggregated(counts_TLE, top_k, f"SGLang expert distribution: {path.name}",
                            extra=extra, micro_batches=micro_batches)


def _torch_load(path: Path):
    try:
        import torch
    except ImportError:
        raise TraceError("reading SGLang .pt dumps needs torch; pip install torch") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for corrupt/unsafe pickles
        raise TraceError(f"{path} is not a readable weights-only torch file "
                         f"({type(exc).__name__}); it is corrupt or holds objects moesim will "
                         "not unpickle") from None


def _sglang_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{path} is not valid JSON ({str(exc)[:80] or type(exc).__name__}); "
                         "re-export it") from None
    if not isinstance(data, dict) or "logical_count" not in data:
        raise TraceError(f"{path} has no \"logical_count\" key; expected SGLang's "
                         "--init-expert-location JSON")
    counts = to_numpy(data["logical_count"], f"{path}: logical_count")
    return _sglang_shape(counts, path)


def _sglang_stat(dump, path: Path) -> np.ndarray:
    if not isinstance(dump, dict) or "logical_count" not in dump:
        raise TraceError(f"{path} has no \"logical_count\"; expected an SGLang stat-mode dump "
                         "(or a per_pass dump with \"records\")")
    return _sglang_shape(to_numpy(dump["logical_count"], f"{path}: logical_count"), path)


def _sglang_shape(counts: np.ndarray, path: Path) -> np.ndarray:
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or 0 in counts.shape:
        raise TraceError(f"{path}: logical_count has shape {counts.shape}; expected "
                         "[layers, experts] or [passes, layers, experts]")
    return counts


def _drop_empty_passes(counts_TLE: np.ndarray, path: Path) -> tuple[np.ndarray, dict]:
    keep = counts_TLE.sum(axis=(1, 2)) > 0
    if not keep.any():
        raise TraceError(f"{path}: every pass is all zero; nothing was recorded (start the "
                         "recorder before sending requests)")
    dropped = int((~keep).sum())
    return counts_TLE[keep], ({"dropped_empty_passes": dropped} if dropped else {})


def _drop_zero_layers(counts_TLE: np.ndarray, path: Path) -> tuple[np.ndarray, dict]:
    keep = counts_TLE.sum(axis=(0, 2)) > 0
    if not keep.any():
        raise TraceError(f"{path}: every layer is all zero; nothing was recorded")
    dropped = [int(i) for i in np.flatnonzero(~keep)]
    return counts_TLE[:, keep], {"dropped_zero_layers": dropped}


def _sglang_per_pass(dumps: list, top_k: int, drop_zero_layers: bool, where: str
                     ) -> RoutingTrace:
    """per_pass records of all ranks → ``[T, L, R, E]`` via each file's physical→logical map.

    Records of one (pass, rank) with different ``gatherer_key`` (two-batch overlap halves) are
    summed; the same key twice is an error.
    """
    cells: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    seen: set[tuple[int, int, str]] = set()
    num_experts = 0
    for dump in dumps:
        if not isinstance(dump, dict) or "records" not in dump:
            raise TraceError(f"{where}: a .pt file lacks \"records\"; mix no stat and per_pass "
                             "dumps in one folder")
        phy2log_LP = _phy2log(dump, where)
        num_experts = max(num_experts, int(phy2log_LP.max()) + 1)
        for record in dump["records"] if isinstance(dump["records"], list) else [None]:
            key, phys_LP = _sglang_record(record, phy2log_LP.shape, where)
            gatherer = (*key, str(record.get("gatherer_key", "")))
            if gatherer in seen:
                raise TraceError(f"{where}: pass {key[0]} rank {key[1]} appears twice; "
                                 "remove the duplicate dump")
            seen.add(gatherer)
            cells.setdefault(key, []).append((phys_LP, phy2log_LP))
    if not cells:
        raise TraceError(f"{where}: the dump holds no records; record some passes first")
    return _assemble_per_pass(cells, num_experts, top_k, drop_zero_layers, where)


def _phy2log(dump: dict, where: str) -> np.ndarray:
    phy2log_LP = to_numpy(dump.get("last_physical_to_logical_map", []),
                           f"{where}: last_physical_to_logical_map")
    if (phy2log_LP.ndim != 2 or phy2log_LP.size == 0 or phy2log_LP.min() < 0
            or phy2log_LP.max() >= 2**31 or (phy2log_LP != np.rint(phy2log_LP)).any()):
        raise TraceError(f"{where}: last_physical_to_logical_map must be a non-negative integer "
                         "[layers, physical experts] array")
    return phy2log_LP.astype(np.int64)


def _sglang_record(record, shape: tuple[int, int], where: str):
    try:
        if not isinstance(record, dict):
            raise TypeError
        key = (int(record["forward_pass_id"]), int(record["rank"]))
        phys_LP = to_numpy(record["global_physical_count"], f"{where}: global_physical_count")
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"{where}: a record lacks forward_pass_id, rank or "
                         "global_physical_count; expected SGLang per_pass records") from None
    if phys_LP.shape != shape:
        raise TraceError(f"{where}: a record's global_physical_count has shape {phys_LP.shape} "
                         f"but the physical-to-logical map has {shape}")
    return key, as_counts(phys_LP, f"{where}: global_physical_count")


def _assemble_per_pass(cells: dict[tuple[int, int], list], num_experts: int, top_k: int,
                       drop_zero_layers: bool, where: str) -> RoutingTrace:
    passes = sorted({p for p, _ in cells})
    ranks = sorted({r for _, r in cells})
    if ranks != list(range(len(ranks))):
        raise TraceError(f"{where}: ranks {few(ranks)} are not 0..R-1; a rank's dump is missing")
    missing = [k for k in ((p, r) for p in passes for r in ranks) if k not in cells]
    if missing:
        raise TraceError(f"{where}: no record for (pass, rank) {few(missing)}; every rank must "
                         "record every pass")
    L = next(iter(cells.values()))[0][0].shape[0]
    if any(phys.shape[0] != L for parts in cells.values() for phys, _ in parts):
        raise TraceError(f"{where}: dumps disagree on the number of layers; import the dumps "
                         "of one run together")
    counts = np.zeros((len(passes), L, len(ranks), num_experts), dtype=np.int64)
    rows = np.arange(L)[:, None]
    for t, p in enumerate(passes):
        for r in ranks:
            for phys_LP, phy2log_LP in cells[(p, r)]:
                np.add.at(counts[t, :, r], (rows, phy2log_LP), phys_LP)
    extra = {"forward_pass_ids": passes}
    if drop_zero_layers:
        keep = counts.sum(axis=(0, 2, 3)) > 0
        extra["dropped_zero_layers"] = [int(i) for i in np.flatnonzero(~keep)]
        counts = counts[:, keep]
    tokens, variable = token_budget(counts.sum(-1), top_k, True, where)
    meta = TraceMeta(num_layers=counts.shape[1], num_ranks=len(ranks), num_experts=num_experts,
                     top_k=top_k, tokens_per_rank=tokens, variable_k=variable,
                     source=f"SGLang per_pass dump: {where}", extra=extra)
    return validate(RoutingTrace(counts, meta))
