"""Model, hardware and cluster descriptions and the preset files they load from: one import for
all of it. The descriptions live in :mod:`moesim.model_spec` (:class:`ModelSpec`) and
:mod:`moesim.cluster_spec` (:class:`LinkLevel`, :class:`HardwareProfile`, :class:`Cluster`);
this module re-exports them and holds the loaders.

Units are in the names: ``*_bytes``, ``*_s`` (seconds), ``*_GBps`` (1e9 bytes/s), ``*_flops``
(floating-point operations per second for throughputs, plain counts otherwise), ``*_GiB``.

Presets are TOML files under ``moesim/presets/{models,clusters,hardware}/``; every number in them
carries its source in a comment. ``load_model("mixtral-8x7b-e8k2")`` finds a preset by name;
``load_model("path/to/my_model.toml")`` loads a user's copy. The same goes for clusters and
hardware profiles (a cluster names its hardware profile by name or path).
``list_presets(kind)`` and ``preset_descriptions(kind)`` list them (``moesim presets``); errors in
a file raise :class:`MoesimError` naming the file, the table and the field.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from moesim.cluster_spec import (
    COLLECTIVE_KINDS,
    CONTEXT_CLASSES,
    Cluster,
    CollectiveLink,
    HardwareProfile,
    LinkLevel,
    split_cluster_shape,
)
from moesim.errors import MoesimError
from moesim.model_spec import SHAPE_FIELDS, ModelSpec, attention_params
from moesim.spec_checks import MAX_COUNT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


__all__ = ["COLLECTIVE_KINDS", "CONTEXT_CLASSES", "KINDS", "MAX_COUNT", "PRESET_DIR", "Cluster",
           "CollectiveLink", "HardwareProfile", "LinkLevel", "ModelSpec", "attention_params",
           "cluster_from_dict", "list_presets", "load_cluster", "load_hardware", "load_model",
           "model_from_dict", "preset_descriptions", "preset_path", "spec_to_dict",
           "split_cluster_shape", "tomllib"]


# --------------------------------------------------------------------------------------------
# preset files


KINDS = ("models", "clusters", "hardware", "parallel")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise MoesimError(f"unknown preset kind {kind!r}; choose one of {', '.join(KINDS)}")


def preset_path(kind: str, name_or_path: str | Path) -> Path:
    """The file a preset name or a path refers to (``"a100-80g"`` → the built-in TOML file)."""
    _check_kind(kind)
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = PRESET_DIR / kind / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    raise MoesimError(
        f"no {kind} preset or file {str(name_or_path)!r}; "
        f"choose one of {', '.join(list_presets(kind))} or give a path to a .toml/.json file"
    )


def _read_table(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    path = preset_path(kind, name_or_path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MoesimError(f"cannot parse {path}: {str(exc)[:100] or type(exc).__name__}; fix "
                          "the file's syntax") from None
    if not isinstance(data, dict):
        raise MoesimError(f"{path}: expected a table of fields at the top level, "
                          f"got {type(data).__name__}")
    return data, path


def _build(cls: type, data: Any, path: Path, where: str = "") -> Any:
    """``cls(**data)`` with errors that name the file, the table and the field."""
    label = f"{path}: {f'[{where}] ' if where else ''}"
    if not isinstance(data, dict):
        raise MoesimError(f"{label}expected a table of {cls.__name__} fields, got {data!r}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MoesimError(f"{label}unknown {cls.__name__} field(s) {unknown}; "
                          f"known fields are {sorted(names)}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MoesimError(f"{label}missing {cls.__name__} field(s) {missing}; add them")
    try:
        return cls(**data)
    except MoesimError as exc:
        raise MoesimError(f"{label}{exc}") from None
    except (TypeError, ValueError) as exc:
        raise MoesimError(f"{label}{cls.__name__}: {exc}; fix the field's value") from None


def list_presets(kind: str) -> list[str]:
    """Names of the built-in presets of one kind: 'models', 'clusters' or 'hardware'."""
    _check_kind(kind)
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.toml"))


def preset_descriptions(kind: str) -> dict[str, str]:
    """``{name: one-line description}`` of the built-in presets of one kind, sorted by name."""
    out = {}
    for name in list_presets(kind):
        data, _ = _read_table(kind, name)
        out[name] = str(data.get("description", "")).strip()
    return out


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name or a TOML/JSON file."""
    data, path = _read_table("models", name_or_path)
    return model_from_dict(data, path)


def model_from_dict(data: dict[str, Any], source: Path) -> ModelSpec:
    """A :class:`ModelSpec` from a table of its fields (``source`` names it in errors and
    gives the default name), e.g. the ``model`` table of a run's ``config.json``."""
    data = dict(data)
    data.setdefault("name", source.stem)
    return _build(ModelSpec, data, source)


def _hardware_from(data: dict[str, Any], path: Path, default_name: str,
                   where: str = "") -> HardwareProfile:
    data = dict(data)
    data.setdefault("name", default_name)
    return _build(HardwareProfile, data, path, where)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A :class:`HardwareProfile` from a preset name or a TOML/JSON file."""
    data, path = _read_table("hardware", name_or_path)
    return _hardware_from(data, path, path.stem)


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A :class:`Cluster` from a preset name or a TOML/JSON file, optionally reshaped:
    ``NAME@NODES`` keeps the GPUs per node, ``NAME@NODESxGPUS`` sets both (see
    :func:`split_cluster_shape`; an existing file whose name has an ``@`` is read as it is).

    ``hardware`` is a hardware preset name, a path (relative to the cluster file), or an inline
    table of :class:`HardwareProfile` fields.
    """
    if not Path(name_or_path).is_file() and "@" in str(name_or_path):
        base, shape = split_cluster_shape(str(name_or_path))
        return load_cluster(base).with_shape(*shape)
    data, path = _read_table("clusters", name_or_path)
    return cluster_from_dict(data, path)


def cluster_from_dict(data: dict[str, Any], path: Path) -> Cluster:
    """A :class:`Cluster` from a table of its fields (nested link levels and hardware as in a
    cluster file; ``path`` anchors relative hardware paths and names errors)."""
    data = dict(data)
    data.setdefault("name", path.stem)
    for level in ("intra", "inter", "host"):
        if isinstance(data.get(level), dict):
            data[level] = _build(LinkLevel, data[level], path, level)
    hw = data.get("hardware")
    if isinstance(hw, str):
        hw_path = Path(hw)
        if hw_path.suffix and not hw_path.is_absolute():
            hw_path = path.parent / hw_path
        data["hardware"] = load_hardware(hw_path if hw_path.suffix else hw)
    elif isinstance(hw, dict):
        data["hardware"] = _hardware_from(hw, path, f"{path.stem}-hw", "hardware")
    return _build(Cluster, data, path)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready dict of any of the spec dataclasses (nested ones included); optional
    fields left at their empty default (a link level's ``per_kind``, the hardware's
    ``backward_gemm_eff_curve``, ``dense_gemm_eff_curve``, ``op_overhead_s`` and
    ``context_factors``, the model's optional shape facts) are omitted,
    so a spec without them reads as it did before they existed."""
    return _drop_empty(dataclasses.asdict(spec))


_OPTIONAL_EMPTY = ("per_kind", "backward_gemm_eff_curve", "dense_gemm_eff_curve",
                   "op_overhead_s", "context_factors", "attention_block_eff",
                   *SHAPE_FIELDS, "tied_embeddings")


def _drop_empty(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_empty(v) for k, v in obj.items()
                if not (k in _OPTIONAL_EMPTY and not v)}
    return obj

