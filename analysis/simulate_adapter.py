"""Turn one search configuration (a plain dict of names) into a ``moesim.simulate`` call.

Kept apart from ``search`` so the search machinery is testable without the simulator, and the
one place that knows simulate's signature stays small.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from moesim import validation
from moesim.errors import MoesimError
from moesim.traces.bundled import BUNDLED_ALIASES as BUNDLED  # noqa: F401  (search_check)

from .runs import as_run, summarize, summarize_columns


@lru_cache(maxsize=4)
def load_trace_arg(name: str | None) -> Any:
    """A RoutingTrace from a path; ``None`` or ``"bundled"`` is the bundled sample trace."""
    from moesim.traces.bundled import named_trace_path
    from moesim.traces.io import load_trace

    path = named_trace_path(name)
    if not path.exists():
        raise MoesimError(f"no trace file {name!r}; check the path in the spec")
    return load_trace(path)


def iterations_arg(value: Any) -> Any:
    """Spec ``iterations``: N → the first N iterations; ``"a:b"`` or (a, b) → a..b-1;
    None → all. The same rule as ``moesim simulate --iterations``
    (:func:`moesim.validation.iteration_range`)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = ":".join(str(validation.integer(v, "iterations =")) for v in value)
    return validation.iteration_range(value, "iterations =")


def load_cluster_arg(text: str) -> Any:
    """A cluster preset or file, optionally reshaped: ``NAME@N`` (N nodes) or ``NAME@NxG``
    (the scheme of :func:`moesim.specs.load_cluster`, which every command shares)."""
    from moesim.specs import load_cluster

    return load_cluster(str(text))


def build_inputs(config: dict) -> dict[str, Any]:
    """The objects simulate takes, built from a config's names (MoesimError on bad ones)."""
    from moesim.policies import make_policy
    from moesim.specs import load_model

    for axis in ("model", "cluster"):
        if not config.get(axis):
            raise MoesimError(f"configuration has no {axis}; add {axis}s = [...] to the spec's "
                              "[search] table")
    return {
        "trace": load_trace_arg(config.get("trace")),
        "model": load_model(config["model"]),
        "cluster": load_cluster_arg(config["cluster"]),
        "policy": make_policy(config["policy"], config.get("knobs") or {}),
    }


def simulate_summary(config: dict, run_dir: Path | None = None) -> dict:
    """Simulate ``config`` and summarise it.

    With ``run_dir`` the RunResult is written there (resuming a half-written one); without,
    nothing is written and the summary comes from simulate's per-iteration rows.
    """
    try:
        from moesim.simulate import simulate
    except ModuleNotFoundError as exc:
        raise MoesimError("the simulator (moesim.simulate) is not in this build; search "
                          "needs it") from exc
    from moesim.layout import parse_layout

    inputs = build_inputs(config)
    resume = run_dir is not None and run_dir.is_dir() and any(run_dir.iterdir())
    result = simulate(inputs["trace"], inputs["model"], inputs["cluster"], inputs["policy"],
                      iterations=iterations_arg(config.get("iterations")),
                      rng_seed=validation.seed(config.get("seed") or 0, "seed"),
                      out_dir=run_dir, resume=resume, progress=False,
                      layout=parse_layout(config.get("parallel")))
    if run_dir is not None:
        return summarize(as_run(run_dir))
    rows = result.rows
    return summarize_columns({k: [r.get(k, float("nan")) for r in rows]
                              for k in (rows[0] if rows else {})})
