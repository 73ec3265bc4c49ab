"""Start-up time of the ``moesim`` commands (target: under 1 s for every command that does not
run the executor or a recorder).

Usage::

    python benchmarks/startup.py [--repeats 5]

Each command runs as a fresh ``python -m moesim ... --help`` process (``--version`` and
``presets`` as they are): the time to import the CLI, build its parser and parse, which is the
start-up every invocation pays before any work. Prints the median and the worst wall time of
``--repeats`` runs, and whether torch was imported (it must not be, outside ``run``/``record``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (
    ["--version"], ["simulate", "--help"], ["trace", "info", "--help"], ["plot", "--help"],
    ["report", "--help"], ["search", "--help"], ["presets"], ["policies"],
    ["validate", "--help"], ["run", "--help"],
)
PROBE = ("import runpy, sys\nsys.argv = ['moesim', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('moesim', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'notorch')\n")


def time_command(argv: list[str]) -> tuple[float, bool]:
    """Wall seconds of one fresh process running ``moesim ARGV``, and whether torch loaded."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    return wall_s, proc.stderr.endswith("TORCH")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    args = ap.parse_args()
    print(f"{'command':<22} {'median s':>9} {'max s':>7}  torch")
    for argv in COMMANDS:
        runs = [time_command(argv) for _ in range(args.repeats)]
        times = [t for t, _ in runs]
        print(f"{' '.join(argv):<22} {statistics.median(times):>9.3f} {max(times):>7.3f}  "
              f"{'yes' if any(t for _, t in runs) else 'no'}")


if __name__ == "__main__":
    main()
