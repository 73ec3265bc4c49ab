"""Write ``schedules.npz``: every golden case's schedule and records (see ``cases.py``).

Run from the repository root: ``python -m tests.sim.golden.make_golden``. The committed file was
written by the engine before the scale work of issue 16 (commit noted in the file's ``source``
entry); rerun it only to capture a deliberate change of the simulator's outputs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from .cases import cases, flatten, run_case

OUT = Path(__file__).with_name("schedules.npz")


def main() -> None:
    entries: dict[str, np.ndarray] = {}
    for case in cases():
        entries.update(flatten(case[0], run_case(case)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=OUT.parent).stdout.strip()
    entries["source"] = np.array(head)
    tmp = OUT.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **entries)
    tmp.replace(OUT)
    print(f"wrote {OUT} ({len(cases())} cases, {OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
