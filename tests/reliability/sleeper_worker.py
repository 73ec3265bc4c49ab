"""A stand-in rank for the supervision tests (``python -m sleeper_worker``, no torch).

Rank 0 opens a RunWriter on ``--out`` (the launcher owns the directory's lock), every rank
beats once and sleeps ``SLEEP_S`` seconds, then rank 0 marks the run ``complete``: if a rank
outlived a killed launcher, the run would wrongly read complete.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moesim import supervise
from moesim.results import RunWriter


def main() -> int:
    supervise.from_environment()
    args = sys.argv[1:]
    out = args[args.index("--out") + 1]
    hb_dir = args[args.index("--heartbeat-dir") + 1]
    rank = int(os.environ["RANK"])
    writer = RunWriter(out, {"test": "sleeper"}, "executor") if rank == 0 else None
    (Path(hb_dir) / f"rank{rank}").touch()
    time.sleep(float(os.environ.get("SLEEP_S", "3")))
    if writer is not None:
        writer.finish("complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
