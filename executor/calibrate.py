"""``moesim calibrate``: fit the cost model's parameters to this machine and backend.

Launches :mod:`moesim.executor.calibrate_bench` on N local ranks (the executor's own code paths:
its expert op over a layer-pass's slots, the stand-in matmul, its optimizer step, host copies,
every collective kind as the interpreter runs it), then fits every parameter on *relative*
error (least squares on relative or log time) from those microbenchmarks and a short run of
calibrate's own workload — never from validation runs:

- compute, the cost model's ``max(bytes/mem_bw, flops/(peak·eff(m))) + launch`` per slot:
  ``launch_s`` from the smallest stand-in matmul (per-op overhead), ``peak_flops`` the best rate
  any measurement reached, ``gemm_eff_curve`` tabulated at every measured ``m`` from the expert
  forward and ``backward_gemm_eff_curve`` from the expert backward (dgrad + wgrad; on CPU it is
  2.4–4× a forward, not the 2× one curve would imply; see :func:`fit_compute`);
  ``dense_gemm_eff_curve`` from the executor's stand-in for attention at the FLOPs the
  lowering gives it (:func:`fit_dense`), so the simulator's dense compute costs exactly the
  workload the default layout's executor runs; ``attention_block_eff`` from the real attention
  block a parallel layout runs, forward, backward and recompute at each TP shard size
  (:mod:`moesim.executor.calibrate_block`), for the ops a layout lowers as that block;
  ``mem_bw_GBps`` from the optimizer step (its Adam traffic per parameter as the lowering counts
  it, ``2·bytes_optim + bytes_grad + bytes_weight``, with the executor's one call per
  expert-sized tensor), so the memory-bound op it costs is right; ``host_optimizer_GBps`` from
  the host Adam;
- collectives, ``t = α + (n − 1)·α_peer + factor · S / busbw`` with nccl-tests' bus factors
  (``α_peer`` where several group sizes ``n`` were measured), fitted *per kind*
  (all-to-all, all-reduce, all-gather, reduce-scatter, broadcast, reduce, send/recv) over every
  group size 2..N and size 4 KiB–4 MiB, non-negative, relative error; written as the link
  level's ``per_kind`` table (gloo's all-reduce costs ~1.4 ms where its all-to-all costs
  ~0.2 ms, so one pair cannot serve both); the level's own ``(α, busbw)`` is a fit over all
  kinds (all-to-all rows weighted ×4), used by kinds that were not measured;
- the host link (``HostCopy``): latency and bandwidth of host copies;
- ``op_overhead_s``: the interpreter's own time between two ops (median gap over a program of
  empty ops run by :meth:`RankExecutor.run`);
- ``context_factors`` (``--context-iterations N``, default 6; 0 skips): how much longer each
  kind of op takes inside a training step than in those microbenchmarks, from N iterations of
  the executor on calibrate's own workload (a synthetic trace with its own seed, never a
  validation trace), see :mod:`moesim.executor.calibrate_context`.

Compute is measured with all ranks computing at once (as in a run), so the concurrency slowdown
is in the curves and ``cores_shared_by`` is 1; the slowdown of an expert forward with all ranks
computing vs rank 0 alone is printed and written beside it for the record. (Raw files of the
older single-rank benchmark, without ``meta.compute_concurrent``, get
``cores_shared_by = max(1, ranks / cpu_count)`` as before.)

Output: a Cluster TOML (1 node × N ranks, the measured link) and its HardwareProfile TOML
beside it (``<stem>-hw.toml``), both written atomically; ``moesim.specs.load_cluster(path)``
loads them. With one rank (``--world-size 1``: a machine with a single GPU, where NCCL cannot
run two ranks) no collective is measured: compute, memory and host parameters are calibrated
and the link levels are copied, and labelled as copied, from ``--links-from`` (default: the
H100 preset under NCCL, ``cpu-gloo-4`` under gloo). On CUDA the device memory is the GPU's.

Shape legend: ``K`` measurements.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from moesim.errors import MoesimError
from moesim.executor.calibrate_fit import (  # noqa: F401  (re-exported)
    GB,
    bus_factor,
    fit_alpha_beta,
    fit_alpha_peer_beta,
    fit_collectives,
    fit_compute,
    fit_dense,
    fit_profile,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=2, help="ranks to measure collectives on")
    p.add_argument("-o", "--out", "--output", dest="out", default="calibrated/cpu-gloo.toml",
                   help="cluster TOML to write (the hardware profile goes to <stem>-hw.toml)")
    p.add_argument("--model", default="small-cpu", help="model whose expert shape to "
                   "benchmark (default: small-cpu, the CPU validation model)")
    p.add_argument("--repeats", "--reps", dest="reps", type=int, default=15,
                   help="repeats per collective measurement")
    p.add_argument("--raw", default=None, help="also keep the raw measurements (JSON) here")
    p.add_argument("--from-raw", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hang-timeout-s", type=float, default=300.0)
    p.add_argument("--links-from", default=None, metavar="CLUSTER",
                   help="with --world-size 1 (nothing to measure collectives on): the cluster "
                   "preset or TOML whose link levels to copy (default: h100-4x8-ib400x8 "
                   "under NCCL, cpu-gloo-4 under gloo)")
    p.add_argument("--context-iterations", type=int, default=6, metavar="N",
                   help="then run the calibration workload (its own synthetic trace; static "
                   "EP and SwiftMoE) for N iterations and fit how much longer each kind of op "
                   "takes inside a step than in the microbenchmarks (default 6; 0 skips)")
    from moesim.executor.run_args import add_backend_argument

    add_backend_argument(p)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Measure (or reuse ``--from-raw``), fit, measure the context factors, write the TOMLs,
    print a summary."""
    from moesim.executor import calibrate_context as context
    from moesim.executor.launch import launch
    from moesim.specs import load_model

    if args.world_size < 1:
        raise MoesimError("--world-size must be >= 1 (2 or more to measure collectives)")
    iterations = int(getattr(args, "context_iterations", 0) or 0)
    if iterations < 0:
        raise MoesimError("--context-iterations must be >= 0 (0 skips the context stage)")
    links_from = getattr(args, "links_from", None)
    if links_from and args.world_size > 1:
        raise MoesimError("--links-from is for --world-size 1 only (with 2 or more ranks the "
                          "links are measured); drop it")
    if links_from:
        _links_of(links_from)  # a bad name fails now, not after the benchmark
    backend = getattr(args, "backend", None)
    with tempfile.TemporaryDirectory(prefix="moesim-cal-") as tmp:
        if args.from_raw:
            raw = json.loads(Path(args.from_raw).read_text())
        else:
            out = Path(tmp) / "raw.json"
            launch(["--model", args.model, "--out", str(out), "--reps", str(args.reps)],
                   args.world_size, Path(tmp) / "run", hang_timeout_s=args.hang_timeout_s,
                   module="moesim.executor.calibrate_bench", backend=backend)
            raw = json.loads(out.read_text())
        fit = fit_profile(raw, load_model(args.model))
        if fit["collectives"] is None:
            fit["links_from"] = raw["links_from"] = links_from or raw.get("links_from") or (
                "h100-4x8-ib400x8" if raw["meta"]["backend"] == "nccl" else "cpu-gloo-4")
        if iterations and not args.from_raw:
            base = write_profile(fit, raw["meta"], Path(tmp) / "base" / "profile.toml")
            raw["context"] = context.measure(base, args.model, args.world_size,
                                             Path(tmp) / "context", iterations, backend,
                                             args.hang_timeout_s)
    if raw.get("context"):
        fit["context_factors"] = context.fit_factors(raw["context"])
    if args.raw:
        from moesim.results import atomic_write_bytes

        atomic_write_bytes(Path(args.raw), json.dumps(raw).encode())
    cluster_path = write_profile(fit, raw["meta"], Path(args.out))
    print(summary_text(fit, raw["meta"], cluster_path))
    if raw.get("context"):
        print(f"  context factors (in-step / microbenchmark time, from "
              f"{'the raw file' if args.from_raw else f'{iterations} iterations'} of the "
              f"calibration workload; other phases take their class's pooled factor, "
              f"classes not listed x1):")
        print("\n".join(context.summary_lines(raw["context"], fit["context_factors"])))
    return 0


