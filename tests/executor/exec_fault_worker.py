"""A stand-in worker for the launcher's failure tests (started as ``python -m exec_fault_worker``).

``FAULT=die``: rank 1 exits with code 3 after a moment, the others wait forever (as a rank
blocked in a collective would). ``FAULT=hang``: every rank stops beating and sleeps. Rank 0
opens a RunWriter first, so the launcher must finish the run as ``incomplete``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moesim.results import RunWriter  # light: numpy only (no torch), so start-up is quick


def main() -> int:
    args = sys.argv[1:]
    out = args[args.index("--out") + 1]
    hb_dir = args[args.index("--heartbeat-dir") + 1]
    rank = int(os.environ["RANK"])
    if rank == 0:
        RunWriter(out, {"test": "fault"}, "executor")
    (Path(hb_dir) / f"rank{rank}").touch()  # one heartbeat, then silence
    if os.environ.get("FAULT") == "die" and rank == 1:
        time.sleep(0.5)
        print("moesim: error: injected failure", file=sys.stderr)
        return 3
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
