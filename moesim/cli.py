"""The ``moesim`` command line.

Each command group lives next to the code it drives and exposes ``register(subparsers)``; this
module only assembles them and turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moesim import __version__
from moesim.clihelp import Parser
from moesim.errors import MoesimError
from moesim.safeio import guard_arguments, os_error_line
from moesim.validation import check_flags, flag_names

# Modules that add subcommands, in the order ``moesim --help`` lists them.
COMMAND_MODULES = (
    "moesim.traces.cli",       # moesim trace {import,info,synth,export,validate}
    "moesim.simulate_cli",     # moesim simulate
    "moesim.presets_cli",      # moesim presets
    "moesim.policies_cli",     # moesim policies
    "moesim.executor.cli",     # moesim run / calibrate / validate
    "moesim.analysis.cli",     # moesim search / plot / report
    "moesim.completion_cli",   # moesim completion
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moesim",
        description="Where should each MoE expert live, iteration by iteration, and what does "
        "that cost? Replay routing traces through placement policies, simulate step time, "
        "memory and drops, and check predictions on a real torch.distributed executor.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        guard_arguments(args)
        check_flags(args, flag_names(parser))
        return int(args.func(args) or 0)
    except MoesimError as exc:
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moesim ... --json | head`: the reader left; end quietly
        _silence_stdout()
        return 0
    except OSError as exc:  # any OS error left: one line naming the file, never a traceback
        print(f"moesim: error: {os_error_line(exc, exc.filename or '?', 'use')}",
              file=sys.stderr)
        return 2
    except RecursionError:
        print("moesim: error: an input is nested too deeply to read; check the files given",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moesim: interrupted; finished results were kept", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
