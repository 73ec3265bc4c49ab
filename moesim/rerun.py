"""Repeat a finished run: the inputs of ``simulate`` read back from a run's ``config.json``
(``moesim simulate --config RUN/config.json``).

The stored config holds the model and cluster as full tables (not preset names, so an edited
preset cannot change a repeat), the policy with every knob, the trace's path, the seed, the OOM
option and the iteration range; this module turns them back into objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError

KEYS = ("model", "cluster", "policy", "trace", "options", "iterations")


@dataclass(frozen=True, kw_only=True)
class RerunInputs:
    """What :func:`moesim.simulate.simulate` needs to repeat a run."""

    trace_path: Path
    model: Any
    cluster: Any
    policy: Any
    iterations: tuple[int, int] | list[int]
    rng_seed: int
    allow_oom: bool
    regroup: bool = False
    layout: Any = None


def read_config(path: str | Path) -> dict:
    """A run's ``config.json`` (or the run directory holding it) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoesimError(f"no run config at {path}; give RUN/config.json of a finished "
                          "run") from None
    except (OSError, ValueError) as exc:
        raise MoesimError(f"cannot read {path}: {exc}; give a run's config.json") from None
    missing = [k for k in KEYS if k not in config] if isinstance(config, dict) else list(KEYS)
    if missing:
        raise MoesimError(f"{path} is not a run's config.json (no {', '.join(missing)}); give "
                          "the config.json a simulate or run wrote")
    return config


def iterations_of(stored: list[int]) -> tuple[int, int] | list[int]:
    """``config.json``'s ``iterations``: ``[start, stop]`` of a contiguous range, else the
    list of indices."""
    if len(stored) == 2 and stored[1] > stored[0]:
        return (int(stored[0]), int(stored[1]))
    return [int(i) for i in stored]


def rerun_inputs(path: str | Path) -> RerunInputs:
    """The inputs that repeat the run whose ``config.json`` is at ``path``."""
    from moesim.policies import make_policy
    from moesim.specs import cluster_from_dict, model_from_dict

    path = Path(path)
    config = read_config(path)
    trace = config["trace"].get("path")
    if not trace:
        raise MoesimError(f"{path}: the run was given an in-memory trace (no path stored); it "
                          "cannot be repeated from its config")
    if not Path(trace).exists():
        raise MoesimError(f"{path}: the run's trace {trace} is gone; restore it or run with "
                          "--trace")
    policy = config["policy"]
    options = config.get("options") or {}
    layout = None
    if isinstance(config.get("parallel"), dict):  # the layout's own fields (not what it resolved)
        from moesim.layout import ParallelLayout, layout_from_dict

        par = config["parallel"]
        layout = layout_from_dict({f: par[f] for f in ParallelLayout.__dataclass_fields__
                                   if f in par}, f"{path}: parallel")
    return RerunInputs(
        trace_path=Path(trace), model=model_from_dict(config["model"], path),
        cluster=cluster_from_dict(config["cluster"], path),
        policy=make_policy(policy["name"], policy.get("knobs") or {}),
        iterations=iterations_of(config["iterations"]),
        rng_seed=int(options.get("rng_seed", 0)), allow_oom=bool(options.get("allow_oom")),
        regroup=bool(options.get("regroup")), layout=layout)
