"""Import vLLM expert-parallel load balancer (EPLB) load as a :class:`RoutingTrace`.

Shape legend: ``W`` window passes, ``L`` MoE layers, ``P`` physical expert slots, ``E`` logical
experts.

vLLM's ``EplbModelState`` (``vllm/distributed/eplb/eplb_state.py``) keeps

- ``expert_load_window`` ``[W, L, P]``: a circular buffer of per-pass token assignments to each
  *physical* expert, summed over the EP group; slot ``expert_load_window_step`` is written
  next, so when the buffer has wrapped the oldest pass is there;
- ``physical_to_logical_map`` ``[L, P]``: which logical expert each physical slot holds.

Accepted files:

- a ``torch.save`` dict holding those two tensors (``global_expert_load_window`` is accepted for
  the first) and optionally ``expert_load_window_step``; read with
  ``torch.load(weights_only=True)`` only, and torch is imported only here;
- JSON ``{"load_history": [{"logical_expert_load": [[E] x L]}, ...]}`` (already logical), or JSON
  with the same keys as the ``torch.save`` dict.

Passes are unrolled oldest first; all-zero passes (window slots never written) are dropped and
counted in ``meta.extra["dropped_empty_passes"]``. The counts are totals over ranks, so the trace
has ``R = 1`` (``rank_resolved = False``; ``simulate`` spreads it over the cluster's GPUs).
The map in the file is the *current* one: if the experts were rearranged inside the window, the
passes before that are mapped with the wrong map; dump right after a rearrangement to avoid it.

With vLLM's naive all-to-all every data-parallel rank counts the same tokens, so the recorded
load is ``dp_size`` times the real one (vLLM notes this beside ``expert_load_window``). Pass
``naive_dp_size=dp_size`` to divide it back (every count must then be a multiple of it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace
from moesim.traces.import_common import (
    MAX_JSON_BYTES,
    MAX_TENSOR_FILE_BYTES,
    as_counts,
    check_cells,
    rank_aggregated,
    read_json,
    regular_file,
    short,
    to_numpy,
)

WINDOW_KEYS = ("expert_load_window", "global_expert_load_window")
MAP_KEY = "physical_to_logical_map"
STEP_KEY = "expert_load_window_step"


def import_vllm(path: str | os.PathLike, top_k: int = 2, *, naive_dp_size: int = 1,
                micro_batches: int = 1) -> RoutingTrace:
    """Read a vLLM EPLB dump (module docstring) into a validated rank-aggregated trace."""
    path = Path(path)
    if naive_dp_size < 1:
        raise TraceError(f"--naive-dp-size {naive_dp_size} must be >= 1")
    if path.suffix == ".json":
        data = read_json(path, "vLLM EPLB JSON dump", MAX_JSON_BYTES)
    else:
        data = _torch_load(path)
    if not isinstance(data, dict):
        raise TraceError(f"{path} holds a {type(data).__name__}, not a dict with "
                         f"{WINDOW_KEYS[0]} and {MAP_KEY} (or load_history)")
    if "load_history" in data:
        counts_TLE, extra = _history(data["load_history"], path), {"form": "load_history"}
    else:
        counts_TLE, extra = _window(data, path)
    counts_TLE = _undo_dp(counts_TLE, naive_dp_size, path)
    keep = counts_TLE.sum(axis=(1, 2)) > 0
    if not keep.any():
        raise TraceError(f"{path}: every pass of the window is zero; nothing was recorded "
                         "(dump after some requests were served)")
    if (~keep).any():
        extra["dropped_empty_passes"] = int((~keep).sum())
    extra["naive_dp_size"] = naive_dp_size
    return rank_aggregated(counts_TLE[keep], top_k, f"vLLM EPLB load: {path.name}",
                            extra=extra, micro_batches=micro_batches)


def _torch_load(path: Path):
    regular_file(path, "vLLM EPLB torch.save file", MAX_TENSOR_FILE_BYTES)
    try:
        import torch
    except ImportError:
        raise TraceError("reading a torch.save file needs torch; pip install torch, or dump "
                         "the load as JSON") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or unsafe pickles raise many types
        raise TraceError(f"{path} is not a readable weights-only torch file "
                         f"({type(exc).__name__}: {short(exc, 60)}); it is damaged or holds "
                         "objects moesim will not unpickle") from None


def _history(history, path: Path) -> np.ndarray:
    if not isinstance(history, list) or not history:
        raise TraceError(f"{path}: load_history is empty or not a list of "
                         "{\"logical_expert_load\": [[E] x L]} entries")
    rows = []
    for n, entry in enumerate(history):
        if not isinstance(entry, dict) or "logical_expert_load" not in entry:
            raise TraceError(f"{path}: load_history[{n}] has no logical_expert_load")
        rows.append(to_numpy(entry["logical_expert_load"],
                              f"{path}: load_history[{n}].logical_expert_load"))
    shapes = {r.shape for r in rows}
    if len(shapes) != 1 or rows[0].ndim != 2 or 0 in rows[0].shape:
        raise TraceError(f"{path}: load_history entries have shapes {sorted(shapes)[:3]}; each "
                         "must be the same [layers, experts]")
    check_cells((len(rows), *rows[0].shape, 1), str(path))
    return as_counts(np.stack(rows), f"{path}: load_history")


def _window(data: dict, path: Path) -> tuple[np.ndarray, dict]:
    key = next((k for k in WINDOW_KEYS if k in data), None)
    if key is None or MAP_KEY not in data:
        raise TraceError(f"{path} lacks {WINDOW_KEYS[0]} or {MAP_KEY}; save both from vLLM's "
                         "EplbModelState (or a JSON load_history)")
    window_WLP = as_counts(to_numpy(data[key], f"{path}: {key}"), f"{path}: {key}")
    map_LP = to_numpy(data[MAP_KEY], f"{path}: {MAP_KEY}")
    if window_WLP.ndim != 3 or 0 in window_WLP.shape:
        raise TraceError(f"{path}: {key} has shape {list(window_WLP.shape)}; expected "
                         "[window, layers, physical experts]")
    W, L, P = window_WLP.shape
    if map_LP.shape != (L, P):
        raise TraceError(f"{path}: {MAP_KEY} has shape {list(map_LP.shape)} but the window "
                         f"has [{L}, {P}] layers x physical experts (a window of one rank's "
                         "local experts? save the global window)")
    if map_LP.size and (map_LP.min() < 0 or map_LP.max() >= P
                        or (map_LP != np.rint(map_LP)).any()):
        raise TraceError(f"{path}: {MAP_KEY} must hold logical expert ids in [0, {P})")
    map_LP = map_LP.astype(np.int64)
    E = int(map_LP.max()) + 1
    check_cells((W, L, 1, E), str(path))
    counts_WLE = np.zeros((W, L, E), dtype=np.int64)
    for layer in range(L):
        onehot_PE = np.zeros((P, E), dtype=np.int64)
        onehot_PE[np.arange(P), map_LP[layer]] = 1
        counts_WLE[:, layer] = window_WLP[:, layer] @ onehot_PE
    step = _step(data.get(STEP_KEY), W, path)
    return np.roll(counts_WLE, -step, axis=0), {"form": key, "window_step": step,
                                                 "physical_experts": P}


def _step(value, W: int, path: Path) -> int:
    if value is None:
        return 0
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < W:
        raise TraceError(f"{path}: {STEP_KEY} is {short(value, 20)} but must be a slot in "
                         f"[0, {W})")
    return value


def _undo_dp(counts_TLE: np.ndarray, dp: int, path: Path) -> np.ndarray:
    if dp == 1:
        return counts_TLE
    bad = counts_TLE % dp != 0
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TraceError(f"{path}: count {counts_TLE[where]} at [pass, layer, expert] = {where} "
                         f"is not a multiple of --naive-dp-size {dp}; was the naive all-to-all "
                         "really used with that data-parallel size?")
    return counts_TLE // dp