# -- fitting ---------------------------------------------------------------------------------


# -- writing ---------------------------------------------------------------------------------


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def write_profile(fit: dict, meta: dict, out: Path) -> Path:
    """Write ``out`` (Cluster) and ``<stem>-hw.toml`` (HardwareProfile) atomically."""
    import tomli_w

    from moesim.results import atomic_write_bytes
    from moesim.specs import load_cluster

    world, cores = int(meta["world_size"]), int(meta.get("cpu_count") or 1)
    shared = fit["cores_shared_by"]
    c, coll = fit["compute"], fit["collectives"]
    hw_path = out.with_name(f"{out.stem}-hw.toml")
    src = (f"moesim calibrate: {meta['backend']}, torch {meta['torch']}, {world} ranks, "
           f"{cores} CPUs{', ' + meta['device'] if meta.get('device') else ''}, "
           f"model {meta['model']}")
    hw = {"description": f"calibrated {meta['backend']} rank ({world} ranks)", "source": src,
          "peak_flops": c["peak_flops"], "mem_bw_GBps": fit["mem_bw_GBps"],
          "launch_s": c["launch_s"], "gemm_eff_curve": [list(p) for p in fit["gemm_eff_curve"]],
          "elementwise_eff": 1.0, "host_optimizer_GBps": fit["host_optimizer_GBps"],
          "collective_latency_s": 0.0, "cores_shared_by": shared,
          "op_overhead_s": fit.get("op_overhead_s", 0.0)}
    if fit.get("context_factors"):
        hw["context_factors"] = dict(fit["context_factors"])
    if c.get("backward_curve"):
        hw["backward_gemm_eff_curve"] = [list(p) for p in c["backward_curve"]]
    if fit.get("dense_curve"):
        hw["dense_gemm_eff_curve"] = [list(p) for p in fit["dense_curve"]]
    if fit.get("attention_block"):
        hw["attention_block_eff"] = {k: [list(p) for p in v]
                                     for k, v in fit["attention_block"].items()}
    if coll is None:
        intra, inter, copied = _links_of(fit["links_from"])
    else:
        intra = inter = {"bw_GBps": coll["busbw_GBps"], "latency_s": coll["alpha_s"],
                         "per_kind": {k: {"bw_GBps": v["busbw_GBps"], "latency_s": v["alpha_s"],
                                          **({"latency_per_peer_s": v["alpha_peer_s"]}
                                             if v.get("alpha_peer_s") else {})}
                                      for k, v in coll["per_kind"].items()}}
    total = _mem_total_gib()
    device_gib = meta.get("device_memory_GiB") or round(total / world, 2)
    cluster = {"description": f"1 node x {world} ranks, calibrated", "source": src,
               "num_nodes": 1, "gpus_per_node": world, "hardware": hw_path.name,
               "gpu_memory_GiB": device_gib, "host_memory_GiB": round(total, 2),
               "intra": intra, "inter": inter,
               "host": {"bw_GBps": fit["host_link"]["bw_GBps"],
                        "latency_s": fit["host_link"]["latency_s"]}}
    how = ("1: compute was measured with all ranks computing at once" if
           meta.get("compute_concurrent") else "ranks / CPUs")
    hw_head = (f"# Calibrated by `moesim calibrate` ({src}).\n"
               f"# cores_shared_by = {how}; measured slowdown with all ranks computing: "
               f"{fit['cores_shared_measured']:.2f}.\n"
               f"# Compute fit over per-slot expert timings: MAPE {c['mape_pct']:.1f}%, "
               f"max {c['max_pct']:.1f}% (forward and backward curves).\n"
               "# mem_bw_GBps: effective, from the executor's Adam step; collective latency is "
               "in the cluster's link level.\n"
               + ("# context_factors: in-step over microbenchmark time per op class, from the "
                  "calibration workload (moesim.executor.calibrate_context).\n"
                  if fit.get("context_factors") else ""))
    if coll is None:
        cl_head = (f"# Calibrated by `moesim calibrate` ({src}).\n"
                   f"# Links NOT measured (one rank, no collective to time): intra and inter "
                   f"copied from {copied}.\n")
    else:
        kinds = "; ".join(f"{k}: α {v['alpha_s'] * 1e6:.0f} us, busbw "
                          f"{v['busbw_GBps']:.2f} GB/s (MAPE {v['mape_pct']:.0f}%)"
                          for k, v in coll["per_kind"].items())
        cl_head = (f"# Calibrated by `moesim calibrate` ({src}).\n"
                   f"# Link level: one α/busbw over all collectives (MAPE "
                   f"{coll['mape_pct']:.1f}%), used by kinds not in per_kind.\n"
                   f"# per_kind fits: {kinds}\n")
    atomic_write_bytes(hw_path, (hw_head + tomli_w.dumps(hw)).encode())
    atomic_write_bytes(out, (cl_head + tomli_w.dumps(cluster)).encode())
    load_cluster(out)  # must load
    return out


