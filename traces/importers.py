"""Importers: routing data written by other tools → a validated :class:`RoutingTrace`.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` logical experts, ``P`` physical
expert slots, ``M`` micro-batches per iteration, ``I`` iterations.

Sources (field layouts summarised in ``shared/TRACE_FORMATS.md``):

- SmartMoE / FastMoE ``table_iter{N}_rank{r}.log`` (thu-pacman/SmartMoE-AE, ``moe_trace/``).
- SGLang ``ExpertDistributionRecorder`` dumps (``stat`` and ``per_pass`` modes, ``torch.save``
  files read with ``torch.load(weights_only=True)``) and the ``--init-expert-location`` JSON.
- DeepSeek EPLB's input ``weight[L, E]`` (deepseek-ai/EPLB) from ``.npy`` or ``.csv``.
- moesim's generic long CSV ``pass,layer,rank,expert,count`` (and :func:`export_csv`).

Token budget: importers see counts only, so ``tokens_per_rank = row sum / top_k`` with ``top_k``
given by the user. When every row sums to the same multiple of ``top_k`` the trace is fixed-k.
Otherwise (inference batches of different sizes, all-zero dense layers, padding) the SGLang,
EPLB and CSV importers mark it ``variable_k`` with ``tokens_per_rank = ceil(max row sum /
top_k)``; the SmartMoE importer, whose training traces have a fixed budget, refuses uneven rows
unless ``allow_uneven=True`` (then ``variable_k`` likewise), because uneven rows there usually
mean a damaged file.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moesim import bounds
from moesim.errors import MoesimError, TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import gaps as missing_values
from moesim.traces.validate import validate

SMARTMOE_NAME = re.compile(r"^table_iter(\d+)_rank(\d+)\.log$", re.ASCII)
CSV_HEADER = ("pass", "layer", "rank", "expert", "count")


# ---------------------------------------------------------------------------------------------
# shared helpers

def _token_budget(sums: np.ndarray, top_k: int, allow_uneven: bool, what: str
                  ) -> tuple[int, bool]:
    """``(tokens_per_rank, variable_k)`` from row sums ``[...]`` of top-k-expanded counts."""
    if top_k < 1:
        raise TraceError(f"top_k = {top_k} must be >= 1; pass the model's --top-k")
    biggest = int(sums.max()) if sums.size else 0
    even = sums.size and bool((sums == biggest).all()) and biggest % top_k == 0 and biggest > 0
    if even:
        return biggest // top_k, False
    if not allow_uneven:
        lo = int(sums.min())
        raise TraceError(f"{what}: rows sum to between {lo} and {biggest} (top_k = {top_k}), "
                         "so tokens x top_k is not fixed; check --top-k, or pass "
                         "--allow-uneven to import as a variable-k trace")
    return max(1, math.ceil(biggest / top_k)), True


def _as_counts(values: np.ndarray, what: str) -> np.ndarray:
    """Float or int array → int64 counts; TraceError on NaN, negative or fractional values."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise TraceError(f"{what} holds {values.dtype} values; expected numeric counts")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise TraceError(f"{what} contains NaN or infinity; the recorder lost data, "
                             "re-record or drop those entries")
        if (values != np.rint(values)).any():
            bad = values[values != np.rint(values)].flat[0]
            raise TraceError(f"{what} contains the non-integer count {float(bad):g}; counts "
                             "must be whole numbers of token assignments")
    if values.size and values.min() < 0:
        raise TraceError(f"{what} contains the negative count {values.min():g}; counts must be "
                         ">= 0")
    if values.size and values.max() >= 2**62:
        raise TraceError(f"{what} contains a count too large to be real ({values.max()}); "
                         "the file is corrupt")
    if values.size and float(np.abs(values).astype(np.float64).sum()) >= 2**62:
        raise TraceError(f"{what}: the counts sum to more than 2**62 token assignments, too "
                         "large to be real (sums would overflow int64); the file is corrupt")
    return values.astype(np.int64)


def _license_from(directory: Path) -> str:
    """The license named by a LICENSE/COPYING file in ``directory`` ("" when none)."""
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
        path = directory / name
        if path.is_file():
            head = path.read_text(errors="replace")[:2000]
            for pattern, spdx in ((r"GNU GENERAL PUBLIC LICENSE\s+Version 3", "GPL-3.0"),
                                  (r"GNU GENERAL PUBLIC LICENSE\s+Version 2", "GPL-2.0"),
                                  (r"Apache License,?\s+Version 2\.0", "Apache-2.0"),
                                  (r"MIT License", "MIT"), (r"BSD", "BSD")):
                if re.search(pattern, head, re.IGNORECASE):
                    return spdx
            return f"see {path}"
    return ""


