"""Model, hardware and cluster descriptions, and the preset files they load from.

Units are in the names: ``*_bytes``, ``*_s`` (seconds), ``*_GBps`` (1e9 bytes/s), ``*_flops``
(floating-point operations per second for throughputs, plain counts otherwise), ``*_GiB``.

Presets are TOML files under ``moesim/presets/{models,clusters,hardware}/``; every number in them
carries its source in a comment. ``load_model("mixtral-8x7b-e8k2")`` finds a preset by name;
``load_model("path/to/my_model.toml")`` loads a user's copy. The same goes for clusters and
hardware profiles (a cluster names its hardware profile by name or path).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import MoesimError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise MoesimError(
                f"{type(obj).__name__}.{name} must be a positive number, got {value!r}; "
                f"fix the value in the spec"
            )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One MoE model's shape and training set-up.

    ``num_layers`` counts MoE layers only. An expert is an FFN of ``hidden_size ×
    ffn_hidden_size`` with 3 matrices when ``gated`` (SwiGLU) else 2. ``tokens_per_rank`` is the
    tokens one rank feeds one micro-batch (sequence length × micro-batch size); an iteration has
    ``micro_batches`` of them. Bytes per element: weights, gradients, optimizer state (mixed
    precision Adam: fp32 master + m + v = 12). ``dense_flops_per_token`` is the forward FLOPs of one
    layer's non-MoE part (attention, dense FFN, router) per token; 0 means "derive from the shape":
    ``8·H² + 4·seq·H`` (QKV+output projections, and causal-masked score/value products).
    """

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    gated: bool = True
    seq_len: int = 2048
    tokens_per_rank: int = 2048
    micro_batches: int = 1
    bytes_weight: float = 2.0
    bytes_grad: float = 2.0
    bytes_optim: float = 12.0
    bytes_activation: float = 2.0
    num_shared_experts: int = 0
    dense_flops_per_token: float = 0.0
    dense_params_per_layer: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k",
                  "seq_len", "tokens_per_rank", "micro_batches", "bytes_weight", "bytes_grad",
                  "bytes_activation")
        if self.top_k > self.num_experts:
            raise MoesimError(
                f"ModelSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "lower top_k or raise num_experts"
            )
        if self.bytes_optim < 0 or self.dense_flops_per_token < 0 or self.num_shared_experts < 0:
            raise MoesimError("ModelSpec.bytes_optim, dense_flops_per_token and "
                              "num_shared_experts must be >= 0")

    @property
    def params_per_expert(self) -> int:
        """Weights in one expert FFN (3·H·F gated, 2·H·F otherwise)."""
        return (3 if self.gated else 2) * self.hidden_size * self.ffn_hidden_size

    @property
    def expert_flops_per_token(self) -> float:
        """Forward FLOPs of one expert on one token (2 per multiply-add)."""
        return 2.0 * self.params_per_expert

    @property
    def expert_weight_bytes(self) -> float:
        return self.params_per_expert * self.bytes_weight

    @property
    def attention_flops_per_token(self) -> float:
        """Forward FLOPs of a layer's non-MoE part per token (see class docstring)."""
        if self.dense_flops_per_token > 0:
            return self.dense_flops_per_token
        h, s = self.hidden_size, self.seq_len
        shared = self.num_shared_experts * self.expert_flops_per_token
        return 8.0 * h * h + 4.0 * s * h + shared

    @property
    def dense_params(self) -> float:
        """Non-expert parameters of one layer (attention 4·H² plus shared experts) unless given."""
        if self.dense_params_per_layer > 0:
            return self.dense_params_per_layer
        return 4.0 * self.hidden_size**2 + self.num_shared_experts * self.params_per_expert

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's hidden state on the wire."""
        return self.hidden_size * self.bytes_activation

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class LinkLevel:
    """One level of the interconnect, per GPU: bus bandwidth (nccl-tests' busbw) and latency."""

    bw_GBps: float
    latency_s: float

    def __post_init__(self) -> None:
        _positive(self, "bw_GBps")
        if self.latency_s < 0:
            raise MoesimError("LinkLevel.latency_s must be >= 0")


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Compute throughput of one GPU (or one CPU rank) and per-op overheads.

    A GEMM of ``m`` tokens against a weight of ``w`` bytes costs
    ``max(w / mem_bw, flops / (peak_flops · eff(m))) + launch_s``; ``eff(m)`` is linear in
    ``log2 m`` between the points of ``gemm_eff_curve`` (``[[m, eff], ...]``, clamped at both
    ends). Small-``m`` GEMMs are memory bound: the weight must be read whatever ``m`` is.
    ``host_optimizer_GBps`` is the CPU Adam throughput over optimizer bytes (SwiftMoE keeps
    optimizer state on the host). ``collective_latency_s`` is NCCL's base latency per collective.
    ``cores_shared_by`` > 1 says several ranks share one socket's cores (CPU executor runs), so
    concurrent compute slows down by that factor.
    """

    name: str
    peak_flops: float
    mem_bw_GBps: float
    launch_s: float = 5e-6
    gemm_eff_curve: tuple[tuple[float, float], ...] = ((1.0, 0.01), (128.0, 0.3),
                                                       (2048.0, 0.72), (16384.0, 0.76))
    elementwise_eff: float = 0.8
    host_optimizer_GBps: float = 10.0
    collective_latency_s: float = 10e-6
    cores_shared_by: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        _positive(self, "peak_flops", "mem_bw_GBps", "host_optimizer_GBps", "elementwise_eff",
                  "cores_shared_by")
        curve = tuple((float(m), float(e)) for m, e in self.gemm_eff_curve)
        if not curve or any(m <= 0 or not 0 < e <= 1 for m, e in curve):
            raise MoesimError("HardwareProfile.gemm_eff_curve needs [m, eff] points with m > 0 "
                              "and 0 < eff <= 1")
        if any(b[0] <= a[0] for a, b in zip(curve, curve[1:])):
            raise MoesimError("HardwareProfile.gemm_eff_curve must have strictly increasing m")
        object.__setattr__(self, "gemm_eff_curve", curve)

    def gemm_efficiency(self, m: np.ndarray | float) -> np.ndarray:
        """Fraction of peak FLOP/s a GEMM with ``m`` rows reaches (vectorised)."""
        ms = np.log2(np.array([p[0] for p in self.gemm_eff_curve]))
        es = np.array([p[1] for p in self.gemm_eff_curve])
        return np.interp(np.log2(np.maximum(np.asarray(m, dtype=float), 1.0)), ms, es)


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs in ``num_nodes × gpus_per_node``; intra-node, inter-node (per-GPU NIC) and host links.

    Rank ``r`` lives on node ``r // gpus_per_node``. ``inter.bw_GBps`` is what one GPU's NIC
    moves (e.g. 400G InfiniBand ≈ 46–49 GB/s measured by nccl-tests).
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    intra: LinkLevel
    inter: LinkLevel
    host: LinkLevel
    gpu_memory_GiB: float
    host_memory_GiB: float = 1024.0
    hardware: HardwareProfile
    source: str = ""

    def __post_init__(self) -> None:
        _positive(self, "num_nodes", "gpus_per_node", "gpu_memory_GiB", "host_memory_GiB")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, ranks: np.ndarray | int) -> np.ndarray:
        return np.asarray(ranks) // self.gpus_per_node

    @property
    def gpu_memory_bytes(self) -> float:
        return self.gpu_memory_GiB * 2**30

    def replace(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)

    def with_shape(self, num_nodes: int, gpus_per_node: int | None = None) -> Cluster:
        """The same hardware with another node count (for scaling curves)."""
        gpn = self.gpus_per_node if gpus_per_node is None else gpus_per_node
        return dataclasses.replace(self, name=f"{self.name}@{num_nodes}x{gpn}",
                                   num_nodes=num_nodes, gpus_per_node=gpn)


# --------------------------------------------------------------------------------------------
# preset files


def _read_table(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / kind / f"{name_or_path}.toml"
    if not path.is_file():
        raise MoesimError(
            f"no {kind[:-1]} preset or file {str(name_or_path)!r}; "
            f"choose one of {', '.join(list_presets(kind))} or give a path to a .toml/.json file"
        )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MoesimError(f"cannot parse {path}: {exc}; fix the file's syntax") from None
    return data, path


def _build(cls: type, data: dict[str, Any], path: Path) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MoesimError(f"{path}: unknown {cls.__name__} field(s) {unknown}; "
                          f"known fields are {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise MoesimError(f"{path}: {exc}; add the missing field") from None


def list_presets(kind: str) -> list[str]:
    """Names of the built-in presets of one kind: 'models', 'clusters' or 'hardware'."""
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.toml"))


def load_model(name_or_path: str | Path) -> ModelSpec:
    data, path = _read_table("models", name_or_path)
    data.setdefault("name", path.stem)
    return _build(ModelSpec, data, path)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    data, path = _read_table("hardware", name_or_path)
    data.setdefault("name", path.stem)
    if "gemm_eff_curve" in data:
        data["gemm_eff_curve"] = tuple(tuple(p) for p in data["gemm_eff_curve"])
    return _build(HardwareProfile, data, path)


def load_cluster(name_or_path: str | Path) -> Cluster:
    data, path = _read_table("clusters", name_or_path)
    data.setdefault("name", path.stem)
    for level in ("intra", "inter", "host"):
        if isinstance(data.get(level), dict):
            data[level] = _build(LinkLevel, data[level], path)
    hw = data.get("hardware")
    if isinstance(hw, str):
        hw_path = Path(hw)
        if hw_path.suffix and not hw_path.is_absolute():
            hw_path = path.parent / hw_path
        data["hardware"] = load_hardware(hw_path if hw_path.suffix else hw)
    elif isinstance(hw, dict):
        hw = dict(hw)
        hw.setdefault("name", f"{path.stem}-hw")
        if "gemm_eff_curve" in hw:
            hw["gemm_eff_curve"] = tuple(tuple(p) for p in hw["gemm_eff_curve"])
        data["hardware"] = _build(HardwareProfile, hw, path)
    return _build(Cluster, data, path)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready dict of any of the spec dataclasses (nested ones included)."""
    return dataclasses.asdict(spec)

