"""RunResult: the one on-disk format both backends write and ``analysis`` reads.

Shape legend: ``I`` iterations recorded, ``L`` MoE layers (+1: index ``L`` holds per-iteration
ops such as the optimizer step), ``F`` phases (``moesim.ops.PHASES``), ``R`` ranks, ``E``
experts, ``C`` memory components.

A run directory holds::

    manifest.json     {"schema": 1, "status": "complete" | "incomplete" | "running",
                       "backend": "simulator" | "executor", "iterations": [...], "error": str}
    config.json       the full configuration: model, cluster, policy (+knobs), trace, options
    iterations.csv    one row per iteration: the summary columns (SUMMARY_COLUMNS and extras)
    times.npz         busy_s[I, L+1, F, R]   seconds rank r spent in (layer, phase), all streams
                      start_s[I, L+1, F, R]  first start of that (layer, phase) on r, from the
                                             iteration's start (NaN: never ran)
                      end_s[I, L+1, F, R]    last end
                      iterations[I], phases[F]
    load.npz          expert_load[I, L, E]   tokens routed to each expert (before drops)
                      rank_tokens[I, L, R]   tokens each rank's slots computed (after drops)
                      dropped[I, L, R]       tokens each source rank dropped
    memory.npz        memory_bytes[I, C, R], components[C] (GPU peak breakdown)
    traffic.npz       bytes GPU i sent GPU j in each phase (moesim.metrics.traffic_FRR),
                      sparse: traffic_iteration/phase/src/dst/value[N], traffic_world[I]
                      (moesim.traffic_io; RunResult["traffic_bytes"] is the dense
                      [I, F, R, R] view, and older runs' dense files still load)
    timeline_iter{N}.json   Chrome-trace / Perfetto JSON of chosen iterations

Writes are atomic and resumable: each finished chunk of iterations lands in ``parts/`` via a
temp file and ``os.replace``; ``finish()`` consolidates the parts into the files above and only
then marks the manifest ``complete``. A killed run leaves ``status: running`` with its finished
parts, and ``RunWriter(..., resume=True)`` carries on after the last finished iteration.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim import dirlock, rundir, safeio, traffic_io
from moesim.errors import MoesimError
from moesim.ops import PHASES

SCHEMA = 1
SUMMARY_COLUMNS = (
    "iteration", "step_time_s", "moe_time_s", "a2a_time_s", "straggler_ratio",
    "tokens_total", "tokens_dropped", "peak_memory_bytes", "relayout_bytes", "planner_time_s",
)
ARRAY_FILES = {
    "times.npz": ("busy_s", "start_s", "end_s"),
    "load.npz": ("expert_load", "rank_tokens", "dropped"),
    "memory.npz": ("memory_bytes",),
    "traffic.npz": traffic_io.COO_KEYS,
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half
    (with the user's umask; see :mod:`moesim.safeio`)."""
    safeio.atomic_write_bytes(path, data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=_json_default).encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@dataclass
class IterationRecord:
    """Everything one backend measured or predicted for one iteration."""

    iteration: int
    summary: dict[str, float]
    busy_s_LFR: np.ndarray
    start_s_LFR: np.ndarray
    end_s_LFR: np.ndarray
    expert_load_LE: np.ndarray
    rank_tokens_LR: np.ndarray
    dropped_LR: np.ndarray
    memory_CR: dict[str, np.ndarray]
    timeline: list[dict] | None = None
    traffic_FRR: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        comps = sorted(self.memory_CR)
        extra = {} if self.traffic_FRR is None else traffic_io.record_arrays(
            self.iteration, self.traffic_FRR, int(np.shape(self.traffic_FRR)[-1]))
        return extra | {
            "busy_s": self.busy_s_LFR.astype(np.float32),
            "start_s": self.start_s_LFR.astype(np.float32),
            "end_s": self.end_s_LFR.astype(np.float32),
            "expert_load": self.expert_load_LE.astype(np.int64),
            "rank_tokens": self.rank_tokens_LR.astype(np.int64),
            "dropped": self.dropped_LR.astype(np.int64),
            "memory_bytes": np.stack([np.asarray(self.memory_CR[c], dtype=np.float64)
                                      for c in comps]) if comps else np.zeros((0, 0)),
            "components": np.array(comps, dtype=str),
        }