def _rank_aggregated(counts_TLE: np.ndarray, top_k: int, source: str, license_: str = "",
                     extra: dict | None = None, micro_batches: int = 1) -> RoutingTrace:
    """Totals over ranks ``[T, L, E]`` → a validated trace with ``R = 1``."""
    counts = _as_counts(counts_TLE, source)[:, :, None, :]
    tokens, variable = _token_budget(counts.sum(-1), top_k, True, source)
    if counts.shape[0] % micro_batches:
        raise TraceError(f"{source}: {counts.shape[0]} passes is not a multiple of "
                         f"--micro-batches {micro_batches}; fix --micro-batches")
    meta = TraceMeta(num_layers=counts.shape[1], num_ranks=1, num_experts=counts.shape[3],
                     top_k=top_k, tokens_per_rank=tokens, variable_k=variable,
                     rank_resolved=False, micro_batches_per_iteration=micro_batches,
                     source=source, license=license_, extra=extra or {})
    return validate(RoutingTrace(counts, meta))


# ---------------------------------------------------------------------------------------------
# SmartMoE / FastMoE

def import_smartmoe(directory: str | os.PathLike, top_k: int = 2, *,
                    allow_uneven: bool = False) -> RoutingTrace:
    """Read a SmartMoE/FastMoE directory of ``table_iter{N}_rank{r}.log`` files.

    Each file holds one line per MoE layer, ``layer:[[E floats] x M]``: per micro-batch, the
    token assignments that rank ``r``'s tokens made to each expert (SmartMoE-AE ``moe_trace/``).
    Iterations, ranks, layers, micro-batches and experts are inferred from the files; passes
    are ordered iteration-major, then micro-batch. ``iteration_stride``/``first_iteration``
    come from the file names, ``license`` from a LICENSE file beside them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"{directory} is not a directory; pass the folder holding "
                         "table_iter*_rank*.log files")
    files = _smartmoe_files(directory)
    iterations, ranks = sorted({i for i, _ in files}), sorted({r for _, r in files})
    stride = _smartmoe_stride(iterations)
    _smartmoe_check_complete(files, iterations, ranks)
    counts_TLRE = _smartmoe_counts(files, iterations, ranks)
    _, L, _, E = counts_TLRE.shape
    M = counts_TLRE.shape[0] // len(iterations)
    tokens, variable = _token_budget(counts_TLRE.sum(-1), top_k, allow_uneven, str(directory))
    meta = TraceMeta(num_layers=L, num_ranks=len(ranks), num_experts=E, top_k=top_k,
                     tokens_per_rank=tokens, variable_k=variable, micro_batches_per_iteration=M,
                     iteration_stride=stride, first_iteration=iterations[0],
                     source=f"SmartMoE/FastMoE table logs: {directory.resolve()}",
                     license=_license_from(directory))
    return validate(RoutingTrace(counts_TLRE, meta))


def _smartmoe_counts(files: dict[tuple[int, int], Path], iterations: list[int],
                     ranks: list[int]) -> np.ndarray:
    """Parse every file into ``[T, L, R, E]``, passes ordered iteration-major, micro-batch minor.

    The first file fixes ``[L, M, E]``; every other file must match it.
    """
    ref = files[(iterations[0], ranks[0])]
    first = _parse_smartmoe_file(ref)
    L, M, E = first.shape
    counts = np.empty((len(iterations), M, L, len(ranks), E), dtype=np.int64)
    for i, it in enumerate(iterations):
        for r in ranks:
            table_LME = _parse_smartmoe_file(files[(it, r)]) if (i or r) else first
            if table_LME.shape != (L, M, E):
                raise TraceError(f"{files[(it, r)].name} has shape [layers, micro-batches, "
                                 f"experts] = {list(table_LME.shape)} but {ref.name} has "
                                 f"{[L, M, E]}; all files of one trace must match")
            counts[i, :, :, r, :] = table_LME.transpose(1, 0, 2)
    return counts.reshape(len(iterations) * M, L, len(ranks), E)


def _smartmoe_files(directory: Path) -> dict[tuple[int, int], Path]:
    files: dict[tuple[int, int], Path] = {}
    for path in sorted(directory.iterdir()):
        match = SMARTMOE_NAME.match(path.name)
        if match:
            key = (int(match[1]), int(match[2]))
            if key in files:
                raise TraceError(f"{files[key].name} and {path.name} name the same iteration "
                                 f"{key[0]} and rank {key[1]}; remove one of them")
            files[key] = path
    if not files:
        raise TraceError(f"{directory} holds no table_iter{{N}}_rank{{r}}.log files; "
                         "point at the SmartMoE/FastMoE trace folder")
    return files


def _smartmoe_stride(iterations: list[int]) -> int:
    if len(iterations) == 1:
        return 1
    gaps = np.diff(iterations)
    stride = int(np.gcd.reduce(gaps))
    if (gaps != stride).any():
        missing = missing_values(iterations, iterations[0], stride)
        raise TraceError(f"iterations are not evenly spaced (stride {stride}); missing "
                         f"table_iter{{N}} for N in {_few(missing)}; add them or remove the "
                         "files after the gap")
    return stride


def _smartmoe_check_complete(files: dict, iterations: list[int], ranks: list[int]) -> None:
    if ranks != list(range(len(ranks))):
        holes = missing_values(ranks, 0)
        raise TraceError(f"ranks must be 0..R-1 but no file has rank {_few(holes)}; "
                         "the trace folder is incomplete")
    missing = [f"table_iter{i}_rank{r}.log" for i in iterations for r in ranks
               if (i, r) not in files]
    if missing:
        raise TraceError(f"{len(missing)} file(s) missing, e.g. {_few(missing)}; every "
                         "(iteration, rank) pair needs a file")


def _parse_smartmoe_file(path: Path) -> np.ndarray:
    """One table log → float counts ``[L, M, E]`` converted to int64 (checked)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise TraceError(f"{path.name} is not a text file; the trace folder is corrupt") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TraceError(f"{path.name} is empty; the file was truncated, re-copy it")
    rows = [_parse_smartmoe_line(line, path.name, n) for n, line in enumerate(lines)]
    layers = [layer for layer, _ in rows]
    if layers != list(range(len(rows))):
        raise TraceError(f"{path.name}: layer ids are {_few(layers)} but must be 0..L-1 "
                         "in order; the file is damaged")
    shapes = {table.shape for _, table in rows}
    if len(shapes) != 1:
        raise TraceError(f"{path.name}: layers have different [micro-batches, experts] shapes "
                         f"{sorted(shapes)}; the file is damaged")
    return _as_counts(np.stack([table for _, table in rows]), path.name)


