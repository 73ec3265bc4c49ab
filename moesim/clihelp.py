"""What every ``moesim`` command shares: help that shows defaults, ``--json`` output on stdout,
and aliases for the old spellings of renamed flags."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from typing import Any


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless its help already says its default,
    or the default is empty (None, False, [] or '')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], "") \
                or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (
                None, False, [], "", argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """:class:`DefaultsFormatter` that keeps the description's own line breaks."""


class Parser(argparse.ArgumentParser):
    """The parser class of ``moesim`` and all its subcommands (argparse passes it down to
    ``add_subparsers``): defaults shown in every ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fmt = kwargs.get("formatter_class", argparse.HelpFormatter)
        if fmt is argparse.RawDescriptionHelpFormatter:
            kwargs["formatter_class"] = RawDefaultsFormatter
        elif fmt in (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
            kwargs["formatter_class"] = DefaultsFormatter
        super().__init__(*args, **kwargs)


def add_json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--json``: machine-readable ``what`` on stdout (schemas in docs/cli.md)."""
    p.add_argument("--json", action="store_true",
                   help=f"write {what} as one JSON document on stdout (schema: docs/cli.md); "
                   "the human-readable lines go to stderr or are left out")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf → null, numpy scalars and arrays → Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    """Write ``obj`` as one JSON document (strict: no NaN) to stdout."""
    sys.stdout.write(json.dumps(_clean(obj), indent=1, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()