class RunWriter:
    """Streams iteration records into a run directory, atomically and resumably."""

    def __init__(self, out_dir: str | Path, config: dict, backend: str, *, resume: bool = False,
                 chunk: int = 10) -> None:
        self.out = Path(out_dir)
        self.backend = backend
        self.chunk = max(1, chunk)
        self._pending: list[IterationRecord] = []
        self._summaries: list[dict] = []
        dirlock.acquire(self.out, "run directory")
        try:
            rundir.prepare(self.out, config, resume)
            (self.out / "parts").mkdir(exist_ok=True)
            atomic_write_json(self.out / "config.json", config)
            self.done = self._load_done()
            self._write_manifest("running")
        except BaseException:
            dirlock.release(self.out)
            raise

    # -- resume support ---------------------------------------------------------------------
    def _part_files(self) -> list[Path]:
        return sorted((self.out / "parts").glob("part-*.npz"))

    def _load_done(self) -> list[int]:
        done: list[int] = []
        for part in self._part_files():
            iterations, summaries = rundir.read_part(part)
            done.extend(iterations)
            self._summaries.extend(summaries)
        return done

    @property
    def summaries(self) -> list[dict]:
        """The summary rows of every iteration written so far (earlier invocations too)."""
        return sorted(self._summaries, key=lambda r: r["iteration"])

    def resume_after(self) -> int | None:
        """The last iteration already written, or None."""
        return max(self.done) if self.done else None

    def last_state(self) -> dict | None:
        """Opaque state the producer stored with the last part (e.g. the last placement)."""
        parts = self._part_files()
        if not parts:
            return None
        return rundir.read_part_state(parts[-1])

    # -- writing ----------------------------------------------------------------------------
    def add(self, record: IterationRecord, state: dict | None = None) -> None:
        """Queue one iteration; every ``chunk`` iterations a part lands on disk atomically.

        ``state`` is what the producer needs to resume after this iteration (JSON-ready).
        """
        self._pending.append(record)
        self._state = state or {}
        if record.timeline is not None:
            atomic_write_json(self.out / f"timeline_iter{record.iteration}.json",
                              {"traceEvents": record.timeline, "displayTimeUnit": "ms"})
        if len(self._pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        recs = self._pending
        per = [r.arrays() for r in recs]
        arrays = {k: (np.concatenate if k in traffic_io.COO_KEYS else np.stack)(
            [p[k] for p in per]) for k in per[0] if k != "components"}
        arrays["components"] = per[0]["components"]
        arrays["iterations"] = np.array([r.iteration for r in recs], dtype=np.int64)
        summaries = [dict(r.summary, iteration=r.iteration) for r in recs]
        arrays["summary_json"] = np.frombuffer(json.dumps(summaries, default=_json_default)
                                               .encode(), dtype=np.uint8)
        arrays["state_json"] = np.frombuffer(json.dumps(getattr(self, "_state", {}),
                                                        default=_json_default).encode(),
                                             dtype=np.uint8)
        name = f"part-{len(self._part_files()):05d}.npz"
        atomic_write_bytes(self.out / "parts" / name, _npz_bytes(arrays))
        self.done.extend(r.iteration for r in recs)
        self._summaries.extend(summaries)
        self._pending = []
        self._write_manifest("running")

    def finish(self, status: str = "complete", error: str = "") -> Path:
        """Consolidate parts into the final files; mark the manifest ``status``."""
        self.flush()
        parts = self._part_files()
        if parts:
            loaded = [traffic_io.upgrade_part(rundir.load_part_arrays(p)) for p in parts]
            for fname, keys in ARRAY_FILES.items():
                if not all(k in z for z in loaded for k in keys):
                    continue  # e.g. traffic from a producer that does not record it
                arrays = {k: np.concatenate([z[k] for z in loaded]) for k in keys}
                arrays["iterations"] = np.concatenate([z["iterations"] for z in loaded])
                if fname == "times.npz":
                    arrays["phases"] = np.array(PHASES, dtype=str)
                if fname == "memory.npz":
                    arrays["components"] = loaded[0]["components"]
                if fname == "traffic.npz":
                    arrays["traffic_format"] = np.array(traffic_io.FORMAT)
                atomic_write_bytes(self.out / fname, _npz_bytes(arrays))
        atomic_write_bytes(self.out / "iterations.csv", _summary_csv(self._summaries))
        self._write_manifest(status, error)
        dirlock.release(self.out)
        return self.out

    def _write_manifest(self, status: str, error: str = "") -> None:
        atomic_write_json(self.out / "manifest.json", {
            "schema": SCHEMA, "status": status, "backend": self.backend,
            "iterations": sorted(self.done), "error": error,
        })


_comparable = rundir.comparable


def _summary_csv(rows: list[dict]) -> bytes:
    cols = list(SUMMARY_COLUMNS)
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["iteration"]):
        writer.writerow({k: row.get(k, "") for k in cols})
    return buf.getvalue().encode()


@dataclass
class RunResult:
    """A run directory, loaded. ``complete`` is False for interrupted or failed runs."""

    path: Path
    manifest: dict
    config: dict
    summary: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def backend(self) -> str:
        return self.manifest.get("backend", "")

    def __getitem__(self, name: str) -> np.ndarray:
        if name == traffic_io.DENSE_KEY and name not in self.arrays \
                and traffic_io.has_traffic(self.arrays):   # the dense view, built once
            self.arrays[name] = traffic_io.dense_IFRR(self.arrays)
        return self.arrays[name]

    def has(self, name: str) -> bool:
        """Whether the run holds array ``name`` (``traffic_bytes``: in either format)."""
        if name == traffic_io.DENSE_KEY:
            return traffic_io.has_traffic(self.arrays)
        return name in self.arrays


def load_run(path: str | Path) -> RunResult:
    """Read a run directory written by :class:`RunWriter` (any status)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise MoesimError(f"{path} is not a moesim run directory (no manifest.json); point at a "
                          "directory written by `moesim simulate` or `moesim run`")
    manifest, config = rundir.read_manifest(path), rundir.read_config(path)
    summary: dict[str, np.ndarray] = {}
    csv_path = path / "iterations.csv"
    if csv_path.is_file():
        rows = rundir.read_summary_csv(csv_path)
        for col in (rows[0].keys() if rows else SUMMARY_COLUMNS):
            summary[col] = np.array([_num(r.get(col)) for r in rows])
    arrays: dict[str, np.ndarray] = {}
    for fname in ARRAY_FILES:
        fpath = path / fname
        if fpath.is_file():
            loaded = rundir.load_arrays(fpath)
            arrays.update({k: v for k, v in loaded.items() if k != "iterations"})
            if "iterations" in loaded:
                arrays["iterations"] = loaded["iterations"]
    return RunResult(path=path, manifest=manifest, config=config, summary=summary,
                     arrays=arrays)


def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")
