"""Routing traces: the format, storage, validation, importers and synthetic generators.

``RoutingTrace.counts_TLRE[t, l, r, e]`` = token assignments from rank ``r`` to expert ``e`` of
layer ``l`` in pass ``t`` (schema in :mod:`moesim.traces.format`).
"""

from moesim.traces.bundled import bundled_trace_path
from moesim.traces.format import SCHEMA_VERSION, RoutingTrace, TraceMeta
from moesim.traces.importers import (
    export_csv,
    import_csv,
    import_eplb,
    import_sglang,
    import_smartmoe,
)
from moesim.traces.io import load_trace, save_trace
from moesim.traces.synth import SynthConfig, synthesize
from moesim.traces.transform import spread_over_ranks
from moesim.traces.validate import validate

__all__ = [
    "SCHEMA_VERSION", "RoutingTrace", "SynthConfig", "TraceMeta", "bundled_trace_path",
    "export_csv", "import_csv", "import_eplb", "import_sglang", "import_smartmoe", "load_trace",
    "save_trace", "spread_over_ranks", "synthesize", "validate",
]
