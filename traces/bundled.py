"""The bundled demo trace: synthetic, shaped like the SmartMoE-AE GPT-MoE training run.

24 layers, 16 ranks, 32 experts, top-2, 2048 tokens per rank, 4 micro-batches per iteration,
20 iterations 10 apart (1, 11, ..., 191: the skew transient and what follows), drawn by
:func:`moesim.traces.synthesize` with :meth:`SynthConfig.smartmoe_like` and seed
:data:`BUNDLED_SEED`. It holds no recorded data (the SmartMoE trace is GPL-3.0 and stays out of
the project). Regenerate it with ``python -m moesim.traces.bundled``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moesim.traces.format import RoutingTrace
from moesim.traces.io import save_trace
from moesim.traces.synth import SynthConfig, synthesize

BUNDLED_SEED = 20230710
BUNDLED_NAME = "bundled.npz"
BUNDLED_ALIASES = ("bundled", "default")  # trace names that mean the bundled trace


def bundled_config() -> SynthConfig:
    """The recipe of the bundled trace."""
    return SynthConfig.smartmoe_like(num_iterations=20, model="gpt-moe (SmartMoE-like, synthetic)")


def bundled_trace_path() -> Path:
    """Path of the bundled demo trace (``traces/data/bundled.npz`` inside the package)."""
    return Path(__file__).resolve().parent / "data" / BUNDLED_NAME


def named_trace_path(name: str | Path | None) -> Path:
    """The trace file a trace argument names: an existing path as it is; ``None`` or one of
    :data:`BUNDLED_ALIASES` (``bundled``, what search rows and configs write) the bundled
    trace; anything else as a path (the caller reports a missing one)."""
    if name is None:
        return bundled_trace_path()
    path = Path(name)
    if not path.exists() and str(name) in BUNDLED_ALIASES:
        return bundled_trace_path()
    return path


def make_bundled_trace() -> RoutingTrace:
    """Draw the bundled trace from its recipe (deterministic)."""
    return synthesize(bundled_config(), rng=BUNDLED_SEED, workers=1)


def regenerate_bundled(path: Path | None = None) -> Path:
    """Write the bundled trace to ``path`` (default: :func:`bundled_trace_path`)."""
    return save_trace(make_bundled_trace(), path or bundled_trace_path())


if __name__ == "__main__":
    print(regenerate_bundled(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
