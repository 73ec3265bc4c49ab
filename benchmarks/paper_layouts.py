"""LAER-MoE's end-to-end runs with their published parallel layouts (issue: layouts).

Run::

    python benchmarks/paper_layouts.py            # the four Mixtral shapes, 4 iterations each
    python benchmarks/paper_layouts.py --quick    # 8x7B e8k2 only

LAER-MoE's artifact (arXiv 2602.11686, ASPLOS'26; PARALLELISM.md) trains Mixtral-shaped models
on 32 A100-80GB (4 nodes x 8, 800 Gbps IB): 8x7B e8k2 / e16k4 and 8x22B e8k2 / e16k4 cut to 32 /
24 / 18 / 14 layers, global batch 128 sequences of 8192 tokens. The systems and their layouts:

- **Megatron**: static EP 8 under TP 8 (e8k2) or TP 4 (e16k4) with sequence parallelism,
  micro-batch 1 sequence, distributed optimizer, no recomputation (presets
  ``laer-megatron-e8k2`` / ``laer-megatron-e16k4``). DP = 32 / TP, so each rank runs
  128 / DP micro-batches of ``8192 / TP`` tokens (SP: each rank routes its own share).
- **LAER** (``laer_fsep``), **FSDP** (``laer_fsep`` with ``planner=false``: FSEP's even
  sharding, the planner off) and **FLEX** (``flexmoe``; the artifact feeds FlexMoE's scheduling
  into the FSEP runtime, moesim runs FlexMoE's own replica moves — see docs/policies.md):
  no TP or PP, activation checkpointing of every layer (preset ``laer-fsep``), the 4
  sequences per GPU in 2 chunks (micro-batches) of 16384 tokens.

Every system sees the same synthetic SmartMoE-like routing (same seed, same per-iteration
statistics), at the token-source shape its layout needs. The table gives the mean step time
over the iterations after the warm-up, peak memory, and the ratio to Megatron; LAER's
published speed-ups are 1.11-1.69x over Megatron and 1.03-1.39x over FLEX.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from moesim.layout import load_layout
from moesim.policies.base import make_policy
from moesim.simulate import simulate
from moesim.specs import load_cluster, load_model
from moesim.traces.synth import SynthConfig, synthesize

WARMUP = 2
SEQ, GLOBAL_BATCH, CHUNKS = 8192, 128, 2
#: (model preset, layers in the artifact's runs, Megatron's TP)
MODELS = (("mixtral-8x7b-e8k2", 32, 8), ("mixtral-8x7b-e16k4", 24, 4),
          ("mixtral-8x22b-e8k2", 18, 8), ("mixtral-8x22b-e16k4", 14, 4))


@dataclass(frozen=True)
class System:
    label: str
    policy: str
    knobs: dict
    megatron: bool


SYSTEMS = (System("Megatron (static EP 8, TP+SP)", "static_ep", {"ep_size": 8}, True),
           System("FSDP (FSEP, planner off)", "laer_fsep", {"planner": False}, False),
           System("FLEX (flexmoe)", "flexmoe", {"slots_per_rank": 2, "keep_one_per_node": True,
                                                 "routing": "node_first"}, False),
           System("LAER (laer_fsep)", "laer_fsep", {}, False))


def shape(tp: int, megatron: bool, world: int) -> tuple[int, int]:
    """``(tokens per rank per micro-batch, micro-batches per iteration)`` of a system."""
    if megatron:
        dp = world // tp
        return SEQ // tp, GLOBAL_BATCH // dp
    per_gpu = GLOBAL_BATCH // world
    return SEQ * per_gpu // CHUNKS, CHUNKS


def run(model_name: str, layers: int, tp: int, iterations: int) -> list[dict]:
    cluster = load_cluster("a100-4x8-ib800")
    rows = []
    for sys_ in SYSTEMS:
        tokens, mb = shape(tp, sys_.megatron, cluster.world_size)
        model = load_model(model_name).replace(num_layers=layers, seq_len=SEQ,
                                               tokens_per_rank=tokens, micro_batches=mb)
        layout = load_layout(f"laer-megatron-{model_name.rsplit('-', 1)[1]}"
                             if sys_.megatron else "laer-fsep")
        cfg = SynthConfig.smartmoe_like(
            num_layers=layers, num_ranks=cluster.world_size, num_experts=model.num_experts,
            top_k=model.top_k, tokens_per_rank=tokens, micro_batches_per_iteration=mb,
            num_iterations=iterations, iteration_stride=1, skew_start=1.0)
        trace = synthesize(cfg, rng=0, workers=1)
        t0 = time.perf_counter()
        s = simulate(trace, model, cluster, make_policy(sys_.policy, sys_.knobs),
                     progress=False, allow_oom=True, layout=layout)
        keep = s.rows[WARMUP:] or s.rows
        rows.append({"model": model_name, "layers": layers, "system": sys_.label,
                     "layout": layout.describe(),
                     "step_s": float(np.mean([r["step_time_s"] for r in keep])),
                     "a2a_s": float(np.mean([r["a2a_time_s"] for r in keep])),
                     "peak_GiB": max(r["peak_memory_bytes"] for r in s.rows) / 2**30,
                     "oom": max(r["oom"] for r in s.rows),
                     "wall_s": time.perf_counter() - t0})
        print(f"  {model_name} {sys_.label:32s} {rows[-1]['step_s'] * 1e3:9.1f} ms "
              f"({rows[-1]['wall_s']:.1f}s)", file=sys.stderr)
    base = rows[0]["step_s"]
    flex = next(r for r in rows if r["system"].startswith("FLEX"))["step_s"]
    for r in rows:
        r["vs_megatron"], r["vs_flex"] = base / r["step_s"], flex / r["step_s"]
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model (layers) | system | layout | step ms | a2a ms | peak GiB | OOM | "
           "speed-up vs Megatron | vs FLEX |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} ({r['layers']}) | {r['system']} | {r['layout']} | "
                   f"{r['step_s'] * 1e3:.0f} | {r['a2a_s'] * 1e3:.0f} | {r['peak_GiB']:.1f} | "
                   f"{'yes' if r['oom'] else 'no'} | {r['vs_megatron']:.2f}x | "
                   f"{r['vs_flex']:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8x7B e8k2 only")
    p.add_argument("--iterations", type=int, default=4)
    args = p.parse_args(argv)
    rows = []
    for name, layers, tp in MODELS[:1] if args.quick else MODELS:
        rows += run(name, layers, tp, args.iterations)
    print(table(rows))
    print("\npublished (LAER-MoE): LAER 1.11-1.69x vs Megatron, 1.03-1.39x vs FLEX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
