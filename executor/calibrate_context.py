"""The context stage of ``moesim calibrate``: how long each kind of op takes *inside* a
training step, against the microbenchmarks that fitted the rest of the profile.

The microbenchmarks time each op back to back, with caches warm and gloo's threads awake. In a
step the same op follows tens of milliseconds of cache-evicting GEMMs. On the 2-vCPU VM this
was built on, ``benchmarks/collective_context.py`` measured that context alone making the token
all-to-all 1.1–1.6× and a 256 B all-reduce 1.8–9.4× slower. The compute curves also drift by
±20 % between two calibrations minutes apart. A profile from microbenchmarks alone therefore
predicted every configuration of the CPU validation grid low (predicted/measured 0.69–1.0).

This stage runs a short training job of its own and measures the gap:

1. **Workload.** A synthetic trace of the calibrated model's shape. It is moderately skewed
   (lognormal σ :data:`SIGMA`), uses seed :data:`SEED`, and runs :data:`POLICIES` (static EP;
   SwiftMoE with one spare slot per rank, for the host and re-layout ops). It is never a trace
   of the validation grid, which uses seeds = world size and the real SmartMoE sample.
2. **Measure.** The executor (``moesim run``, ``--timeline all``) runs it for ``iterations``
   iterations after 2 warm-up runs. The simulator lowers the same iterations with the profile
   just fitted (no factors yet). The two timelines pair up op by op: same op index and rank.
3. **Fit.** Each op has a :func:`moesim.costmodel.context_key`
   (``class.phase.direction``). Its factor is Σ measured / Σ predicted over every (op, rank,
   iteration) of that key. A time-weighted ratio is used, not a median, because a step's
   length is a sum and the slow tail is part of it. Keys with fewer than :data:`MIN_SAMPLES`
   samples or under :data:`MIN_PREDICTED_S` of predicted time are left out. Each class also
   gets its pooled factor, for phases the workload does not exercise. Factors are clipped to
   :data:`CLIP`.

Collective durations run from the last member's arrival (:func:`moesim.executor.record.
measured_schedule`), as the simulator counts them, so a factor measures the op, not a wait for
a straggler.

:func:`remeasure_context` runs the workload again later and pools the sums:
``benchmarks/accuracy.py`` calls it after each configuration's runs, so the factors sample
the machine on both sides of them.

The validation runs (``moesim validate``, ``benchmarks/accuracy.py``) are still never fitted.
Only this workload is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

POLICIES = ("static_ep", "swiftmoe")
SEED = 9001
SIGMA = 0.6
MIN_SAMPLES = 4
MIN_PREDICTED_S = 1e-4
CLIP = (0.2, 5.0)
WARMUP = 2


def workload_trace(model, world: int, iterations: int):
    """The calibration workload's routing trace (see the module docstring)."""
    from moesim.traces.synth import SynthConfig, synthesize

    cfg = SynthConfig(num_layers=model.num_layers, num_ranks=world,
                      num_experts=model.num_experts, top_k=model.top_k,
                      tokens_per_rank=model.tokens_per_rank,
                      micro_batches_per_iteration=model.micro_batches,
                      num_iterations=iterations, doc_tokens=512, skew_start=1.0,
                      popularity_sigma=SIGMA, model=f"{model.name} (calibration workload)")
    return synthesize(cfg, rng=SEED)


def _policy_knobs(name: str, model, world: int) -> list[str]:
    if name == "swiftmoe":  # one spare slot per rank, the paper's capacity factor
        return [f"slots_per_rank={model.num_experts // world + 1}", "capacity_factor=1.0"]
    return []


def measure(profile: Path, model_name: str, world: int, workdir: Path, iterations: int,
            backend: str | None = None, hang_timeout_s: float = 300.0
            ) -> dict[str, list[float]]:
    """Run the workload on ``world`` local ranks and the simulator with ``profile`` →
    ``{context_key: [measured_s, predicted_s, samples]}``."""
    from moesim.executor.launch import launch
    from moesim.executor.worker import parse_knobs, resolve_cluster
    from moesim.policies import make_policy
    from moesim.simulate import simulate
    from moesim.specs import load_model
    from moesim.traces.io import save_trace

    model = load_model(model_name)
    workdir.mkdir(parents=True, exist_ok=True)
    trace_path = workdir / "context-trace.npz"
    save_trace(workload_trace(model, world, iterations), trace_path)
    cluster = resolve_cluster(str(profile), world, cuda=backend == "nccl")
    sums: dict[str, list[float]] = {}
    for name in POLICIES:
        knobs = _policy_knobs(name, model, world)
        measured, predicted = workdir / f"{name}-measured", workdir / f"{name}-predicted"
        argv = ["--trace", str(trace_path), "--model", model_name, "--policy", name,
                "--cluster", str(profile), "--iterations", f"0:{iterations}",
                "--out", str(measured), "--timeline", "all", "--warmup", str(WARMUP)]
        for k in knobs:
            argv += ["--knob", k]
        launch(argv, world, measured, hang_timeout_s=hang_timeout_s, backend=backend)
        simulate(trace_path, model, cluster, make_policy(name, parse_knobs(knobs)),
                 iterations=(0, iterations), out_dir=predicted,
                 timeline_iterations=range(iterations), progress=False)
        for it in range(iterations):
            accumulate(sums, _events(measured, it), _events(predicted, it))
    return sums


