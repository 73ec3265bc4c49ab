"""Import a TensorRT-LLM ``ExpertStatistic`` directory as a :class:`RoutingTrace`.

Shape legend: ``T`` passes (iterations), ``L`` MoE layers, ``R`` ranks, ``E`` experts, ``k``
top-k.

Format (TensorRT-LLM ``tensorrt_llm/_torch/expert_statistic.py``; recording is switched on by
``EXPERT_STATISTIC_ITER_RANGE=start-stop`` and written to ``EXPERT_STATISTIC_PATH``):

- ``meta_info.json`` — ``{"num_experts": E, "num_experts_per_token": k}`` (written by rank 0);
- ``rank{r}.safetensors`` — keys ``"{iter}_{layer}"``, each an int32 ``[E]``: the token
  assignments rank ``r``'s tokens made in that iteration and layer (several calls in one
  iteration, e.g. chunked prefill, are summed);
- optionally ``token_selected_experts_rank{r}.safetensors`` (same keys, ``[tokens, k]`` ids)
  and ``cooccurrence_rank{r}.safetensors`` (``[E, E]``).

Iterations become passes in order (``meta.extra["iterations"]`` lists them; the stride is their
spacing when even, else 1); the layer ids, sorted, become trace layers ``0..L-1``
(``meta.extra["layer_ids"]``). A (iteration, layer) that a rank did not record (no tokens there)
counts zero. Inference batches vary, so the trace is ``variable_k`` unless every row sums to the
same multiple of ``k``. When the per-token files are present, every count is checked against
the ids they hold. With attention tensor parallelism (no attention DP) every rank routes the
same tokens; ``meta.extra["ranks_identical"]`` is then true and the ranks double-count.

Reading needs the optional ``safetensors`` package (``pip install 'moesim[safetensors]'``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import (
    MAX_META_BYTES,
    MAX_TENSOR_FILE_BYTES,
    check_cells,
    few,
    rank_files,
    read_json,
    regular_file,
    short,
    token_budget,
    trace_dir,
    whole_int,
)
from moesim.traces.validate import validate

COUNTS_FILE = re.compile(r"^rank(\d+)\.safetensors$")
KEY = re.compile(r"^(\d{1,12})_(\d{1,9})$")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise TraceError("reading TensorRT-LLM expert statistics needs the safetensors "
                         "package; pip install 'moesim[safetensors]'") from None
    regular_file(path, "safetensors file", MAX_TENSOR_FILE_BYTES)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise TraceError(f"{path} is not a readable safetensors file ({short(exc, 60)}); it is "
                         "truncated or damaged") from None


def import_trtllm(directory: str | os.PathLike) -> RoutingTrace:
    """Read an ``ExpertStatistic`` directory (module docstring) into a validated trace."""
    directory = trace_dir(Path(directory), "meta_info.json and rank*.safetensors")
    E, k = _meta(directory)
    files = rank_files(directory, COUNTS_FILE, "TensorRT-LLM rank{r}.safetensors",
                       MAX_TENSOR_FILE_BYTES)
    per_rank = {r: _rank_counts(_load_safetensors(p), E, p.name) for r, p in files.items()}
    iters = sorted({i for cells in per_rank.values() for i, _ in cells})
    layers = sorted({layer for cells in per_rank.values() for _, layer in cells})
    if not iters:
        raise TraceError(f"{directory}: the rank files hold no counts; was the iteration range "
                         "(EXPERT_STATISTIC_ITER_RANGE) reached?")
    R = len(files)
    check_cells((len(iters), len(layers), R, E), str(directory))
    counts = np.zeros((len(iters), len(layers), R, E), dtype=np.int64)
    it_index = {i: n for n, i in enumerate(iters)}
    layer_index = {layer: n for n, layer in enumerate(layers)}
    for r, cells in per_rank.items():
        for (i, layer), row in cells.items():
            counts[it_index[i], layer_index[layer], r] = row
    checked = _check_token_files(directory, files, per_rank, E, k)
    return _trace(counts, k, iters, layers, directory, checked)


def _meta(directory: Path) -> tuple[int, int]:
    path = directory / "meta_info.json"
    if not path.exists():
        raise TraceError(f"{directory} has no meta_info.json; point at the folder that "
                         "EXPERT_STATISTIC_PATH named (rank 0 writes the file)")
    meta = read_json(path, "TensorRT-LLM meta_info.json", MAX_META_BYTES)
    if not isinstance(meta, dict):
        raise TraceError(f"{path} is not a JSON object with num_experts and "
                         "num_experts_per_token")
    E = whole_int(meta.get("num_experts"), f"{path}: num_experts", 1, 1 << 16)
    k = whole_int(meta.get("num_experts_per_token"), f"{path}: num_experts_per_token", 1, E + 1)
    return E, k


def _rank_counts(tensors: dict[str, np.ndarray], E: int, name: str
                 ) -> dict[tuple[int, int], np.ndarray]:
    """``{(iteration, layer): counts [E]}`` of one rank file, each checked."""
    cells = {}
    for key, value in tensors.items():
        match = KEY.match(key)
        if not match:
            raise TraceError(f"{name}: key {short(key, 40)!r} is not '{{iter}}_{{layer}}'; is "
                             "this an ExpertStatistic file?")
        if value.dtype.kind not in "iu" or value.shape != (E,):
            raise TraceError(f"{name}: {key} is {value.dtype} {list(value.shape)}; expected "
                             f"integer counts [{E}] (num_experts in meta_info.json)")
        if value.size and value.min() < 0:
            raise TraceError(f"{name}: {key} holds a negative count; the file is damaged")
        cells[(int(match[1]), int(match[2]))] = value.astype(np.int64)
    return cells


def _check_token_files(directory: Path, files: dict[int, Path], per_rank: dict, E: int,
                       k: int) -> int:
    """Check counts against ``token_selected_experts_rank{r}`` when present; return how many
    (rank, iteration, layer) cells were checked."""
    checked = 0
    for r in files:
        path = directory / f"token_selected_experts_rank{r}.safetensors"
        if not path.exists():
            continue
        for key, ids in _load_safetensors(path).items():
            match = KEY.match(key)
            if not match or ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[1] != k:
                raise TraceError(f"{path.name}: {short(key, 40)!r} is not an '{{iter}}_{{layer}}'"
                                 f" [tokens, {k}] array of expert ids")
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise TraceError(f"{path.name}: {key} holds an expert id outside [0, {E})")
            want = np.bincount(ids.astype(np.int64).ravel(), minlength=E)
            got = per_rank[r].get((int(match[1]), int(match[2])), np.zeros(E, np.int64))
            if not np.array_equal(want, got):
                raise TraceError(f"rank {r}, {key}: counts in rank{r}.safetensors disagree with "
                                 f"the ids in {path.name}; the files come from different runs")
            checked += 1
    return checked


def _trace(counts: np.ndarray, k: int, iters: list[int], layers: list[int], directory: Path,
           checked: int) -> RoutingTrace:
    tokens, variable = token_budget(counts.sum(-1), k, True, str(directory))
    gaps = set(np.diff(iters).tolist())
    R = counts.shape[2]
    identical = R > 1 and bool((counts == counts[:, :, :1]).all())
    extra = {"iterations": few(iters, 3) if len(iters) > 1000 else iters, "layer_ids": layers,
             "ranks_identical": identical, "cells_checked_against_token_ids": checked}
    meta = TraceMeta(num_layers=len(layers), num_ranks=R, num_experts=counts.shape[3],
                     top_k=k, tokens_per_rank=tokens, variable_k=variable,
                     first_iteration=iters[0],
                     iteration_stride=gaps.pop() if len(gaps) == 1 else 1,
                     source=f"TensorRT-LLM ExpertStatistic: {directory.resolve()}", extra=extra)
    return validate(RoutingTrace(counts, meta))
