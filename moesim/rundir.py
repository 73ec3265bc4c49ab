"""Run directories on disk: whether one may be (re)used, and reading its pieces safely.

:func:`prepare` decides what :class:`moesim.results.RunWriter` may do with ``--out``: a new or
empty directory is used; a run directory with no finished iteration (an error in iteration 0
left it) is replaced; ``resume`` continues one whose configuration matches. Every reader here
turns a damaged file (a manifest holding ``[1]``, a binary ``iterations.csv``, a truncated
``.npz`` or part file, a corrupt ``config.json``) into a one-line :class:`MoesimError` naming
the file and the repair.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moesim.dirlock import LOCK_NAME
from moesim.errors import MoesimError

# What a RunWriter (and the executor's launcher) puts in a run directory.
RUN_ENTRIES = ("manifest.json", "config.json", "iterations.csv", "times.npz", "load.npz",
               "memory.npz", "parts", "logs")
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError)


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds besides its lock file and a live launcher's ``.logs``."""
    return [p for p in out.iterdir() if p.name not in (LOCK_NAME, ".logs")]


def _ours(entry: Path) -> bool:
    name = entry.name
    return name in RUN_ENTRIES or (name.startswith("timeline_iter") and name.endswith(".json")) \
        or (name.startswith(".") and name.endswith(".tmp"))


def comparable(config: dict) -> dict:
    """The part of a run's configuration that must match for ``--resume``."""
    return {k: v for k, v in config.items() if k not in ("started_at", "argv", "iterations")}


def prepare(out: Path, config: dict, resume: bool, can_resume: bool = True) -> None:
    """Make ``out`` ready for a RunWriter (the caller holds its lock), or raise.
    ``can_resume``: whether the command has ``--resume`` (its error message offers it)."""
    entries = _entries(out)
    if not entries:
        return
    manifest = out / "manifest.json"
    if not manifest.is_file():
        raise MoesimError(f"output directory {out} is not empty and is not a moesim run "
                          "directory (no manifest.json); choose a new --out")
    info = read_manifest(out)
    if resume and comparable(read_config(out)) == comparable(config):
        return
    if _unfinished(out, info, entries):
        _clear(entries)  # nothing finished there: an earlier attempt failed at the start
        return
    if not resume:
        offer = "pass --resume to continue that run, or " if can_resume else ""
        raise MoesimError(f"output directory {out} is not empty; {offer}choose a new --out")
    raise MoesimError(f"cannot resume {out}: its config differs from this run's; use the "
                      "same options or a new --out")


def _unfinished(out: Path, manifest: dict, entries: list[Path]) -> bool:
    """True when ``out`` holds a run with no finished iteration and only moesim's files."""
    parts = list((out / "parts").glob("part-*.npz")) if (out / "parts").is_dir() else []
    return (manifest.get("status") != "complete" and not manifest.get("iterations")
            and not parts and all(_ours(e) for e in entries))


def _clear(entries: list[Path]) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _json_file(path: Path, kind: type, repair: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoesimError(f"{path} is missing; {repair}") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = type(exc).__name__ if isinstance(exc, RecursionError) else str(exc)[:80]
        raise MoesimError(f"{path} is unreadable ({reason}); {repair}") from None
    if not isinstance(data, kind):
        raise MoesimError(f"{path} holds a JSON {type(data).__name__}, not an object; {repair}")
    return data


def read_manifest(out: Path) -> dict:
    """``out/manifest.json`` as a dict, or a MoesimError naming it and the repair."""
    info = _json_file(out / "manifest.json", dict,
                      f"the run directory {out} is damaged; re-run it into a new --out")
    its = info.get("iterations", [])
    if not isinstance(info.get("status", ""), str) or not isinstance(its, list) \
            or not all(isinstance(i, int) for i in its):
        raise MoesimError(f"{out / 'manifest.json'} has a malformed status or iteration list; "
                          "the run directory is damaged, re-run it into a new --out")
    return info


def read_config(out: Path) -> dict:
    """``out/config.json`` as a dict, or a MoesimError naming it and the repair."""
    return _json_file(out / "config.json", dict,
                      f"the run directory {out} is damaged; re-run it into a new --out")


def read_part(part: Path) -> tuple[list[int], list[dict]]:
    """The iterations and summary rows of one finished chunk ``parts/part-N.npz``."""
    try:
        with np.load(part, allow_pickle=False) as z:
            iterations = [int(i) for i in z["iterations"]]
            summaries = json.loads(bytes(z["summary_json"]).decode())
    except NPZ_ERRORS as exc:
        raise MoesimError(_part_damage(part, exc)) from None
    if not isinstance(summaries, list) or not all(isinstance(r, dict) for r in summaries):
        raise MoesimError(_part_damage(part, ValueError("bad summary")))
    return iterations, summaries


def read_part_state(part: Path) -> dict:
    """The producer state stored with one finished chunk."""
    try:
        with np.load(part, allow_pickle=False) as z:
            state = json.loads(bytes(z["state_json"]).decode())
    except NPZ_ERRORS as exc:
        raise MoesimError(_part_damage(part, exc)) from None
    return state if isinstance(state, dict) else {}


def load_part_arrays(part: Path) -> dict[str, np.ndarray]:
    """Every array of one finished chunk, loaded."""
    try:
        with np.load(part, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except NPZ_ERRORS as exc:
        raise MoesimError(_part_damage(part, exc)) from None


def _part_damage(part: Path, exc: BaseException) -> str:
    return (f"{part} is damaged ({type(exc).__name__}); delete it and every later part-*.npz "
            "to redo those iterations with --resume, or re-run into a new --out")


def read_summary_csv(path: Path) -> list[dict]:
    """The rows of ``iterations.csv`` (strings), or a MoesimError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
        if "\0" in text:
            raise ValueError("NUL byte")
        return list(csv.DictReader(io.StringIO(text)))
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise MoesimError(f"{path} is not a readable CSV ({type(exc).__name__}); the run "
                          f"directory is damaged, re-run it into a new --out") from None


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one consolidated ``.npz`` of a run, or a MoesimError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            return {k: z[k] for k in z.files}
    except NPZ_ERRORS as exc:
        raise MoesimError(f"{path} is damaged ({type(exc).__name__}); re-run into a new --out, "
                          "or `moesim simulate --resume` the run to rewrite it from its parts"
                          ) from None
