"""An optimal bound: an integer program over this iteration's counts (an *oracle* policy).

Ours (see POLICIES.md, "An optimal bound"); solved with PuLP (COIN-OR CBC, bundled, or HiGHS
through ``highspy``). It is handed ``History.current_TLRE`` — the counts of the iteration it
places — so no real system can match it; it gives every heuristic a gap to report
(:func:`gap_to_oracle`).

Per layer, with ``load_e`` the tokens of expert ``e`` this iteration (all passes and sources),
``G`` GPUs and ``S`` slots per GPU (the memory limit is the slot count)::

    x[e,g] ∈ {0, 1}        copies of e on GPU g
    y[e,g] ≥ 0             tokens of e processed on GPU g (fractional)
    Σ_e x[e,g] ≤ S         slots;        Σ_g x[e,g] ≥ 1   every expert placed
    Σ_g y[e,g] = load_e    all tokens;   y[e,g] ≤ load_e · x[e,g]
    z ≥ Σ_e y[e,g]         per-GPU load
    objective  max_load:   minimise z
               layer_time: minimise 3·z·f/peak + 4·c, with c ≥ send_g·β_g, c ≥ recv_g·β_g,
                           send_g = Σ_e (n[g,e] − ℓ[e,g]), recv_g = Σ_e (y[e,g] − ℓ[e,g]),
                           ℓ[e,g] ≤ n[g,e]·x[e,g], ℓ[e,g] ≤ y[e,g] (tokens that stay local),
                           β = token_bytes / bw (inter-node bandwidth when the cluster has more
                           than one node, else intra-node): the straggler's dispatch time, four
                           all-to-alls per layer, three compute passes (as LAER's model).

``x`` is binary rather than a general integer: a second copy of an expert on the same GPU sends
tokens to the same GPU, so it never lowers either objective. For ``max_load`` the GPUs are
interchangeable, so their loads are ordered (``load_g ≥ load_{g+1}``) to break symmetry. The
solver is warm-started from LAER's precise split placed greedily; when that seed already meets
the proven lower bound (:func:`max_load_lower_bound`, within ``mip_gap``) it is optimal and no
solver runs; otherwise that bound is added as a cut (``z ≥ bound``), so the solver's own bound
starts there and it stops at the first incumbent within ``mip_gap`` of it; a solver stopped by
its time limit never returns worse than the seed.

Two measured faults this design fixes (issue 15: 99 s for 2 iterations of the bundled trace, and
a straggler ratio of 6.8 against static EP's 2.2). *Time*: with 2 slots per GPU and 32 experts
on 16 GPUs nothing can be replicated, each layer's optimum is the hottest expert's load, and the
seed reaches it; yet CBC could not prove it (the bound is combinatorial, not from the LP
relaxation) and ran to its time limit on most layers. That shape (2 slots per GPU, ``E = 2·G``)
is now solved exactly without a solver: the heaviest expert paired with the lightest, and so on
(:func:`pair_sorted`). With room for replicas, skewed layers are proven by the seed at once,
while near-balanced ones (no expert dominates) may still run to ``time_limit_s``, keeping the
seed when the solver finds nothing better. *Straggler*: the symmetry breaking put the heaviest
GPU first in every layer, so GPU 0 held every layer's hottest expert, its activations and its
compute: per-layer loads were optimal, but one rank's busy time and memory piled up across
layers. GPUs are now relabelled per layer (``relabel_gpus_for_layer``, node to node, as SmartMoE
/ LAER / Hecate here do) for the ``max_load`` objective, whose GPUs are interchangeable;
``layer_time`` depends on which GPU holds the local tokens and keeps its labels.

Solver: ``solver="auto"`` (the default) is HiGHS when ``highspy`` is installed, else PuLP's
bundled CBC (``pulp`` is pinned to a range that still bundles it). HiGHS prints its banner when
it starts, whatever ``msg`` says; it is kept off the terminal (``--quiet`` stays quiet).

``info``: ``status_L`` (solver status, e.g. ``optimal`` or ``time_limit``), ``max_load_L`` (the
ILP's max GPU load, tokens, with its own fractional split), ``load_bound_L`` (a proven lower
bound on any placement's max load with ``S`` slots: the solver's optimum when proven, else the
combinatorial bound of :func:`max_load_lower_bound`), ``gap_L`` (``(found − bound) / found``,
of the objective), ``even_split_max_load_L`` (max load when the placement is executed with the
``even`` routing it reports — the executable rules cannot realise arbitrary splits).

Determinism: a layer solved to optimality (``status_L == "optimal"``) gives the same placement
on every run; a layer stopped by ``time_limit_s`` returns the incumbent found so far, which
depends on how fast the machine is — raise ``time_limit_s`` when reproducibility matters.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pulp

from moesim.errors import MoesimError
from moesim.placement import Decision, Placement
from moesim.policies.base import (
    History,
    Policy,
    check_capacity_factor,
    check_choice,
    check_ints,
    check_slots_cover,
    register_policy,
)
from moesim.policies.greedy import copies_to_phy2log
from moesim.policies.oracle_model import (  # noqa: F401  (resolve_solver re-exported)
    build_layer,
    highs_available,
    objective_value,
    quiet_stdout,
    resolve_solver,
    warm_start,
)
from moesim.policies.primitives import gpu_load, relabel_gpus_for_layer, slot_capacity
from moesim.specs import Cluster, ModelSpec

OBJECTIVES = ("max_load", "layer_time")
SOLVERS = ("auto", "cbc", "highs")


def pair_sorted(load_E: np.ndarray, num_ranks: int) -> np.ndarray:
    """Copies ``[G, E]`` placing ``E = 2·G`` experts two per GPU: GPU ``g`` gets the ``g``-th
    heaviest and the ``g``-th lightest expert."""
    order = np.argsort(-np.asarray(load_E, dtype=np.float64), kind="stable")
    copies = np.zeros((num_ranks, len(order)), dtype=np.int64)
    g = np.arange(num_ranks)
    copies[g, order[g]] = 1
    copies[g, order[len(order) - 1 - g]] = 1
    return copies


def max_load_lower_bound(load_E: np.ndarray, num_ranks: int, slots_per_rank: int) -> float:
    """A lower bound on the max GPU load of any placement with ``S`` slots per GPU.

    ``z ≥ Σ load / G``, and an expert needs ``≥ max(1, ceil(load_e / z))`` copies on distinct
    GPUs (no GPU takes more than ``z``), so ``Σ_e max(1, ceil(load_e / z)) ≤ G·S`` and
    ``load_e / z ≤ G``; the smallest ``z`` meeting all three is returned.
    """
    load = np.asarray(load_E, dtype=np.float64)
    G, slots = num_ranks, num_ranks * slots_per_rank
    base = max(load.sum() / G, load.max(initial=0.0) / G)
    if base <= 0:
        return 0.0
    k = np.arange(1, G + 1)
    cand = np.unique(np.concatenate([(load[:, None] / k[None, :]).ravel(), [base]]))
    cand = cand[cand >= base]

    def fits(z: float) -> bool:
        return np.maximum(1, np.ceil(load / z - 1e-9)).sum() <= slots

    lo, hi = 0, len(cand) - 1
    if not fits(cand[hi]):
        return float(cand[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(cand[mid]) else (mid + 1, hi)
    return float(cand[lo])


@register_policy("oracle_ilp")
class OracleIlp(Policy):
    """Per-layer integer program on the current iteration's counts (an upper-bound oracle)."""

    oracle = True

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """``slots_per_rank`` (S): expert slots per GPU (the memory limit). ``objective``:
        ``max_load`` or ``layer_time``. ``solver``: ``auto`` (HiGHS when ``highspy`` is
        installed, else CBC), ``cbc`` (bundled with PuLP) or ``highs``. ``time_limit_s``: per
        layer. ``mip_gap``: relative gap at which the solver may stop. ``threads``: solver
        threads. ``capacity_factor``: ``None`` = dropless."""

        slots_per_rank: int = 2
        objective: str = "max_load"
        solver: str = "auto"
        time_limit_s: float = 10.0
        mip_gap: float = 1e-4
        threads: int = 1
        capacity_factor: float | None = None

        def __post_init__(self) -> None:
            check_ints("oracle_ilp", self, {"slots_per_rank": 1, "threads": 1})
            check_choice("oracle_ilp", "objective", self.objective, OBJECTIVES)
            check_choice("oracle_ilp", "solver", self.solver, SOLVERS)
            if self.solver == "highs" and not highs_available():
                raise MoesimError("oracle_ilp: solver='highs' needs the highspy package; "
                                  "pip install highspy, or use solver='cbc'")
            if not (isinstance(self.time_limit_s, (int, float)) and self.time_limit_s > 0):
                raise MoesimError(f"oracle_ilp: time_limit_s must be > 0 seconds, got "
                                  f"{self.time_limit_s!r}")
            if not (isinstance(self.mip_gap, (int, float)) and 0 <= self.mip_gap < 1):
                raise MoesimError(f"oracle_ilp: mip_gap must be in [0, 1), got {self.mip_gap!r}")
            check_capacity_factor("oracle_ilp", self.capacity_factor)

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        """Solve each layer on ``history.current_TLRE``; slot rows ``[L, G·S]``."""
        t0 = time.perf_counter()
        cfg = self.config
        G, E, L, S = cluster.world_size, model.num_experts, model.num_layers, cfg.slots_per_rank
        check_slots_cover("oracle_ilp", S, G, E)
        if history.current_TLRE is None:
            raise MoesimError("oracle_ilp needs the current iteration's counts; run it through "
                              "the simulator, which hands oracle policies History.current_TLRE")
        counts_LGE = np.asarray(history.current_TLRE, dtype=np.float64).sum(axis=0)
        rows, info = [], {k: [] for k in ("status_L", "max_load_L", "load_bound_L", "gap_L",
                                          "objective_value_L", "even_split_max_load_L")}
        for l in range(L):
            row, facts = self._solve_layer(counts_LGE[l], model, cluster)
            if cfg.objective == "max_load":  # interchangeable GPUs: rotate roles over layers
                row = relabel_gpus_for_layer(row, l, S, cluster.gpus_per_node)
            rows.append(row)
            for key, value in facts.items():
                info[key + "_L"].append(value)
        info.update(objective=cfg.objective, solver=resolve_solver(cfg.solver))
        cap = slot_capacity(cfg.capacity_factor, model.tokens_per_rank, model.top_k, G * S)
        return Decision(Placement(np.stack(rows), G, S, E), routing="even", slot_capacity=cap,
                        planner_time_s=time.perf_counter() - t0, info=info)

    def _solve_layer(self, counts_GE: np.ndarray, model: ModelSpec,
                     cluster: Cluster) -> tuple[np.ndarray, dict]:
        """One layer's slot row ``[G·S]`` and its solver facts."""
        cfg = self.config
        G, E = counts_GE.shape
        S = cfg.slots_per_rank
        load = counts_GE.sum(0)
        scale = load.sum() / G if load.sum() > 0 else 1.0
        load_n, counts_n = load / scale, counts_GE / scale
        link = cluster.inter if cluster.num_nodes > 1 else cluster.intra
        comp_s = scale * model.expert_flops_per_token / cluster.hardware.peak_flops
        comm_s = scale * model.token_bytes / (link.bw_GBps * 1e9)
        if cfg.objective == "max_load" and S == 2 and G * S == E:
            return self._paired_layer(load, G)
        layer = build_layer(load_n, counts_n, S, cfg.objective, comp_s, comm_s)
        seed = warm_start(layer, load_n, S, cluster.gpus_per_node, cfg.objective == "max_load")
        seed_y = seed * (load_n / np.maximum(seed.sum(0), 1))[None, :]
        seed_obj = objective_value(seed, seed_y, counts_n, cfg.objective, comp_s, comm_s)
        lb_load, lb_obj = self._bounds("bound", seed_obj, load_n, G, comp_s)
        if seed_obj <= lb_obj * (1.0 + cfg.mip_gap) + 1e-12:
            status, x, y = "optimal", seed, seed_y   # the seed meets a proven bound
        else:
            # a valid cut: the proven bound lifts the relaxation's, so the solver stops as
            # soon as an incumbent is within mip_gap of it instead of running to its limit
            layer.prob += layer.z >= float(lb_load), "z_proven_bound"
            status = self._run(layer.prob)
            x, y = seed, seed_y
            if status != "no_solution":
                x_s = np.array([[round(v.varValue or 0.0) for v in row] for row in layer.x],
                               dtype=np.int64).T                              # [G, E]
                y_s = np.array([[v.varValue or 0.0 for v in row] for row in layer.y]).T
                if objective_value(x_s, y_s, counts_n, cfg.objective, comp_s, comm_s) <= seed_obj:
                    x, y = x_s, y_s
        found = objective_value(x, y, counts_n, cfg.objective, comp_s, comm_s)
        lb_load, lb_obj = self._bounds(status, found, load_n, G, comp_s)
        row = copies_to_phy2log(x, S)
        unit = scale if cfg.objective == "max_load" else 1.0
        return row, {"status": status, "max_load": float(y.sum(1).max() * scale),
                     "load_bound": float(lb_load * scale),
                     "gap": float((found - lb_obj) / found) if found > 0 else 0.0,
                     "objective_value": float(found * unit),
                     "even_split_max_load": float(gpu_load(row, load, S).max())}

    @staticmethod
    def _paired_layer(load_E: np.ndarray, G: int) -> tuple[np.ndarray, dict]:
        """``max_load`` with 2 slots per GPU and ``2·G`` experts: no slot is left for a replica,
        so each GPU holds exactly two experts, and the heaviest paired with the lightest, the
        second with the second lightest, ... minimises the largest pair sum (exchange
        argument: swapping partners in any other pairing never lowers the maximum). Exact,
        with no solver."""
        x_GE = pair_sorted(load_E, G)
        found = float((x_GE * load_E[None, :]).sum(1).max())
        row = copies_to_phy2log(x_GE, 2)
        return row, {"status": "optimal", "max_load": found, "load_bound": found, "gap": 0.0,
                     "objective_value": found,
                     "even_split_max_load": float(gpu_load(row, load_E, 2).max())}

    def _bounds(self, status: str, found: float, load_E: np.ndarray, G: int,
                comp_s: float) -> tuple[float, float]:
        """Proven lower bounds ``(max load, objective)`` in scaled units: the combinatorial
        bound (``layer_time``: its compute term, communication ≥ 0), raised to
        ``found·(1 − mip_gap)`` when the solver proved optimality within ``mip_gap``."""
        cfg = self.config
        lb_load = max_load_lower_bound(load_E, G, cfg.slots_per_rank)
        lb_obj = lb_load if cfg.objective == "max_load" else 3.0 * comp_s * lb_load
        if status == "optimal":
            lb_obj = max(lb_obj, found * (1.0 - cfg.mip_gap))
            if cfg.objective == "max_load":
                lb_load = lb_obj
        return lb_load, lb_obj

    def _run(self, prob: pulp.LpProblem) -> str:
        """Solve with the configured solver; returns ``optimal``, ``time_limit`` (a feasible
        solution, optimality not proven) or ``no_solution`` (the warm-start seed is kept)."""
        cfg = self.config
        opts = dict(msg=False, timeLimit=cfg.time_limit_s, gapRel=cfg.mip_gap,
                    threads=cfg.threads)
        if resolve_solver(cfg.solver) == "cbc":
            with warnings.catch_warnings():   # PuLP 3.3 deprecates the bundled CBC for 4.0
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.COIN_CMD(warmStart=True, **opts)
                if not solver.available():
                    solver = pulp.PULP_CBC_CMD(warmStart=True, **opts)
            prob.solve(solver)
        else:
            with quiet_stdout():
                prob.solve(pulp.HiGHS(**opts))
        if prob.sol_status == pulp.LpSolutionOptimal:
            return "optimal"
        if prob.sol_status == pulp.LpSolutionIntegerFeasible:
            return "time_limit"
        return "no_solution"