def _links_of(name: str) -> tuple[dict, dict, str]:
    """The intra and inter link levels of cluster ``name`` as TOML tables, and its name."""
    from dataclasses import asdict

    from moesim.specs import load_cluster

    cluster = load_cluster(name)

    def table(link) -> dict:
        out = asdict(link)
        if not out["per_kind"]:
            del out["per_kind"]
        return out
    return table(cluster.intra), table(cluster.inter), cluster.name


def summary_text(fit: dict, meta: dict, path: Path) -> str:
    from moesim.executor.calibrate_block import summary_line

    c, coll = fit["compute"], fit["collectives"]
    lines = [f"calibrated {meta['backend']} on {meta['world_size']} ranks "
             f"({meta['cpu_count']} CPUs) -> {path}",
             f"  compute: peak {c['peak_flops'] / 1e9:.1f} GFLOP/s, launch "
             f"{c['launch_s'] * 1e6:.1f} us, eff(m) at {len(c['curve'])} points, fit MAPE "
             f"{c['mape_pct']:.1f}% (max {c['max_pct']:.1f}%)",
             f"  cores_shared_by {fit['cores_shared_by']:.2f} (measured slowdown with all "
             f"ranks computing: {fit['cores_shared_measured']:.2f}; "
             f"{'in the curves' if meta.get('compute_concurrent') else 'ranks / cpus'}), "
             f"op overhead {fit.get('op_overhead_s', 0.0) * 1e6:.1f} us, load average "
             f"{meta.get('load_avg', float('nan')):.2f}",
             summary_line(fit.get("block_rows") or []),
             f"  memory: {fit['mem_bw_GBps']:.2f} GB/s (Adam), host Adam "
             f"{fit['host_optimizer_GBps']:.2f} GB/s, host copy "
             f"{fit['host_link']['bw_GBps']:.2f} GB/s"]
    if coll is None:
        lines.append(f"  collectives: not measured (one rank); links copied from "
                     f"{fit['links_from']}")
        return "\n".join(lines)
    lines.append(f"  collectives: alpha {coll['alpha_s'] * 1e6:.0f} us, busbw "
                 f"{coll['busbw_GBps']:.3f} GB/s, fit MAPE {coll['mape_pct']:.1f}%")
    for k, v in coll["per_kind"].items():
        lines.append(f"    {k:<15} alpha {v['alpha_s'] * 1e6:7.0f} us  + "
                     f"{v.get('alpha_peer_s', 0.0) * 1e6:5.0f} us/peer  busbw "
                     f"{v['busbw_GBps']:7.3f} GB/s  MAPE {v['mape_pct']:5.1f}%")
    return "\n".join(lines)
