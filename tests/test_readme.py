"""The README's "Adding a policy" example must work as printed: registered, invariant-clean, and
simulated end to end. Runs in a subprocess so the example policy never leaks into this test
session's registry."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

CHECK = textwrap.dedent("""
    import numpy as np
    from moesim.policies import History, available_policies, make_policy
    from moesim.routing import route_layer
    from moesim.simulate import simulate
    from moesim.specs import load_cluster, load_model
    from moesim.traces import bundled_trace_path, load_trace

    assert "round_robin" in available_policies()
    trace = load_trace(bundled_trace_path())
    model = load_model("smartmoe-gpt")
    cluster = load_cluster("a100-4x8-ib800").with_shape(2)
    policy = make_policy("round_robin", {"slots_per_rank": "2"})
    mb = trace.meta.micro_batches_per_iteration
    h = History(iteration=3, past_TLRE=trace.counts_TLRE[:3 * mb], passes_per_iteration=mb)
    d = policy.decide(h, model, cluster, np.random.default_rng(0))
    assert (d.placement.logcnt_LE >= 1).all()
    counts = trace.counts_TLRE[3 * mb]
    kept, dropped = route_layer(counts[0], d.placement, 0, d.routing, d.slot_capacity, 8)
    assert kept.sum() + dropped.sum() == counts[0].sum()
    out = simulate(trace, model, cluster, policy, iterations=(0, 2), progress=False)
    print("ok", out)
""")


def _example() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(# policies/round_robin\.py\n.*?)```", text, re.S)
    assert match, "README lost its 'Adding a policy' example"
    return match.group(1)


def test_readme_policy_example_runs():
    code = _example() + "\n" + CHECK
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
