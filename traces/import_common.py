"""Input checks and count handling shared by every importer.

Every importer reads files other programs wrote, so each file is checked before it is opened:
it must be a regular file (not a directory, device or FIFO) of bounded size, and a bad one gives
a one-line :class:`~moesim.errors.TraceError` naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from moesim import bounds
from moesim.errors import MoesimError, TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.validate import validate

MAX_JSON_BYTES = 1 << 30          # one JSON document (vLLM load_history, meta_info.json)
MAX_META_BYTES = 1 << 20          # small side files (TensorRT-LLM meta_info.json)
MAX_TENSOR_FILE_BYTES = 16 << 30  # one safetensors / torch.save file
MAX_TRACE_CELLS = 1 << 31         # passes x layers x ranks x experts of an imported trace


def regular_file(path: Path, what: str, max_bytes: int) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes``; TraceError otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TraceError(f"{path} does not exist; check the path of the {what}") from None
    except OSError as exc:
        raise TraceError(f"cannot read {path} ({exc.strerror}); check the path of the "
                         f"{what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TraceError(f"{path} is not a regular file; pass the {what} itself")
    if info.st_size > max_bytes:
        raise TraceError(f"{path} is {info.st_size / 2**30:.1f} GiB, more than the "
                         f"{max_bytes / 2**30:.3g} GiB a {what} may be; is it the right file?")
    return path


def trace_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory; TraceError naming the expected contents otherwise."""
    if not path.is_dir():
        raise TraceError(f"{path} is not a directory; pass the folder holding the {what}")
    return path


def rank_files(directory: Path, pattern: re.Pattern, what: str, max_bytes: int
               ) -> dict[int, Path]:
    """``{rank: path}`` of the files in ``directory`` whose name ``pattern`` matches (group 1 =
    rank); ranks must be ``0..R-1`` with none missing."""
    found = {}
    for path in sorted(directory.iterdir()):
        match = pattern.match(path.name)
        if match:
            found[int(match[1])] = regular_file(path, what, max_bytes)
    if not found:
        raise TraceError(f"{directory} holds no {what} files ({pattern.pattern}); point at the "
                         "folder the engine wrote")
    missing = gaps(found, 0)
    if missing:
        raise TraceError(f"{directory}: no {what} file for rank(s) {few(missing)}; every rank "
                         "0..R-1 needs one (copy all ranks' files)")
    return found


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES):
    """Parse one JSON file (regular, bounded); TraceError on bad syntax or encoding."""
    regular_file(path, what, max_bytes)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{path} is not valid JSON ({short(exc)}); the {what} is damaged, "
                         "re-export it") from None


def check_cells(shape: tuple[int, ...], where: str) -> None:
    """Refuse a trace whose counts array would exceed :data:`MAX_TRACE_CELLS` cells."""
    if math.prod(shape) > MAX_TRACE_CELLS:
        raise TraceError(f"{where}: the trace would be {list(shape)} (passes, layers, ranks, "
                         f"experts) = {math.prod(shape):,} cells, more than {MAX_TRACE_CELLS:,};"
                         " import fewer steps")
    try:  # and it must fit in this machine's memory (moesim.bounds)
        bounds.check_shape(shape, f"{where}: the trace", "import fewer steps or ranks")
    except MoesimError as exc:
        raise TraceError(str(exc)) from None


def whole_int(value, what: str, lo: int = 0, hi: int = 1 << 40) -> int:
    """``value`` as an int in ``[lo, hi)``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise TraceError(f"{what} is {short(value)} but must be a whole number in [{lo}, {hi})")
    return value


def stride_of(numbers: list[int], what: str) -> int:
    """The common spacing of sorted ``numbers`` (1 for one number); TraceError when uneven."""
    if len(numbers) < 2:
        return 1
    gaps = {b - a for a, b in zip(numbers, numbers[1:], strict=False)}
    if len(gaps) != 1:
        raise TraceError(f"{what} are not evenly spaced ({few(numbers)}); a step is missing "
                         "from some file, import a complete run")
    return gaps.pop()


def gaps(present, start: int, step: int = 1, limit: int = 5) -> list[int]:
    """Up to ``limit`` of ``start, start + step, ...`` below ``max(present)`` missing from
    ``present``, without building that range (a file name can claim rank 10**10)."""
    out: list[int] = []
    expect = start
    for value in sorted(set(present)):
        while expect < value and len(out) < limit:
            out.append(expect)
            expect += step
        if len(out) >= limit:
            break
        expect = value + step
    return out


def few(items, limit: int = 5) -> str:
    """At most ``limit`` items, comma-separated, with the total when there are more."""
    items = list(items)
    text = ", ".join(str(x) for x in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def short(value, limit: int = 80) -> str:
    """``value`` as one short line."""
    text = " ".join(str(value).split())
    return text[:limit] + ("..." if len(text) > limit else "")


# -- counts into a trace (every importer) ----------------------------------------------------
def token_budget(sums: np.ndarray, top_k: int, allow_uneven: bool, what: str
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


def as_counts(values: np.ndarray, what: str) -> np.ndarray:
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


def license_from(directory: Path) -> str:
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


def rank_aggregated(counts_TLE: np.ndarray, top_k: int, source: str, license_: str = "",
                     extra: dict | None = None, micro_batches: int = 1) -> RoutingTrace:
    """Totals over ranks ``[T, L, E]`` → a validated trace with ``R = 1``."""
    counts = as_counts(counts_TLE, source)[:, :, None, :]
    tokens, variable = token_budget(counts.sum(-1), top_k, True, source)
    if counts.shape[0] % micro_batches:
        raise TraceError(f"{source}: {counts.shape[0]} passes is not a multiple of "
                         f"--micro-batches {micro_batches}; fix --micro-batches")
    meta = TraceMeta(num_layers=counts.shape[1], num_ranks=1, num_experts=counts.shape[3],
                     top_k=top_k, tokens_per_rank=tokens, variable_k=variable,
                     rank_resolved=False, micro_batches_per_iteration=micro_batches,
                     source=source, license=license_, extra=extra or {})
    return validate(RoutingTrace(counts, meta))


def to_numpy(value, what: str) -> np.ndarray:
    """A numeric array from a list, numpy array or torch tensor; TraceError when ragged or
    non-numeric."""
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
