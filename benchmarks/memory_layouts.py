"""Per-stage memory of the published layouts by moesim's memory model (moesim.memory_stage).

Run::

    python benchmarks/memory_layouts.py              # every case below
    python benchmarks/memory_layouts.py --hot 2      # rank 0 of each stage receives 2x the rows

Cases (PARALLELISM.md): DeepSeek-V3 on ``h800-256x8`` with PP 16, EP 64, ZeRO-1 and 1F1B
(tech report §3.2; DualPipe is not modelled), micro-batch one 4096-token sequence, 120
micro-batches per step (15360 sequences over 128 DP replicas), without recompute, with the
report's RMSNorm + MLA up-projection recompute (§3.2.3), and with ``moe_act`` too; the LAER-MoE
artifact's Megatron baselines on ``a100-4x8-ib800`` (Mixtral 8x7B/8x22B e8k2 / e16k4 with 32 /
24 / 18 / 14 layers, TP 8 or 4 with SP, EP 8, distributed optimizer, one 8192-token sequence
per micro-batch, global batch 128). Expert rows are balanced (each rank computes what it
routes) unless ``--hot``; expert state is static EP's (each rank holds E/EP experts, ZeRO over
EDP). Prints one table per case; the last line of each names the peak stage and rank.
"""

from __future__ import annotations

import argparse

import numpy as np

from moesim.layout import ParallelLayout
from moesim.memory_stage import StageMemory, expert_state_zero, stage_memory, stage_memory_table
from moesim.specs import Cluster, ModelSpec, load_cluster, load_model
from moesim.stages import plan_layout


def layout_memory(model: ModelSpec, cluster: Cluster, layout: ParallelLayout, m: int,
                  tokens: int, ep: int, hot: float = 1.0) -> list[StageMemory]:
    """Every stage's memory for balanced routing (rank 0 of each stage ``hot`` x the rows)."""
    plan = plan_layout(layout, cluster, model, m)
    zero = 1 if layout.zero is None else layout.zero
    out = []
    for st in plan.stages:
        n, L = st.num_ranks, len(st.moe_layers)
        local = tokens / ((layout.tp if layout.sp else 1) * layout.cp)
        rows = np.full((m, L, n), local * model.top_k)
        rows[:, :, 0] *= hot
        experts = model.num_experts // ep / layout.etp * L * model.params_per_expert
        state = expert_state_zero(np.full(n, experts), model, zero, n // (ep * layout.etp))
        out.append(stage_memory(model=model, layout=layout, stage=st, num_stages=layout.pp,
                                micro_batches=m, tokens=tokens, expert_state_R=state,
                                rows_MLR=rows))
    return out


def cases() -> list[tuple[str, ModelSpec, Cluster, ParallelLayout, int, int, int]]:
    ds, h800 = load_model("deepseek-v3"), load_cluster("h800-256x8")
    base = dict(pp=16, ep=64, zero=1)
    out = [("deepseek-v3 pp16 ep64 zero1", ds, h800, ParallelLayout(**base), 120, 4096, 64)]
    for mods in (("layernorm", "mla_up_proj"), ("layernorm", "mla_up_proj", "moe_act")):
        lay = ParallelLayout(**base, recompute="selective", recompute_modules=mods)
        out.append((f"deepseek-v3 pp16 ep64 zero1 +{'+'.join(mods)}", ds, h800, lay, 120,
                    4096, 64))
    a100 = load_cluster("a100-4x8-ib800")
    for name, layers, t in (("mixtral-8x7b-e8k2", 32, 8), ("mixtral-8x7b-e16k4", 24, 4),
                            ("mixtral-8x22b-e8k2", 18, 8), ("mixtral-8x22b-e16k4", 14, 4)):
        model = load_model(name).replace(num_layers=layers)
        lay = ParallelLayout(tp=t, sp=True, ep=8, zero=1)
        out.append((f"{name} {layers}L megatron tp{t} sp ep8 dist-opt", model, a100, lay,
                    128 // (32 // t), 8192, 8))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hot", type=float, default=1.0,
                    help="rows on rank 0 of each stage, as a multiple of the balanced load")
    args = ap.parse_args()
    for label, model, cluster, layout, m, tokens, ep in cases():
        stages = layout_memory(model, cluster, layout, m, tokens, ep, args.hot)
        print(f"== {label} (m={m}, {tokens} tokens per micro-batch, hot x{args.hot:g})")
        print(stage_memory_table(stages, cluster.gpu_memory_bytes))
        print()


if __name__ == "__main__":
    main()
