"""SmartMoE / FastMoE routing logs (thu-pacman/SmartMoE-AE ``moe_trace/``) → a RoutingTrace.

Field layout: ``shared/TRACE_FORMATS.md``; the token-budget rule: :mod:`moesim.traces.importers`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import as_counts, few, license_from, token_budget
from moesim.traces.import_common import gaps as missing_values
from moesim.traces.validate import validate

SMARTMOE_NAME = re.compile(r"^table_iter(\d+)_rank(\d+)\.log$", re.ASCII)


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
    tokens, variable = token_budget(counts_TLRE.sum(-1), top_k, allow_uneven, str(directory))
    meta = TraceMeta(num_layers=L, num_ranks=len(ranks), num_experts=E, top_k=top_k,
                     tokens_per_rank=tokens, variable_k=variable, micro_batches_per_iteration=M,
                     iteration_stride=stride, first_iteration=iterations[0],
                     source=f"SmartMoE/FastMoE table logs: {directory.resolve()}",
                     license=license_from(directory))
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
                         f"table_iter{{N}} for N in {few(missing)}; add them or remove the "
                         "files after the gap")
    return stride


def _smartmoe_check_complete(files: dict, iterations: list[int], ranks: list[int]) -> None:
    if ranks != list(range(len(ranks))):
        holes = missing_values(ranks, 0)
        raise TraceError(f"ranks must be 0..R-1 but no file has rank {few(holes)}; "
                         "the trace folder is incomplete")
    missing = [f"table_iter{i}_rank{r}.log" for i in iterations for r in ranks
               if (i, r) not in files]
    if missing:
        raise TraceError(f"{len(missing)} file(s) missing, e.g. {few(missing)}; every "
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
        raise TraceError(f"{path.name}: layer ids are {few(layers)} but must be 0..L-1 "
                         "in order; the file is damaged")
    shapes = {table.shape for _, table in rows}
    if len(shapes) != 1:
        raise TraceError(f"{path.name}: layers have different [micro-batches, experts] shapes "
                         f"{sorted(shapes)}; the file is damaged")
    return as_counts(np.stack([table for _, table in rows]), path.name)


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
