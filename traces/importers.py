"""Importers: routing data written by other tools → a validated :class:`RoutingTrace`.

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` logical experts, ``P`` physical
expert slots, ``M`` micro-batches per iteration, ``I`` iterations.

Sources (field layouts summarised in ``shared/TRACE_FORMATS.md``):

- SmartMoE / FastMoE ``table_iter{N}_rank{r}.log`` (thu-pacman/SmartMoE-AE, ``moe_trace/``):
  :mod:`moesim.traces.import_smartmoe`.
- SGLang ``ExpertDistributionRecorder`` dumps and the ``--init-expert-location`` JSON:
  :mod:`moesim.traces.import_sglang`.
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

import os
import warnings
from pathlib import Path

import numpy as np

from moesim import bounds
from moesim.errors import MoesimError, TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import as_counts, rank_aggregated, to_numpy, token_budget
from moesim.traces.import_sglang import import_sglang
from moesim.traces.import_smartmoe import import_smartmoe
from moesim.traces.validate import validate

__all__ = ["CSV_HEADER", "export_csv", "import_csv", "import_eplb", "import_sglang",
           "import_smartmoe"]

CSV_HEADER = ("pass", "layer", "rank", "expert", "count")


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
    weight = to_numpy(weight, str(path))
    if weight.ndim != 2 or 0 in weight.shape:
        raise TraceError(f"{path}: weight has shape {weight.shape}; expected [layers, experts]")
    return rank_aggregated(weight[None], top_k, f"DeepSeek EPLB weight: {path.name}")


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
    counts.flat[flat] = as_counts(values, str(path))
    if not rank_resolved and shape[2] != 1:
        raise TraceError(f"{path}: rank-aggregated CSV must use rank 0 only")
    if shape[0] % micro_batches:
        raise TraceError(f"{path}: {shape[0]} passes is not a multiple of --micro-batches "
                         f"{micro_batches}")
    tokens, variable = token_budget(counts.sum(-1), top_k, True, str(path))
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