def remeasure_context(raw_path: Path, out: Path, model: str, iterations: int,
                      backend: str | None = None, hang_timeout_s: float = 300.0) -> Path:
    """Run the calibration workload once more and refit: the context sums of ``raw_path``
    (a ``--raw`` file of a calibration with a context stage) gain this run's, and the profile
    ``out`` is rewritten from the pooled sums; the microbenchmark fit is unchanged. A validation
    that calls it after its runs gets factors measured before *and* after them, so a machine
    whose speed drifts over minutes is sampled on both sides of the runs."""
    from moesim.executor.calibrate import fit_profile, write_profile
    from moesim.results import atomic_write_bytes
    from moesim.specs import load_model

    raw = json.loads(Path(raw_path).read_text())
    if "context" not in raw:
        raise MoesimError(f"{raw_path} has no context measurements; calibrate with "
                          "--context-iterations N > 0 first")
    fit = fit_profile(raw, load_model(model))
    if fit["collectives"] is None:
        fit["links_from"] = raw["links_from"]
    with tempfile.TemporaryDirectory(prefix="moesim-cal-") as tmp:
        base = write_profile(fit, raw["meta"], Path(tmp) / "base" / "profile.toml")
        more = measure(base, model, int(raw["meta"]["world_size"]), Path(tmp) / "ctx",
                       iterations, backend, hang_timeout_s)
    for key, (m, p, n) in more.items():
        entry = raw["context"].setdefault(key, [0.0, 0.0, 0])
        raw["context"][key] = [entry[0] + m, entry[1] + p, entry[2] + n]
    fit["context_factors"] = fit_factors(raw["context"])
    atomic_write_bytes(Path(raw_path), json.dumps(raw).encode())
    return write_profile(fit, raw["meta"], Path(out))


def _events(run_dir: Path, iteration: int) -> list[dict]:
    path = run_dir / f"timeline_iter{iteration}.json"
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]


def event_key(event: dict) -> str:
    """:func:`moesim.costmodel.context_key` of the op behind a timeline event."""
    from moesim import ops
    from moesim.costmodel import context_class

    a = event["args"]
    return f"{context_class(getattr(ops, a['op']))}.{event['cat']}.{a['direction']}"


def accumulate(sums: dict[str, list[float]], measured: list[dict],
               predicted: list[dict]) -> None:
    """Add one iteration's paired events (µs) to ``sums`` (seconds, per context key)."""
    pred = {(e["pid"], e["args"]["index"]): e for e in predicted}
    meas = {(e["pid"], e["args"]["index"]): e for e in measured}
    if pred.keys() != meas.keys():
        raise MoesimError("calibration workload: the executor ran other ops than the simulator "
                          "lowered (a policy that is not deterministic?); run calibrate again "
                          "with --context-iterations 0 and report it")
    for k, e in meas.items():
        p = pred[k]
        entry = sums.setdefault(event_key(p), [0.0, 0.0, 0])
        entry[0] += e["dur"] * 1e-6
        entry[1] += p["dur"] * 1e-6
        entry[2] += 1


def fit_factors(sums: dict[str, list[float]]) -> dict[str, float]:
    """Per-key and per-class factors from :func:`measure`'s sums (module docstring, step 3)."""
    pooled: dict[str, list[float]] = {}
    for key, (m, p, n) in sums.items():
        entry = pooled.setdefault(key.partition(".")[0], [0.0, 0.0, 0])
        entry[0] += m
        entry[1] += p
        entry[2] += n
    out = {}
    for table in (pooled, sums):
        for key, (m, p, n) in sorted(table.items()):
            if n >= MIN_SAMPLES and p >= MIN_PREDICTED_S and m > 0:
                out[key] = round(float(np.clip(m / p, *CLIP)), 4)
    return out


def summary_lines(sums: dict[str, list[float]], factors: dict[str, float]) -> list[str]:
    """The pooled per-class factors, then one line per fitted key, biggest measured time
    first."""
    pooled = [f"{k} x{v:.2f}" for k, v in sorted(factors.items()) if "." not in k]
    lines = [f"    pooled: {', '.join(pooled)}"] if pooled else []
    for key, (m, p, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        if key in factors:
            lines.append(f"    {key:32s} x{factors[key]:5.2f}  ({m * 1e3:8.1f} ms measured / "
                         f"{p * 1e3:8.1f} ms predicted, {int(n)} ops)")
    return lines
