"""Routing traces: the format, storage, validation, importers and synthetic generators."""

from moesim.traces.format import SCHEMA_VERSION, RoutingTrace, TraceMeta

__all__ = ["SCHEMA_VERSION", "RoutingTrace", "TraceMeta"]
