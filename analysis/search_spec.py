"""Search specs: which configurations an offline policy search runs.

A spec is a TOML file or a Python file.

TOML — lists expand to a cartesian product; each ``[policies.NAME]`` table is that policy's knob
grid (a scalar is a one-value list; ``"none"`` means ``None``, e.g. dropless capacity)::

    [search]
    traces = ["bundled"]            # trace names/paths; "bundled" = the bundled sample trace
    models = ["gpt-moe-s"]          # model presets or paths (omit: the trace's own model)
    clusters = ["a100-4x8-ib800@2"] # cluster presets or paths; NAME@N = N nodes of it
    iterations = 20                 # first N iterations, or "5:15" (omit: the whole trace)
    seeds = [0]
    parallel = ["laer-fsep", "tp=2,sp=true"]  # --parallel layouts (omit: the default)

    [policies.static_ep]
    capacity_factor = [1.0, 1.25, "none"]

    [policies.swiftmoe]
    slots_per_rank = [2, 4]
    capacity_factor = [1.0, 1.25, "none"]

Python — a file defining ``def configs() -> Iterable[dict]``; each dict has ``policy`` and
optionally ``knobs``, ``trace``, ``model``, ``cluster``, ``iterations``, ``seed``,
``parallel`` (a ``--parallel`` string; absent = the default layout, and then the config's key
is what it was before layouts existed).

Each configuration is a plain JSON-ready dict with exactly those keys; its *key*
(``config_key``) names it in ``results.jsonl`` and ``runs/``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import runpy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moesim import validation
from moesim.errors import MoesimError
from moesim.policies import available_policies

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE_SPEC = Path(__file__).parent / "examples" / "search_smartmoe.toml"
AXES = {"traces": "trace", "models": "model", "clusters": "cluster", "seeds": "seed",
        "iterations": "iterations", "parallels": "parallel"}
CONFIG_KEYS = ("policy", "knobs", "trace", "model", "cluster", "iterations", "seed",
               "parallel")


def load_spec(path: str | Path | None = None) -> list[dict]:
    """The configurations a spec declares, validated (MoesimError on a bad spec)."""
    path = Path(path) if path is not None else EXAMPLE_SPEC
    if not path.is_file():
        raise MoesimError(f"search spec {path} not found; give a .toml or .py spec file")
    if path.suffix == ".py":
        configs = _python_configs(path)
    elif path.suffix == ".toml":
        configs = _toml_configs(path)
    else:
        raise MoesimError(f"search spec {path} must be a .toml grid or a .py file defining "
                          "configs()")
    configs = [_resolve_paths(normalize(c, path), path.parent) for c in configs]
    if not configs:
        raise MoesimError(f"search spec {path} declares no configurations; add a "
                          "[policies.NAME] table (or make configs() yield dicts)")
    return _dedupe(configs)


def _toml_configs(path: Path) -> list[dict]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MoesimError(f"cannot parse search spec {path}: {exc}; fix the TOML") from None
    unknown = sorted(set(data) - {"search", "policies"})
    if unknown:
        raise MoesimError(f"{path}: unknown table(s) {unknown}; a spec has [search] and "
                          "[policies.NAME] tables")
    axes = _axes(data.get("search", {}), path)
    policies = data.get("policies", {})
    if not isinstance(policies, dict) or not policies:
        raise MoesimError(f"search spec {path} declares no policies; add a [policies.NAME] "
                          "table per policy to search")
    out = []
    for name, grid in policies.items():
        if not isinstance(grid, dict):
            raise MoesimError(f"{path}: policies.{name} must be a table of knob = [values]")
        for knobs in _product(grid):
            for combo in _product(axes):
                out.append({"policy": name, "knobs": knobs, **combo})
    return out


def _axes(search: dict, path: Path) -> dict[str, list]:
    if not isinstance(search, dict):
        raise MoesimError(f"{path}: [search] must be a table")
    unknown = sorted(set(search) - set(AXES) - set(AXES.values()))
    if unknown:
        raise MoesimError(f"{path}: unknown [search] key(s) {unknown}; known keys are "
                          f"{sorted(AXES)}")
    return {AXES.get(k, k): v for k, v in search.items()}


def _product(grid: dict[str, Any]) -> list[dict]:
    """Cartesian product of a dict of lists (scalars are one-value lists)."""
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    if any(not v for v in values):
        empty = [k for k, v in zip(keys, values, strict=True) if not v]
        raise MoesimError(f"empty value list for {empty}; give at least one value")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _python_configs(path: Path) -> list[dict]:
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # the user's file: report, don't crash
        raise MoesimError(f"search spec {path} failed to load: {type(exc).__name__}: "
                          f"{exc}") from None
    fn = namespace.get("configs")
    if not callable(fn):
        raise MoesimError(f"search spec {path} must define `def configs() -> Iterable[dict]`")
    try:
        return list(fn())
    except Exception as exc:
        raise MoesimError(f"{path}: configs() raised {type(exc).__name__}: {exc}") from None


def normalize(config: Any, where: str | Path = "spec") -> dict:
    """A config dict with exactly ``CONFIG_KEYS``; the policy must be registered."""
    if not isinstance(config, dict) or "policy" not in config:
        raise MoesimError(f"{where}: each configuration must be a dict with a 'policy' key, "
                          f"got {config!r:.80}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise MoesimError(f"{where}: unknown configuration key(s) {unknown}; known keys are "
                          f"{list(CONFIG_KEYS)}")
    known = available_policies()
    if config["policy"] not in known:
        raise MoesimError(f"{where}: unknown policy {config['policy']!r}; choose one of "
                          f"{', '.join(known)}")
    knobs = config.get("knobs") or {}
    if not isinstance(knobs, dict):
        raise MoesimError(f"{where}: knobs of {config['policy']} must be a table/dict")
    out = {k: config.get(k) for k in CONFIG_KEYS if k != "parallel"}
    out["knobs"] = {k: knobs[k] for k in sorted(knobs)}
    out["seed"] = validation.seed(config.get("seed") or 0, f"{where}: seed")
    if config.get("parallel"):
        from moesim.layout import parse_layout

        try:
            parse_layout(str(config["parallel"]))
        except MoesimError as exc:
            raise MoesimError(f"{where}: {exc}") from None
        out["parallel"] = str(config["parallel"])
    return out


def _resolve_paths(config: dict, base: Path) -> dict:
    """Trace / model / cluster files named relative to the spec resolve against its folder."""
    for axis in ("trace", "model", "cluster"):
        value = config.get(axis)
        if isinstance(value, str) and Path(value).suffix and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                config[axis] = str(candidate.resolve())
    return config


def config_key(config: dict) -> str:
    """A stable, filesystem-safe name: ``<policy>-<12 hex digits of the config's hash>``."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", str(config["policy"]))
    return f"{slug}-{hashlib.sha1(blob).hexdigest()[:12]}"


def describe(config: dict) -> str:
    """``policy k=v k=v`` — a short human label of a config's policy and knobs."""
    knobs = " ".join(f"{k}={v}" for k, v in config.get("knobs", {}).items())
    layout = f" [--parallel {config['parallel']}]" if config.get("parallel") else ""
    return f"{config['policy']} {knobs}".strip() + layout


def _dedupe(configs: Iterable[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for c in configs:
        seen.setdefault(config_key(c), c)
    return list(seen.values())