def _parse_smartmoe_line(line: str, name: str, lineno: int) -> tuple[int, np.ndarray]:
    head, sep, body = line.partition(":")
    body = body.strip()
    if not sep or not head.strip().isascii() or not head.strip().isdigit() \
            or not (body.startswith("[[")
                                                     and body.endswith("]]")):
        raise TraceError(f"{name} line {lineno + 1} is not 'layer:[[...], ...]'; the file is "
                         "truncated or not a SmartMoE table log")
    row_texts = re.split(r"\]\s*,\s*\[", body[2:-2])
    try:
        table = [np.array(row.split(","), dtype=np.float64) for row in row_texts]
    except ValueError:
        raise TraceError(f"{name} line {lineno + 1} has a value that is not a number; "
                         "the file is damaged") from None
    lengths = {len(row) for row in table}
    if len(lengths) != 1:
        raise TraceError(f"{name} line {lineno + 1} has ragged rows (lengths "
                         f"{sorted(lengths)}); every micro-batch row needs one value per expert")
    return int(head), np.stack(table)


def _few(items: Iterable, limit: int = 5) -> str:
    items = list(items)
    text = ", ".join(str(x) for x in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# SGLang

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
    counts_TLE, extra = _drop_empty_passes(_as_counts(counts_TLE, str(path)), path)
    if drop_zero_layers:
        counts_TLE, dropped = _drop_zero_layers(counts_TLE, path)
        extra.update(dropped)
    return _rank_aggregated(counts_TLE, top_k, f"SGLang expert distribution: {path.name}",
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


def _to_numpy(value, what: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = _dense_tensor(value.detach().cpu(), what).numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise TraceError(f"{what} is ragged or not numeric; expected a rectangular array") from None
    if array.dtype.kind not in "iuf":
        raise TraceError(f"{what} has non-numeric dtype {array.dtype}; expected counts")
    return array


def _dense_tensor(tensor, what: str):
    """A strided tensor numpy can take: sparse layouts densified (after a size check),
    bfloat16/float16 widened to float64 (the stored values, exactly)."""
    import torch

    if tensor.layout != torch.strided:
        try:
            bounds.check_shape(tuple(tensor.shape), f"{what}: a sparse tensor of shape",
                               "the dump is corrupt or not a count table",
                               tensor.element_size())
        except MoesimError as exc:
            raise TraceError(str(exc)) from None
        tensor = tensor.to_dense()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.to(torch.float64)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TraceError(f"{what} has dtype {tensor.dtype}; expected counts")
    return tensor


def _sglang_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{path} is not valid JSON ({str(exc)[:80] or type(exc).__name__}); "
                         "re-export it") from None
    if not isinstance(data, dict) or "logical_count" not in data:
        raise TraceError(f"{path} has no \"logical_count\" key; expected SGLang's "
                         "--init-expert-location JSON")
    counts = _to_numpy(data["logical_count"], f"{path}: logical_count")
    return _sglang_shape(counts, path)


def _sglang_stat(dump, path: Path) -> np.ndarray:
    if not isinstance(dump, dict) or "logical_count" not in dump:
        raise TraceError(f"{path} has no \"logical_count\"; expected an SGLang stat-mode dump "
                         "(or a per_pass dump with \"records\")")
    return _sglang_shape(_to_numpy(dump["logical_count"], f"{path}: logical_count"), path)


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
    phy2log_LP = _to_numpy(dump.get("last_physical_to_logical_map", []),
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
        phys_LP = _to_numpy(record["global_physical_count"], f"{where}: global_physical_count")
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"{where}: a record lacks forward_pass_id, rank or "
                         "global_physical_count; expected SGLang per_pass records") from None
    if phys_LP.shape != shape:
        raise TraceError(f"{where}: a record's global_physical_count has shape {phys_LP.shape} "
                         f"but the physical-to-logical map has {shape}")
    return key, _as_counts(phys_LP, f"{where}: global_physical_count")


def _assemble_per_pass(cells: dict[tuple[int, int], list], num_experts: int, top_k: int,
                       drop_zero_layers: bool, where: str) -> RoutingTrace:
    passes = sorted({p for p, _ in cells})
    ranks = sorted({r for _, r in cells})
    if ranks != list(range(len(ranks))):
        raise TraceError(f"{where}: ranks {_few(ranks)} are not 0..R-1; a rank's dump is missing")
    missing = [k for k in ((p, r) for p in passes for r in ranks) if k not in cells]
    if missing:
        raise TraceError(f"{where}: no record for (pass, rank) {_few(missing)}; every rank must "
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
    tokens, variable = _token_budget(counts.sum(-1), top_k, True, where)
    meta = TraceMeta(num_layers=counts.shape[1], num_ranks=len(ranks), num_experts=num_experts,
                     top_k=top_k, tokens_per_rank=tokens, variable_k=variable,
                     source=f"SGLang per_pass dump: {where}", extra=extra)
    return validate(RoutingTrace(counts, meta))


# ---------------------------------------------------------------------------------------------
# DeepSeek EPLB weights

def import_eplb(path: str | os.PathLike, top_k: int = 2) -> RoutingTrace:
    """Read DeepSeek EPLB's ``weight[L, E]`` (deepseek-ai/EPLB ``rebalance_experts`` input).

    ``.npy`` (``allow_pickle=False``) or ``.csv`` (L rows of E numbers, no header) → one pass,
    ``rank_resolved=False``. The weights are loads summed over a window, so the pass stands for
    that whole window.
    """
    path = Path(path)
    if path.suffix == ".npy":
        try:
            bounds.check_npy_file(path)
        except MoesimError as exc:
            raise TraceError(str(exc)) from None
        try:
            weight = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise TraceError(f"{path} is not a readable .npy array ({type(exc).__name__}); "
                             "it is corrupt or holds Python objects") from None
    else:
        weight = _read_number_csv(path)
    weight = _to_numpy(weight, str(path))
    if weight.ndim != 2 or 0 in weight.shape:
        raise TraceError(f"{path}: weight has shape {weight.shape}; expected [layers, experts]")
    return _rank_aggregated(weight[None], top_k, f"DeepSeek EPLB weight: {path.name}")


def _read_number_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise TraceError(f"{path} is not a text CSV file") from None
    rows = [line.split(",") for line in text.splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise TraceError(f"{path}: rows have different lengths or the file is empty; expected "
                         "one row of E numbers per layer")
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        raise TraceError(f"{path} holds a value that is not a number; expected one row of E "
                         "numbers per layer, no header") from None


# ---------------------------------------------------------------------------------------------
# generic long CSV

def import_csv(path: str | os.PathLike, top_k: int = 2, *, micro_batches: int = 1,
               rank_resolved: bool = True) -> RoutingTrace:
    """Read the long CSV ``pass,layer,rank,expert,count`` (header required; moesim's own format).

    Sizes are the largest index + 1 per column; absent rows count 0; a repeated
    ``(pass, layer, rank, expert)`` is an error. Written by :func:`export_csv`.
    """
    path = Path(path)
    table = _read_long_csv(path)
    index, values = table[:, :4].astype(np.int64), table[:, 4]
    if index.size and index.min() < 0:
        raise TraceError(f"{path}: a pass/layer/rank/expert index is negative; indices start at 0")
    shape = tuple(int(n) for n in index.max(axis=0) + 1)
    try:
        bounds.check_shape(shape, f"{path}: the largest pass/layer/rank/expert ids imply a "
                           "trace of shape", "fix the ids in the CSV (they count from 0)")
    except MoesimError as exc:
        raise TraceError(str(exc)) from None
    counts = np.zeros(shape, dtype=np.int64)
    flat = np.ravel_multi_index(index.T, shape)
    if np.unique(flat).size != flat.size:
        raise TraceError(f"{path}: some (pass, layer, rank, expert) appears twice; "
                         "each cell needs one row")
    counts.flat[flat] = _as_counts(values, str(path))
    if not rank_resolved and shape[2] != 1:
        raise TraceError(f"{path}: rank-aggregated CSV must use rank 0 only")
    if shape[0] % micro_batches:
        raise TraceError(f"{path}: {shape[0]} passes is not a multiple of --micro-batches "
                         f"{micro_batches}")
    tokens, variable = _token_budget(counts.sum(-1), top_k, True, str(path))
    meta = TraceMeta(num_layers=shape[1], num_ranks=shape[2], num_experts=shape[3], top_k=top_k,
                     tokens_per_rank=tokens, variable_k=variable, rank_resolved=rank_resolved,
                     micro_batches_per_iteration=micro_batches, source=f"CSV: {path.name}")
    return validate(RoutingTrace(counts, meta))


def _read_long_csv(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", "replace")
        fields = tuple(h.strip().lower() for h in header.split(","))
        if fields != CSV_HEADER:
            raise TraceError(f"{path}: header is {header.strip()[:60]!r}; the first line must be "
                             f"{','.join(CSV_HEADER)}")
        try:
            with warnings.catch_warnings():  # "input contained no data": reported below
                warnings.simplefilter("ignore", UserWarning)
                table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: a row is not 5 numbers ({str(exc)[:80]}); fix the "
                             "CSV") from None
    if table.shape[0] == 0:
        raise TraceError(f"{path} has a header but no rows; nothing was recorded")
    if table.shape[1] != 5:
        raise TraceError(f"{path}: rows have {table.shape[1]} columns; expected 5")
    index = table[:, :4]
    if not np.isfinite(index).all() or (index != np.rint(index)).any():
        raise TraceError(f"{path}: pass/layer/rank/expert must be whole numbers")
    if index.max() >= 2**31:
        raise TraceError(f"{path}: an index is larger than 2^31; the file is corrupt")
    return table


def export_csv(trace: RoutingTrace, path: str | os.PathLike) -> Path:
    """Write every cell of ``trace`` as ``pass,layer,rank,expert,count`` rows (atomically)."""
    from moesim.traces.io import atomic_write_text_lines

    counts = trace.counts_TLRE
    index = np.indices(counts.shape).reshape(4, -1).T
    table = np.column_stack([index, np.asarray(counts).reshape(-1)])
    return atomic_write_text_lines(Path(path), ",".join(CSV_HEADER), table)
