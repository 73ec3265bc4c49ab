"""Paired ablation of calibrate's context factors on a finished accuracy grid.

    python benchmarks/context_ablation.py runs/accuracy     # a benchmarks/accuracy.py --out DIR

Re-predicts every configuration of the grid with its own profile, once as written and once per
ablation, and compares each prediction with the *same* measured runs. Ablations:

- ``none`` — no context factors (the microbenchmark-only profile);
- ``classes`` — only the pooled per-class factors (``all_to_all``, ``compute``, …);
- ``no-compute`` — the factors of every class except ``compute``.

Because the measurements are shared, the differences between columns are the factors' effect
alone, free of the run-to-run noise that separates two grids (7–13 % per iteration on the
2-vCPU VM). Prints per-iteration step-time MAPE per configuration and a summary per world
size. Takes seconds: only the simulator runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

ABLATIONS = {
    "as written": lambda f: f,
    "none": lambda f: {},
    "classes": lambda f: {k: v for k, v in f.items() if "." not in k},
    "no-compute": lambda f: {k: v for k, v in f.items() if not k.startswith("compute")},
}


def configurations(grid: Path) -> list[dict]:
    """The grid's configurations from its ``accuracy.csv`` (one row per configuration)."""
    path = grid / "accuracy.csv"
    if not path.is_file():
        raise MoesimError(f"{path} is missing; pass the --out directory of a finished "
                          "benchmarks/accuracy.py run")
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r["quantity"] == "step"]


def profile_of(grid: Path, row: dict) -> Path:
    """The profile the configuration was predicted with (its own, else its world size's)."""
    for name in (f"{row['config']}-profile.toml", f"cpu-gloo-w{row['world_size']}.toml",
                 f"cuda-nccl-w{row['world_size']}.toml"):
        if (grid / name).is_file():
            return grid / name
    raise MoesimError(f"no profile for {row['config']} in {grid}")


def ablate(grid: Path, row: dict) -> dict[str, float]:
    """Step-time MAPE of one configuration under every ablation."""
    from moesim.analysis.validation import compare_runs
    from moesim.executor.validate import _policy
    from moesim.executor.worker import resolve_cluster
    from moesim.rerun import rerun_inputs
    from moesim.results import load_run
    from moesim.simulate import simulate
    from moesim.specs import load_model

    world, cfg = int(row["world_size"]), grid / row["config"]
    layout = rerun_inputs(cfg / "predicted" / "config.json").layout  # None: the default
    cluster = resolve_cluster(str(profile_of(grid, row)), world, cuda=False)
    predicted = load_run(cfg / "predicted").config
    measured = [load_run(m) for m in sorted(cfg.glob("measured*"))]
    model = load_model(predicted["model"]["name"])
    _, _, policy = _policy(row["policy"])
    out = {}
    for name, keep in ABLATIONS.items():
        hw = dataclasses.replace(cluster.hardware,
                                 context_factors=keep(cluster.hardware.context_factors))
        with tempfile.TemporaryDirectory() as tmp:
            simulate(predicted["trace"]["path"], model,
                     dataclasses.replace(cluster, hardware=hw), policy,
                     iterations=tuple(predicted["iterations"]), out_dir=Path(tmp) / "p",
                     progress=False, layout=layout)
            out[name] = compare_runs(load_run(Path(tmp) / "p"), measured).step.mape_pct
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="the --out directory of benchmarks/accuracy.py")
    args = p.parse_args(argv)
    grid = Path(args.grid)
    rows = configurations(grid)
    results = [(row, ablate(grid, row)) for row in rows]
    print(f"{'configuration':45s}" + "".join(f"{n:>12s}" for n in ABLATIONS))
    for row, res in results:
        print(f"{row['config']:45s}" + "".join(f"{res[n]:11.1f}%" for n in ABLATIONS))
    for world in sorted({int(r["world_size"]) for r in rows}):
        errs = {n: [res[n] for row, res in results if int(row["world_size"]) == world]
                for n in ABLATIONS}
        print(f"world size {world}, mean / max / configurations <= 10 %: " + "; ".join(
            f"{n} {np.mean(e):.1f} / {np.max(e):.1f} / {sum(x <= 10 for x in e)}"
            f"/{len(e)}" for n, e in errs.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoesimError as exc:
        print(f"context_ablation: error: {exc}", file=sys.stderr)
        sys.exit(2)
