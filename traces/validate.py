"""Checks that a :class:`RoutingTrace` obeys the schema (see :mod:`moesim.traces.format`).

Shape legend: ``T`` passes, ``L`` layers, ``R`` ranks, ``E`` experts, ``N`` tokens of one rank in
one pass, ``K`` the most experts one token picks.

Every failure raises :class:`moesim.errors.TraceError` with one line that names the problem, where
it is, and how to fix it. :func:`validate` is called by :func:`moesim.traces.load_trace` and by
every importer, so a trace that reached a policy has passed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import SCHEMA_VERSION, RoutingTrace, TraceMeta
from moesim.traces.stream import pass_chunks, passes_per_chunk, release_pages

_POSITIVE_INT_FIELDS = ("num_layers", "num_ranks", "num_experts", "top_k", "tokens_per_rank",
                        "micro_batches_per_iteration", "iteration_stride")
MAX_META_INT = 2**40  # above any real layer, rank, expert, token or iteration count
_TYPES: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "first_iteration": (int,), "variable_k": (bool,),
    "rank_resolved": (bool,), "hidden_size": (int, type(None)),
    "ffn_hidden_size": (int, type(None)), "model": (str,), "source": (str,),
    "license": (str,), "extra": (dict,),
    **{name: (int,) for name in _POSITIVE_INT_FIELDS},
}


def meta_from_dict(data: Any, where: str = "trace metadata") -> TraceMeta:
    """Build :class:`TraceMeta` from parsed JSON, rejecting unknown versions and wrong types."""
    if not isinstance(data, dict):
        raise TraceError(f"{where} is a JSON {type(data).__name__}, not an object; "
                         "re-export the trace with moesim")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(f"{where} has unknown schema_version {version!r}; this moesim reads "
                         f"version {SCHEMA_VERSION}: upgrade moesim or re-export the trace")
    known = {f.name for f in dataclasses.fields(TraceMeta)}
    required = {f.name for f in dataclasses.fields(TraceMeta)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    if missing:
        raise TraceError(f"{where} lacks {', '.join(missing)}; add them (see the schema in "
                         "moesim.traces.format) or re-export the trace")
    unknown = sorted(data.keys() - known)
    if unknown:
        raise TraceError(f"{where} has unknown field(s) {', '.join(unknown)}; move them under "
                         "\"extra\" or upgrade moesim")
    for name, value in data.items():
        _check_type(name, value, where)
    return TraceMeta(**data)


def _check_type(name: str, value: Any, where: str) -> None:
    allowed = _TYPES[name]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise TraceError(f"{where}: {name} is {value!r} but must be {names}; fix the metadata")


def validate(trace: RoutingTrace) -> RoutingTrace:
    """Check every invariant of the schema; return ``trace`` unchanged or raise TraceError.

    Costs a few passes over the counts (and the per-token ids when present).
    """
    if not isinstance(trace, RoutingTrace):
        raise TraceError(f"expected a RoutingTrace, got {type(trace).__name__}")
    _check_meta(trace.meta)
    counts = _check_counts_array(trace.counts_TLRE)
    _check_shape_vs_meta(counts, trace.meta)
    _check_values(counts)
    _check_row_sums(counts, trace.meta)
    if trace.topk_TLRNK is not None:
        _check_topk(trace.topk_TLRNK, counts, trace.meta)
    return trace


def _check_meta(meta: TraceMeta) -> None:
    if not isinstance(meta, TraceMeta):
        raise TraceError(f"trace.meta is a {type(meta).__name__}, not a TraceMeta")
    if meta.schema_version != SCHEMA_VERSION:
        raise TraceError(f"unknown schema_version {meta.schema_version!r}; this moesim reads "
                         f"version {SCHEMA_VERSION}: upgrade moesim or re-export the trace")
    for name, value in dataclasses.asdict(meta).items():
        _check_type(name, value, "trace metadata")
    for name in _POSITIVE_INT_FIELDS:
        if getattr(meta, name) < 1:
            raise TraceError(f"metadata {name} = {getattr(meta, name)} must be >= 1; "
                             "fix the metadata")
    for name in (*_POSITIVE_INT_FIELDS, "first_iteration"):
        if abs(getattr(meta, name)) > MAX_META_INT:
            raise TraceError(f"metadata {name} = {getattr(meta, name)} is too large to be real "
                             f"(the limit is 2**40); fix the metadata")
    if meta.top_k > meta.num_experts:
        raise TraceError(f"metadata top_k = {meta.top_k} exceeds num_experts = "
                         f"{meta.num_experts}; a token cannot pick more experts than exist")
    if not meta.rank_resolved and meta.num_ranks != 1:
        raise TraceError(f"rank_resolved is false but num_ranks = {meta.num_ranks}; "
                         "rank-aggregated traces hold R = 1 (use spread_over_ranks)")


def _check_counts_array(counts: Any) -> np.ndarray:
    if not isinstance(counts, np.ndarray):
        raise TraceError(f"counts_TLRE is a {type(counts).__name__}, not a numpy array")
    if counts.ndim != 4:
        raise TraceError(f"counts_TLRE has {counts.ndim} dimensions {counts.shape}; expected 4 "
                         "[passes, layers, ranks, experts]")
    if counts.shape[0] == 0:
        raise TraceError("counts_TLRE has no passes; record at least one pass")
    if counts.dtype.kind == "f":
        _check_float_counts(counts)
    elif counts.dtype.kind not in "iu":
        raise TraceError(f"counts_TLRE has dtype {counts.dtype}; store integer counts (int64)")
    return counts


def _check_float_counts(counts: np.ndarray) -> None:
    bad = ~np.isfinite(counts)
    if bad.any():
        raise TraceError(f"counts contain NaN or infinity at [t, l, r, e] = {_first(bad)}; "
                         "the recorder lost data there, re-record or drop those passes")
    frac = counts != np.rint(counts)
    if frac.any():
        where = _first(frac)
        raise TraceError(f"counts contain a non-integer {float(counts[where]):g} at [t, l, r, e] = "
                         f"{where}; counts are token assignments and must be whole numbers")
    raise TraceError(f"counts_TLRE has float dtype {counts.dtype}; store them as int64 "
                     "(np.rint(c).astype(np.int64))")


def _check_shape_vs_meta(counts: np.ndarray, meta: TraceMeta) -> None:
    _, layers, ranks, experts = counts.shape
    for name, actual in (("num_layers", layers), ("num_ranks", ranks), ("num_experts", experts)):
        if getattr(meta, name) != actual:
            raise TraceError(f"metadata says {name} = {getattr(meta, name)} but counts_TLRE has "
                             f"{actual} (shape {counts.shape}); fix the metadata")
    passes, mb = counts.shape[0], meta.micro_batches_per_iteration
    if passes % mb:
        raise TraceError(f"{passes} passes is not a multiple of micro_batches_per_iteration = "
                         f"{mb}; drop the incomplete last iteration or fix the metadata")


def _check_values(counts: np.ndarray, t0: int = 0) -> None:
    if counts.dtype.kind == "i" and counts.size and counts.min() < 0:
        where = _first(counts < 0)
        raise TraceError(f"negative count {counts[where]} at [t, l, r, e] = {_at(where, t0)}; "
                         "counts "
                         "must be >= 0 (was the file written with a signed overflow?)")


def _check_row_sums(counts: np.ndarray, meta: TraceMeta, t0: int = 0) -> None:
    sums_TLR = counts.sum(axis=-1, dtype=np.int64)
    budget = meta.tokens_per_rank * meta.top_k
    if meta.variable_k:
        bad = sums_TLR > budget
        verb = "at most"
    else:
        bad = sums_TLR != budget
        verb = "exactly"
    if bad.any():
        where = _first(bad)
        raise TraceError(
            f"counts at [t, l, r] = {_at(where, t0)} sum to {sums_TLR[where]} but tokens_per_rank"
            f" x top_k"
            f" = {meta.tokens_per_rank} x {meta.top_k} = {budget} must be {verb} that; fix "
            "tokens_per_rank/top_k" + ("" if meta.variable_k else " or set variable_k"))
    per_expert_cap = meta.tokens_per_rank
    if counts.size and counts.max() > per_expert_cap:
        where = _first(counts > per_expert_cap)
        raise TraceError(f"count {counts[where]} at [t, l, r, e] = {_at(where, t0)} exceeds "
                         f"tokens_per_rank = {per_expert_cap}; a token picks an expert at most "
                         "once, so fix tokens_per_rank")


def _check_topk(topk: Any, counts: np.ndarray, meta: TraceMeta) -> None:
    if not isinstance(topk, np.ndarray) or topk.dtype.kind not in "iu":
        kind = getattr(topk, "dtype", type(topk).__name__)
        raise TraceError(f"topk_TLRNK has type {kind}; store int32 expert ids")
    want = counts.shape[:3] + (meta.tokens_per_rank, meta.top_k)
    if topk.shape != want:
        raise TraceError(f"topk_TLRNK has shape {topk.shape} but counts and metadata need {want}"
                         " [passes, layers, ranks, tokens_per_rank, top_k]; fix the arrays")
    if topk.size and (topk.min() < -1 or topk.max() >= meta.num_experts):
        where = _first((topk < -1) | (topk >= meta.num_experts))
        raise TraceError(f"per-token expert id {topk[where]} at [t, l, r, n, k] = {where} is "
                         f"out of range [0, {meta.num_experts}) (-1 pads); fix the ids")
    if not meta.variable_k and (topk < 0).any():
        where = _first(topk < 0)
        raise TraceError(f"per-token id -1 (padding) at [t, l, r, n, k] = {where} in a fixed-k "
                         "trace; set variable_k or record every choice")
    _check_topk_duplicates(topk)
    _check_topk_matches_counts(topk, counts)


def _check_topk_duplicates(topk: np.ndarray) -> None:
    ordered = np.sort(topk, axis=-1)
    dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if dup.any():
        where = _first(dup.any(axis=-1))
        raise TraceError(f"token [t, l, r, n] = {where} picks the same expert twice; top-k "
                         "choices must be distinct experts")


def _check_topk_matches_counts(topk: np.ndarray, counts: np.ndarray) -> None:
    rows, experts = int(np.prod(counts.shape[:3])), counts.shape[3]
    ids = topk.reshape(rows, -1).astype(np.int64)
    offsets = (np.arange(rows, dtype=np.int64) * experts)[:, None]
    flat = (ids + offsets)[ids >= 0]
    rebuilt = np.bincount(flat, minlength=rows * experts).reshape(counts.shape)
    bad = rebuilt != counts
    if bad.any():
        where = _first(bad)
        raise TraceError(f"per-token ids give {rebuilt[where]} assignments at [t, l, r, e] = "
                         f"{where} but counts say {counts[where]}; the two arrays disagree, "
                         "re-record or rebuild counts from the ids")


def validate_in_chunks(trace: RoutingTrace, max_cells: int | None = None,
                       passes: int | None = None) -> RoutingTrace:
    """:func:`validate` a chunk of passes at a time (bounded memory: for memory-mapped traces
    larger than RAM; the mapped pages are released after each chunk). With ``passes`` the
    metadata and shape are checked whole but the values of the first ``passes`` passes only
    (a reader that will not look further need not read further)."""
    if not isinstance(trace, RoutingTrace):
        raise TraceError(f"expected a RoutingTrace, got {type(trace).__name__}")
    _check_meta(trace.meta)
    counts = _check_counts_array(trace.counts_TLRE)
    _check_shape_vs_meta(counts, trace.meta)
    step = passes_per_chunk(counts, max_cells)
    for t0, chunk in pass_chunks(counts if passes is None else counts[:passes], max_cells):
        _check_values(chunk, t0)
        _check_row_sums(chunk, trace.meta, t0)
        if trace.topk_TLRNK is not None:
            try:
                _check_topk(np.array(trace.topk_TLRNK[t0:t0 + step]), chunk, trace.meta)
            except TraceError as exc:
                raise TraceError(f"{exc} (in passes {t0}..{t0 + chunk.shape[0] - 1})") from None
            release_pages(trace.topk_TLRNK)
    return trace


def validate_meta(meta: TraceMeta) -> TraceMeta:
    """The metadata checks of :func:`validate` alone."""
    _check_meta(meta)
    return meta


def check_chunk(counts_TLRE: np.ndarray, meta: TraceMeta, t0: int = 0) -> None:
    """The value and row-sum checks of :func:`validate` on passes ``t0 …`` of a trace."""
    if counts_TLRE.dtype.kind not in "iu":
        raise TraceError(f"counts have dtype {counts_TLRE.dtype}; store integer counts (int64)")
    _check_values(counts_TLRE, t0)
    _check_row_sums(counts_TLRE, meta, t0)


def _at(where: tuple[int, ...], t0: int) -> tuple[int, ...]:
    """An index found in a chunk of passes starting at ``t0``, as an index into the trace."""
    return (where[0] + t0,) + tuple(where[1:])


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first true element of ``mask``, as a tuple of ints."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
