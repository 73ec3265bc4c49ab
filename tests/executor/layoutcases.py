"""Build layout programs for the executor's layout tests and run them on gloo in one launch.

:func:`layout_case` lowers one iteration of a small synthetic trace under a ``--parallel``
layout exactly as the simulator does (:func:`tests.sim.layouttoys.lower_one`); :func:`run_cases`
starts :mod:`moesim.executor.selfcheck` (``--cases``) once for a dict of such cases.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from moesim import layout_run
from moesim import simulate as sim
from moesim.executor.launch import launch
from moesim.layout import parse_layout
from moesim.policies import make_policy
from moesim.specs import load_cluster, load_model
from moesim.traces.synth import SynthConfig, synthesize
from tests.sim.layouttoys import lower_one

HANG_S = 90.0


def layout_case(parallel: str, world: int, policy: str = "static_ep", tokens: int = 64,
                micro_batches: int = 2, model_name: str = "tiny-cpu", seed: int = 0,
                **model_fields) -> dict:
    """``{"model", "layout", "items"}`` of one iteration under ``parallel`` at ``world``;
    ``policy`` is ``name[:knob=value...]``."""
    layout = parse_layout(parallel)
    model = load_model(model_name)
    if model_fields:
        model = model.replace(**model_fields)
    cluster = load_cluster("cpu-gloo-4").with_shape(1, world)
    cfg = SynthConfig(num_layers=model.num_layers, num_ranks=world // layout.pp,
                      num_experts=model.num_experts, top_k=model.top_k,
                      tokens_per_rank=tokens, micro_batches_per_iteration=micro_batches,
                      num_iterations=1, doc_tokens=32)
    trace = synthesize(cfg, rng=seed)
    name, *knobs = policy.split(":")
    pol = make_policy(name, dict(k.split("=", 1) for k in knobs))
    ctx, _, _ = lower_one(layout, trace, model, cluster, pol)
    _, view, _ = layout_run.prepare(layout, model, cluster, pol, micro_batches)
    fitted = sim.fit_inputs(trace, model, view)[1]
    return {"model": fitted, "layout": layout, "items": [(0, ctx.program)]}


def run_cases(cases: dict, world: int, tmp: Path) -> dict:
    """One launch of the layout self-check over ``cases``; its JSON report."""
    path, report = tmp / "cases.pkl", tmp / "report.json"
    path.write_bytes(pickle.dumps(cases))
    launch(["--cases", str(path), "--report", str(report)], world, tmp / "run",
           hang_timeout_s=HANG_S, module="moesim.executor.selfcheck")
    return json.loads(report.read_text())
