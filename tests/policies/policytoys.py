"""Small models, clusters, skewed counts and a decide→lower→schedule loop shared by the policy
tests (an importable module, unlike conftest)."""

from __future__ import annotations

import numpy as np

from moesim.costmodel import CostModel
from moesim.engine import schedule
from moesim.lowering import lower_iteration_ctx
from moesim.placement import Decision
from moesim.policies import History, make_policy, policy_class
from moesim.specs import Cluster, HardwareProfile, LinkLevel, ModelSpec


def tiny_model(E: int = 8, L: int = 2, tokens: int = 256, k: int = 2, hidden: int = 256,
               ffn: int = 512) -> ModelSpec:
    return ModelSpec(name="tiny", num_layers=L, hidden_size=hidden, ffn_hidden_size=ffn,
                     num_experts=E, top_k=k, tokens_per_rank=tokens, seq_len=tokens)


def tiny_cluster(nodes: int = 2, gpn: int = 2) -> Cluster:
    hw = HardwareProfile(name="hw", peak_flops=312e12, mem_bw_GBps=2000.0)
    return Cluster(name="c", num_nodes=nodes, gpus_per_node=gpn,
                   intra=LinkLevel(bw_GBps=200.0, latency_s=5e-6),
                   inter=LinkLevel(bw_GBps=20.0, latency_s=1e-5),
                   host=LinkLevel(bw_GBps=25.0, latency_s=1e-5), gpu_memory_GiB=80.0,
                   hardware=hw)


def skewed_counts_TLRE(model: ModelSpec, G: int, passes: int, seed: int,
                       alpha: float = 0.4) -> np.ndarray:
    """Skewed random counts: each pass draws a Dirichlet(alpha) popularity per layer."""
    rng = np.random.default_rng(seed)
    out = np.empty((passes, model.num_layers, G, model.num_experts), dtype=np.int64)
    for t in range(passes):
        for l in range(model.num_layers):
            p = rng.dirichlet(np.full(model.num_experts, alpha))
            out[t, l] = rng.multinomial(model.tokens_per_rank * model.top_k, p, size=G)
    return out


def history_of(counts_TLRE: np.ndarray, ppi: int = 1, previous: Decision | None = None,
               current: np.ndarray | None = None) -> History:
    """The History of the iteration right after ``counts_TLRE``."""
    return History(iteration=counts_TLRE.shape[0] // ppi, past_TLRE=counts_TLRE,
                   passes_per_iteration=ppi, previous=previous, current_TLRE=current)


def check_placement(d: Decision, G: int, E: int, L: int) -> None:
    """Every expert placed, slot counts respected, log2phy inverts phy2log."""
    pl = d.placement
    assert pl.phy2log_LP.shape == (L, G * pl.slots_per_rank)
    assert (pl.logcnt_LE >= 1).all()
    l2p = pl.log2phy_LEK
    for l in range(L):
        for e in range(E):
            slots = l2p[l, e][l2p[l, e] >= 0]
            assert (pl.phy2log_LP[l, slots] == e).all()
    assert d.planner_time_s > 0


def lower_run(name: str, knobs: dict, iterations: int = 4, micro_batches: int = 2):
    """Decide, lower, cost and schedule a few iterations of a tiny model on 2 × 4 GPUs: returns
    ``(model, cluster, decisions, last ctx, last schedule)``."""
    model = tiny_model(E=8, L=2).replace(micro_batches=micro_batches)
    cluster = tiny_cluster(2, 4)
    G = cluster.world_size
    counts = skewed_counts_TLRE(model, G, iterations * micro_batches, seed=40)
    policy = make_policy(name, knobs)
    prev, decisions = None, []
    for it in range(iterations):
        cur = counts[it * micro_batches:(it + 1) * micro_batches]
        h = History(iteration=it, past_TLRE=counts[:it * micro_batches],
                    passes_per_iteration=micro_batches, previous=prev)
        d = policy.decide(h, model, cluster, np.random.default_rng(it))
        ctx = lower_iteration_ctx(policy, d, prev, cur, model, cluster)
        sched = schedule(ctx.program.ops, CostModel(cluster).durations(ctx.program), G)
        prev = d
        decisions.append(d)
    return model, cluster, decisions, ctx, sched


def solver_missing(name: str) -> str | None:
    """Why policy ``name`` cannot run here (``None`` if it can): an oracle needs a PuLP
    solver."""
    if not policy_class(name).oracle:
        return None
    try:
        import pulp

        return None if pulp.listSolvers(onlyAvailable=True) else "no PuLP solver installed"
    except ImportError:
        return "PuLP is not installed"
