"""Check a whole search spec before anything runs.

Every distinct trace, model, cluster, policy + knobs, iteration range and seed of the
configurations is built once, the way the simulator will build it; the first bad one is
refused with a one-line :class:`MoesimError` naming the configuration and the fix. So a typo
(an unknown knob, model or trace, ``iterations = "garbage"``, cluster ``@0``) costs nothing
and never turns into a search whose every configuration "failed" with exit code 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moesim import validation
from moesim.errors import MoesimError
from moesim.safeio import check_input_kind

from .search_spec import describe


def check_configs(configs: Sequence[dict], where: str | Path = "spec") -> None:
    """Build each distinct input of ``configs`` once; MoesimError on the first bad one."""
    from moesim.policies import make_policy
    from moesim.specs import load_model

    from .simulate_adapter import BUNDLED, iterations_arg, load_cluster_arg

    seen: set[tuple] = set()
    for config in configs:
        label = f"{where}: configuration {describe(config)}"
        for axis in ("trace", "model", "cluster"):
            value = config.get(axis)
            if value is not None and not isinstance(value, str):
                raise MoesimError(f"{label}: {axis} = {value!r}; give {axis}s as names or "
                                  "paths in quotes")
        checks = [("policy", (config["policy"], _frozen(config.get("knobs"))),
                   lambda c=config: make_policy(c["policy"], dict(c.get("knobs") or {}))),
                  ("iterations", config.get("iterations"),
                   lambda c=config: iterations_arg(c.get("iterations"))),
                  ("seed", config.get("seed"),
                   lambda c=config: validation.seed(c.get("seed") or 0, "seed"))]
        for axis, loader in (("model", load_model), ("cluster", load_cluster_arg)):
            if not config.get(axis):
                raise MoesimError(f"{label} has no {axis}; add {axis}s = [...] to the spec's "
                                  "[search] table")
            checks.append((axis, config[axis], lambda v=config[axis], f=loader: f(v)))
        trace = config.get("trace")
        if trace is not None and str(trace) not in BUNDLED:
            checks.append(("trace", trace, lambda t=trace: _check_trace(t)))
        for axis, value, build in checks:
            if (axis, value) in seen:
                continue
            try:
                build()
            except MoesimError as exc:
                raise MoesimError(f"{label}: {axis}: {exc}") from None
            seen.add((axis, value))


def _check_trace(path: str) -> None:
    if not Path(path).exists():
        raise MoesimError(f"no trace file {path!r}; check the path in the spec (paths are "
                          "relative to the spec's folder)")
    check_input_kind(path, "trace")


def _frozen(knobs: dict | None) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in (knobs or {}).items()))
