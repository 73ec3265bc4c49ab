"""CPU seconds per simulator phase, for ``sim_speed.py --phases``.

:class:`PhaseTimer` wraps the simulator's phase functions while it is entered and charges
each call's process CPU time to its phase, less the time of the wrapped phases it called
(so ``lower`` excludes ``route``, ``records`` excludes ``metrics``):

- ``decide`` — :func:`moesim.simulate.decide_iteration` (the policy);
- ``route`` — :func:`moesim.lowering.route_iteration` (routing rule and capacity);
- ``lower`` — :func:`moesim.simulate.lower_iteration_ctx` (the ops, memory, routes);
- ``cost`` — :meth:`moesim.costmodel.CostModel.durations_batched` (and ``durations``);
- ``schedule`` — :func:`moesim.engine.schedule`;
- ``records`` — :func:`moesim.simulate.build_record` (phase times, summary, load);
- ``metrics`` — :func:`moesim.metrics.iteration_metrics` (load metrics, GPU-pair traffic);
- ``other`` — the rest of ``simulate`` (inputs, memory check, validation).

Batches of a repeated structure (:mod:`moesim.repeat`) are charged alike: ``route``
:func:`~moesim.lowering.routed_context`, ``cost`` :func:`~moesim.repeat.batch_durations`,
``schedule`` :func:`~moesim.engine.schedule_batch`, ``records``
:func:`~moesim.records.phase_times_batch` (and ``build_record``), ``metrics`` the traffic
(:func:`moesim.repeat._traffic`) and ``iteration_metrics``.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict

PHASES = (("decide", "moesim.simulate", "decide_iteration"),
          ("route", "moesim.lowering", "route_iteration"),
          ("lower", "moesim.simulate", "lower_iteration_ctx"),
          ("cost", "moesim.costmodel", "CostModel.durations_batched"),
          ("schedule", "moesim.simulate", "schedule"),
          ("records", "moesim.simulate", "build_record"),
          ("metrics", "moesim.metrics", "iteration_metrics"),
          # batches of a repeated structure (moesim.repeat): their route, cost, schedule and
          # phase-time passes under the same names
          ("route", "moesim.simulate", "routed_context"),
          ("cost", "moesim.repeat", "batch_durations"),
          ("schedule", "moesim.repeat", "schedule_batch"),
          ("records", "moesim.repeat", "phase_times_batch"),
          ("metrics", "moesim.repeat", "_traffic"))
NAMES = tuple(dict.fromkeys(p[0] for p in PHASES)) + ("other",)


class PhaseTimer:
    """A context manager: ``cpu_s[phase]`` after the block (module docstring)."""

    def __init__(self) -> None:
        self.cpu_s: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []
        self._undo: list = []

    def _wrap(self, phase: str, fn):
        def timed(*args, **kw):
            t0 = time.process_time()
            self._stack.append(0.0)
            try:
                return fn(*args, **kw)
            finally:
                dt = time.process_time() - t0
                inner = self._stack.pop()
                self.cpu_s[phase] += dt - inner
                if self._stack:
                    self._stack[-1] += dt
        return timed

    def __enter__(self) -> PhaseTimer:
        self._t0 = time.process_time()
        for phase, module, name in PHASES:
            owner = importlib.import_module(module)
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            setattr(owner, attr, self._wrap(phase, fn))
            self._undo.append((owner, attr, fn))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        total = time.process_time() - self._t0
        self.cpu_s["other"] = total - sum(v for k, v in self.cpu_s.items() if k != "other")
        self.cpu_s = dict(self.cpu_s)


def print_phases(rows: list[dict]) -> None:
    """One line per row: CPU seconds per phase (and share of the row's CPU time)."""
    print(f"{'case':<7} {'GPUs':>5} {'iters':>6} " + " ".join(f"{n:>15}" for n in NAMES))
    for r in rows:
        ph, total = r["phases"], sum(r["phases"].values()) or 1.0
        cells = " ".join(f"{ph.get(n, 0.0):>8.2f} ({100 * ph.get(n, 0.0) / total:>3.0f}%)"
                         for n in NAMES)
        print(f"{r['case']:<7} {r['gpus']:>5} {r['iterations']:>6} {cells}")