def _heuristic_max_load_L(decision: Decision, load_LE: np.ndarray) -> np.ndarray:
    """Max GPU load per layer, ``[L]``, with each expert split evenly over its replicas."""
    pl = decision.placement
    return np.array([gpu_load(pl.layer(l), load_LE[l], pl.slots_per_rank).max()
                     for l in range(pl.num_layers)])


def gap_to_oracle(decision_heuristic: Decision | Mapping[str, Decision],
                  decision_oracle: Decision,
                  load_LE: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """Relative gap of a heuristic's max GPU load to the ILP's lower bound, per layer ``[L]``:
    ``(max_g load_g − bound) / bound`` (0 = provably optimal).

    ``load_LE``: the loads the oracle was solved on (this iteration's tokens per expert). The
    heuristic's GPU load splits each expert's load evenly over its replicas (routing-rule
    independent). Pass a mapping ``name → Decision`` to get a dict of gaps.
    """
    if isinstance(decision_heuristic, Mapping):
        return {name: gap_to_oracle(d, decision_oracle, load_LE)
                for name, d in decision_heuristic.items()}
    bound = np.asarray(decision_oracle.info["load_bound_L"], dtype=np.float64)
    heur = _heuristic_max_load_L(decision_heuristic, np.asarray(load_LE, dtype=np.float64))
    return np.where(bound > 0, (heur - bound) / np.where(bound > 0, bound, 1.0), 0.0)

