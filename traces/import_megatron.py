"""Import Megatron-Core router traces (``router_trace_rank{r}.jsonl``) as a :class:`RoutingTrace`.

Shape legend: ``T`` passes, ``L`` MoE layers (routers), ``R`` ranks, ``E`` experts, ``N``
tokens of one record, ``K`` top-k, ``M`` micro-batches per step.

Format (Megatron-Core ``megatron/core/transformer/moe/router_trace.py``, written when training or
inference runs with ``--moe-routing-trace-path DIR``): one JSON-lines file per global rank, one
object per router call::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 2, "top_indices": [[12, 45], ...]}

Multi-token-prediction routers carry ``"block": "mtp"`` and an ``"mtp_idx"``, so a router is
identified by ``(block, mtp_idx, layer)``.

How records become passes, layers and ranks:

- **Layers.** Decoder routers sorted by ``layer`` are trace layers ``0..L-1``; the ids are kept
  in ``meta.extra["routers"]``. MTP routers are **excluded by default**: they belong to an
  auxiliary prediction head (DeepSeek-V3's MTP module is dropped at inference) with experts of
  its own, and a model preset's ``num_layers`` counts the decoder's MoE layers only. With
  ``include_mtp=True`` they follow the decoder layers, ordered by ``(mtp_idx, layer)``. Either
  way ``meta.extra["mtp_records"]`` says how many MTP records the files held.
- **Passes.** In training every micro-batch of a step calls each router once with the same
  ``step``; the ``m``-th record of a (rank, router, step) in file order is micro-batch ``m``.
  Every (rank, router, step) must hold the same number ``M`` of records, which becomes
  ``micro_batches_per_iteration``; passes are step-major. (Activation recomputation that re-runs
  the router doubles the records; such a trace is refused when the counts disagree.)
- **Ranks.** The rank is taken from the file name (a record's ``rank`` must agree). With
  pipeline parallelism a router is recorded only by the ranks of its stage: trace rank ``j`` of
  a layer is the ``j``-th global rank that recorded it, and every router must be recorded by the
  same number of ranks (the map is in ``meta.extra["ranks_of_layer"]`` when it is not the
  identity). With tensor parallelism but no sequence parallelism the ranks of one
  tensor-parallel group route the same tokens; import one rank per group then (copy those files
  into their own folder, renumbered).
- **Tokens.** When every record has the same ``num_tokens`` and ``topk`` the trace is fixed-k;
  otherwise (inference steps, variable sequence lengths) it is ``variable_k`` with the largest.
  ``E`` is the largest expert id + 1 unless ``num_experts`` is given (an expert nobody picked
  is invisible in the ids).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import TraceError
from moesim.traces.format import RoutingTrace, TraceMeta
from moesim.traces.import_common import (
    check_cells,
    few,
    rank_files,
    short,
    stride_of,
    trace_dir,
    whole_int,
)
from moesim.traces.validate import validate

FILE_NAME = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
MAX_FILE_BYTES = 1 << 40          # files stream line by line; only the line length is bounded
MAX_LINE_BYTES = 256 << 20        # one record: ~8M expert ids
MAX_EXPERTS = 1 << 16

Router = tuple[str, int, int]     # (block, mtp_idx or -1, layer)


@dataclass
class _Records:
    """Per-record expert histograms, grouped by (rank, router, step) in file order."""

    cells: dict[tuple[int, Router, int], list[np.ndarray]] = field(default_factory=dict)
    topk: dict[tuple[int, Router, int], list[np.ndarray]] = field(default_factory=dict)
    tokens: set[int] = field(default_factory=set)
    ks: set[int] = field(default_factory=set)
    stages: set[str] = field(default_factory=set)
    max_id: int = -1
    mtp_records: int = 0


def import_megatron(directory: str | os.PathLike, *, include_mtp: bool = False,
                    num_experts: int | None = None, keep_topk: bool = False,
                    stage: str | None = None) -> RoutingTrace:
    """Read a Megatron-Core ``--moe-routing-trace-path`` folder (module docstring).

    ``stage`` keeps only records of that ``"stage"`` (needed only when a folder mixes stages);
    ``keep_topk`` stores the per-token choices too (``-1``-padded in variable-k traces).
    """
    directory = trace_dir(Path(directory), "router_trace_rank*.jsonl files")
    files = rank_files(directory, FILE_NAME, "Megatron router trace", MAX_FILE_BYTES)
    rec = _Records()
    for rank, path in files.items():
        _read_file(path, rank, rec, include_mtp, stage, keep_topk)
    if not rec.cells:
        raise TraceError(f"{directory}: the router trace files hold no decoder records"
                         + (f" ({rec.mtp_records} MTP records: pass --include-mtp)"
                            if rec.mtp_records else "; was tracing enabled for any step?"))
    if len(rec.stages) > 1:
        raise TraceError(f"{directory}: records of several stages {sorted(rec.stages)}; choose "
                         "one with --stage")
    E = _experts(rec.max_id, num_experts, directory)
    return _assemble(rec, E, directory, keep_topk, include_mtp)


def _read_file(path: Path, rank: int, rec: _Records, include_mtp: bool, stage: str | None,
               keep_topk: bool) -> None:
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(line) > MAX_LINE_BYTES:
                raise TraceError(f"{path.name} line {lineno} is longer than "
                                 f"{MAX_LINE_BYTES >> 20} MiB; the file is damaged")
            if not line.strip():
                continue
            _add_record(_parse_line(line, path, lineno), path, lineno, rank, rec, include_mtp,
                        stage, keep_topk)


def _parse_line(line: bytes, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceError(f"{path.name} line {lineno} is not JSON ({short(exc, 60)}); the file "
                         "is truncated or damaged") from None
    if not isinstance(record, dict):
        raise TraceError(f"{path.name} line {lineno} is a JSON {type(record).__name__}, not a "
                         "router record object")
    return record


def _add_record(record: dict, path: Path, lineno: int, rank: int, rec: _Records,
                include_mtp: bool, stage: str | None, keep_topk: bool) -> None:
    where = f"{path.name} line {lineno}"
    record_stage = str(record.get("stage", ""))
    if stage is not None and record_stage != stage:
        return
    router = _router(record, where)
    if router[0] == "mtp":
        rec.mtp_records += 1
        if not include_mtp:
            return
    if "rank" in record and whole_int(record["rank"], f"{where}: rank", 0, 1 << 24) != rank:
        raise TraceError(f"{where}: record says rank {record['rank']} but the file is rank "
                         f"{rank}'s; do not rename the files")
    step = whole_int(record.get("step"), f"{where}: step", 0, 1 << 40)
    ids_NK = _indices(record, where)
    rec.stages.add(record_stage)
    rec.tokens.add(ids_NK.shape[0])
    rec.ks.add(ids_NK.shape[1])
    if ids_NK.size:
        rec.max_id = max(rec.max_id, int(ids_NK.max()))
    key = (rank, router, step)
    rec.cells.setdefault(key, []).append(np.bincount(ids_NK.ravel(), minlength=1))
    if keep_topk:
        rec.topk.setdefault(key, []).append(ids_NK.astype(np.int32))


def _router(record: dict, where: str) -> Router:
    block = record.get("block", "decoder")
    if block not in ("decoder", "mtp"):
        raise TraceError(f"{where}: block {short(block, 30)!r} is neither 'decoder' nor 'mtp'")
    layer = whole_int(record.get("layer"), f"{where}: layer", 0, 1 << 20)
    mtp = whole_int(record.get("mtp_idx"), f"{where}: mtp_idx", 0, 1 << 20) \
        if block == "mtp" else -1
    return block, mtp, layer


def _indices(record: dict, where: str) -> np.ndarray:
    """``top_indices`` as int64 ``[N, K]``, checked against ``num_tokens`` / ``topk``."""
    raw = record.get("top_indices")
    n = whole_int(record.get("num_tokens"), f"{where}: num_tokens", 0, 1 << 31)
    k = whole_int(record.get("topk"), f"{where}: topk", 1, 1 << 10)
    if not isinstance(raw, list):
        raise TraceError(f"{where}: top_indices is missing or not a list; expected "
                         "[[k expert ids] x num_tokens]")
    try:
        ids = np.array(raw) if raw else np.zeros((0, k), np.int64)
    except (ValueError, TypeError, OverflowError):
        ids = None
    if ids is None or ids.dtype.kind not in "iu":
        raise TraceError(f"{where}: top_indices is ragged or not whole numbers; expected "
                         f"{n} rows of {k} expert ids")
    if ids.shape != (n, k):
        raise TraceError(f"{where}: top_indices has shape {list(ids.shape)} but num_tokens = {n}"
                         f" and topk = {k}; the record is damaged")
    if ids.size and (ids.min() < 0 or ids.max() >= MAX_EXPERTS):
        raise TraceError(f"{where}: an expert id is outside [0, {MAX_EXPERTS}); the record is "
                         "damaged")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise TraceError(f"{where}: a token picks the same expert twice; top-k ids must be "
                         "distinct")
    return ids


def _experts(max_id: int, num_experts: int | None, directory: Path) -> int:
    if num_experts is None:
        return max(max_id + 1, 1)
    if num_experts <= max_id:
        raise TraceError(f"{directory}: expert id {max_id} appears but --experts is "
                         f"{num_experts}; raise --experts")
    return num_experts


def _order(rec: _Records) -> tuple[list[Router], list[int], dict[Router, list[int]], int]:
    """Routers in trace order, sorted steps, the ranks that recorded each router, and ``M``."""
    routers = sorted({r for _, r, _ in rec.cells}, key=lambda r: (r[0] == "mtp", r[1], r[2]))
    steps = sorted({s for _, _, s in rec.cells})
    ranks_of = {r: sorted({rank for rank, rr, _ in rec.cells if rr == r}) for r in routers}
    widths = {len(v) for v in ranks_of.values()}
    if len(widths) != 1:
        raise TraceError("routers were recorded by different numbers of ranks ("
                         + few(f"{_name(r)}: {len(v)}" for r, v in ranks_of.items())
                         + "); import the files of every pipeline stage together")
    per_cell = {len(v) for v in rec.cells.values()}
    if len(per_cell) != 1:
        raise TraceError(f"(rank, router, step) cells hold different numbers of records "
                         f"({few(sorted(per_cell))}); every micro-batch must be recorded once "
                         "per router (activation recomputation re-runs routers: disable it "
                         "while tracing)")
    missing = [(rank, _name(r), s) for r in routers for rank in ranks_of[r] for s in steps
               if (rank, r, s) not in rec.cells]
    if missing:
        raise TraceError(f"no record for (rank, router, step) {few(missing, 3)}; every rank "
                         "must record every step (was one file cut short?)")
    return routers, steps, ranks_of, per_cell.pop()


def _name(router: Router) -> str:
    block, mtp, layer = router
    return f"decoder/{layer}" if block == "decoder" else f"mtp{mtp}/{layer}"


def _assemble(rec: _Records, E: int, directory: Path, keep_topk: bool,
              include_mtp: bool) -> RoutingTrace:
    routers, steps, ranks_of, M = _order(rec)
    T, L, R = len(steps) * M, len(routers), len(next(iter(ranks_of.values())))
    check_cells((T, L, R, E), str(directory))
    N, K = max(rec.tokens), max(rec.ks)
    counts = np.zeros((T, L, R, E), dtype=np.int64)
    topk = np.full((T, L, R, N, K), -1, dtype=np.int32) if keep_topk else None
    if topk is not None:
        check_cells(topk.shape, f"{directory} (per-token ids)")
    for si, step in enumerate(steps):
        for li, router in enumerate(routers):
            for j, rank in enumerate(ranks_of[router]):
                for m, hist in enumerate(rec.cells[(rank, router, step)]):
                    counts[si * M + m, li, j, :hist.size] = hist
                    if topk is not None:
                        ids = rec.topk[(rank, router, step)][m]
                        topk[si * M + m, li, j, :ids.shape[0], :ids.shape[1]] = ids
    fixed = len(rec.tokens) == 1 and len(rec.ks) == 1 and N > 0
    extra = {"routers": [_name(r) for r in routers], "steps": [steps[0], steps[-1]],
             "mtp_records": rec.mtp_records,
             "mtp": "included" if include_mtp else "excluded (pass --include-mtp to add them)",
             "stage": next(iter(rec.stages))}
    if any(v != list(range(R)) for v in ranks_of.values()):
        extra["ranks_of_layer"] = [ranks_of[r] for r in routers]
    meta = TraceMeta(num_layers=L, num_ranks=R, num_experts=E, top_k=K,
                     tokens_per_rank=max(N, 1), variable_k=not fixed,
                     micro_batches_per_iteration=M, first_iteration=steps[0],
                     iteration_stride=stride_of(steps, f"{directory}: steps"),
                     source=f"Megatron-Core router trace: {directory.resolve()}", extra=extra)
    return validate(RoutingTrace(counts, meta, topk))
