"""The integer program behind :mod:`moesim.policies.oracle_ilp`, one layer at a time: the
PuLP model (:func:`build_layer`; the formulation is in ``oracle_ilp``'s module docstring), its
dispatch-time terms (:func:`dispatch_time`), the warm start from LAER's precise split
(:func:`warm_start`), the objective recomputed from a solution (:func:`objective_value`), and
the solver choice (:func:`resolve_solver`, HiGHS's banner silenced by :func:`quiet_stdout`).

Shape legend: ``E`` experts, ``G`` GPUs (ranks).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import pulp

from moesim.policies.greedy import greedy_place, precise_replicas


def highs_available() -> bool:
    """Whether ``highspy`` (the HiGHS solver PuLP can call) is installed."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_stdout():
    """Send file descriptor 1 to /dev/null for the block: HiGHS writes its banner from C when a
    solver object is created, past Python's ``sys.stdout``."""
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. captured): nothing to do
        yield
        return
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def resolve_solver(name: str) -> str:
    """``auto`` → ``highs`` when ``highspy`` is installed, else ``cbc``."""
    if name != "auto":
        return name
    return "highs" if highs_available() else "cbc"


def _var(prob: pulp.LpProblem, name: str, binary: bool = False) -> pulp.LpVariable:
    """A non-negative variable attached to ``prob`` (PuLP ≥ 3.3's API when present)."""
    cat = pulp.LpBinary if binary else pulp.LpContinuous
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=0, upBound=1 if binary else None, cat=cat)
    return pulp.LpVariable(name, lowBound=0, upBound=1 if binary else None, cat=cat)


@dataclass
class LayerProgram:
    """One layer's integer program and its variables."""

    prob: pulp.LpProblem
    x: list
    y: list
    z: pulp.LpVariable


def build_layer(load_E: np.ndarray, counts_GE: np.ndarray, S: int, objective: str, comp_s: float,
           comm_s: float) -> LayerProgram:
    """The PuLP model of one layer (loads scaled to a mean GPU load of 1)."""
    E, G = load_E.shape[0], counts_GE.shape[0]
    prob = pulp.LpProblem("oracle_layer", pulp.LpMinimize)
    x = [[_var(prob, f"x_{e}_{g}", binary=True) for g in range(G)] for e in range(E)]
    y = [[_var(prob, f"y_{e}_{g}") for g in range(G)] for e in range(E)]
    z = _var(prob, "z")
    gpu = [pulp.lpSum(y[e][g] for e in range(E)) for g in range(G)]
    for g in range(G):
        prob += pulp.lpSum(x[e][g] for e in range(E)) <= S, f"slots_{g}"
        prob += gpu[g] <= z, f"zmax_{g}"
    for e in range(E):
        prob += pulp.lpSum(x[e]) >= 1, f"placed_{e}"
        prob += pulp.lpSum(y[e]) == float(load_E[e]), f"tokens_{e}"
        for g in range(G):
            prob += y[e][g] <= float(load_E[e]) * x[e][g], f"link_{e}_{g}"
    if objective == "max_load":
        for g in range(G - 1):
            prob += gpu[g] >= gpu[g + 1], f"sym_{g}"
        prob += z
    else:
        c = dispatch_time(prob, x, y, gpu, counts_GE, comm_s)
        prob += 3.0 * comp_s * z + 4.0 * c
    return LayerProgram(prob, x, y, z)


def dispatch_time(prob: pulp.LpProblem, x: list, y: list, gpu: list, counts_GE: np.ndarray,
                   comm_s: float) -> pulp.LpVariable:
    """``c ≥ β·send_g`` and ``c ≥ β·recv_g`` for every GPU, with local tokens ``ℓ[e,g] ≤
    n[g,e]·x[e,g]``, ``ℓ[e,g] ≤ y[e,g]`` (module docstring); returns ``c``."""
    G, E = counts_GE.shape
    c = _var(prob, "c")
    for g in range(G):
        loc = [_var(prob, f"l_{e}_{g}") for e in range(E)]
        for e in range(E):
            prob += loc[e] <= float(counts_GE[g, e]) * x[e][g], f"lx_{e}_{g}"
            prob += loc[e] <= y[e][g], f"ly_{e}_{g}"
        kept = pulp.lpSum(loc)
        prob += c >= comm_s * (float(counts_GE[g].sum()) - kept), f"send_{g}"
        prob += c >= comm_s * (gpu[g] - kept), f"recv_{g}"
    return c


def warm_start(layer: LayerProgram, load_E: np.ndarray, S: int, gpus_per_node: int,
                sort_gpus: bool) -> np.ndarray:
    """Seed the solver with LAER's precise split, placed greedily, tokens split evenly; GPUs
    ordered by decreasing load when the model orders them (symmetry breaking). Returns the
    seed's copies ``[G, E]``."""
    E, G = len(layer.x), len(layer.x[0])
    r_E = precise_replicas(load_E, G * S, 1, G)
    copies = greedy_place(r_E, load_E, gpus_per_node, np.full(G, S), allow_duplicates=False,
                          skip_unplaceable=True)
    copies = np.minimum(copies, 1)
    share = copies * (load_E / np.maximum(copies.sum(0), 1))[None, :]
    if sort_gpus:
        order = np.argsort(-share.sum(1), kind="stable")
        copies, share = copies[order], share[order]
    for e in range(E):
        for g in range(G):
            layer.x[e][g].setInitialValue(int(copies[g, e]))
            layer.y[e][g].setInitialValue(float(share[g, e]))
    layer.z.setInitialValue(float(share.sum(1).max()))
    return copies


def objective_value(x_GE: np.ndarray, y_GE: np.ndarray, counts_GE: np.ndarray, objective: str,
               comp_s: float, comm_s: float) -> float:
    """The program's objective for a solution (scaled units), recomputed from ``x`` and ``y``."""
    z = float(y_GE.sum(1).max())
    if objective == "max_load":
        return z
    kept = np.minimum(counts_GE, y_GE) * (x_GE > 0)
    send = (counts_GE - kept).sum(1)
    recv = (y_GE - kept).sum(1)
    return 3.0 * comp_s * z + 4.0 * comm_s * float(np.maximum(send, recv).max())
