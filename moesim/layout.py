"""Parallel layouts: how a training run folds its ranks (TP/SP, PP, CP, EP, ETP, ZeRO, recompute).

A :class:`ParallelLayout` is one more input of a run, beside model, cluster and policy. It is a
frozen, validated dataclass; :func:`parse_layout` reads the ``--parallel`` forms
(``NAME``, ``PATH.toml``, ``key=value[,key=value...]``, or ``NAME,key=value...`` to override a
preset's fields) and :func:`plan_layout` checks it against a world size and a model and turns it
into :class:`Stage` data: which world ranks form each pipeline stage and which transformer layers
(in which virtual chunks) each stage owns.

Rank order follows Megatron-Core's defaults (``tp-cp-ep-dp-pp``; Megatron-Core
``parallel_state.RankGenerator``): pipeline stages are the slowest-varying index, so stage ``s``
owns the contiguous ranks ``[s·W/p, (s+1)·W/p)``. Inside a stage, attention and dense layers
use the ``tp × cp × dp`` mapping (TP fastest: TP groups are consecutive ranks, which keeps them in
one node) and MoE layers the ``etp × ep × edp`` mapping of the same ranks — Megatron-Core's
*MoE parallel folding* (Liu et al., arXiv 2504.14960): the two mappings only have to agree on PP,
so ``world = t·c·d·p = et·e·edp·p``.

How the fields act (all of them in the lowering, :mod:`moesim.layered`, and the memory model,
:mod:`moesim.memory_layout`):

- ``tp``/``sp``: attention and dense-FFN weights and FLOPs are split over the TP group; without
  SP each block all-reduces its output (2 per layer forward, 2 backward: Shoeybi et al.); with SP
  (Korthikanti et al., arXiv 2205.05198) the all-reduce becomes an all-gather before and a
  reduce-scatter after each block. MoE layers under TP need SP when EP > 1 (Megatron-Core MoE
  README): each rank routes its own ``s·b/t`` tokens.
- ``pp``/``vpp``/``pp_schedule``: stages own contiguous layer ranges (``vpp`` chunks each when
  interleaved); every stage runs the schedule's order of forward and backward micro-batches
  (:mod:`moesim.pipeline`), with activations and gradients sent point to point between stages.
- ``cp``: each rank holds ``s/c`` of every sequence; attention passes K/V chunks around the CP
  ring (``c − 1`` steps forward, twice the bytes backward).
- ``ep``: ranks per EP group (None: what the policy uses — static EP its ``ep_size`` knob, the
  replicating and sharding policies every rank of a stage). ``etp``: expert tensor parallelism
  (static EP only; :mod:`moesim.expert_tp`): each expert split over ``etp`` consecutive ranks,
  an all-gather of the dispatched tokens before the experts and a reduce-scatter after.
- ``zero``: None keeps the policy's own gradient and optimizer scheme (what moesim did before
  layouts: gradients all-reduced, optimizer state sharded ZeRO-1 style); 0 plain data parallel;
  1 Megatron's distributed optimizer (reduce-scatter grads, all-gather params); 2 also shards
  gradients; 3 FSDP (parameters gathered per layer in forward and again in backward).
- ``recompute``: ``full`` re-runs ``recompute_num_layers`` layers (None: all) of each stage chunk
  before their backward (Megatron's ``block`` method: the first N layers); ``selective`` re-runs
  the modules in ``recompute_modules`` (Megatron-Core ``recompute_modules``).
- ``whole_model``: also model what the model declares beyond its MoE layers — its dense-only
  layers (``num_dense_layers``), the embedding on the first stage and the output head on the
  last (``vocab_size``). Every ``--parallel`` and every layout file turns it on
  (``whole_model=false`` turns it off);
  without ``--parallel`` it is off, which keeps the accounting moesim had before layouts (the
  MoE layers alone) and so every earlier number.
- ``a2a_overlap``: Megatron's ``--overlap-moe-expert-parallel-comm``: in steady state one
  micro-batch's forward and another's backward are merged layer by layer, so each one's token
  all-to-all runs beside the other's compute.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets" / "parallel"
SCHEDULES = ("1f1b", "interleaved", "gpipe")
RECOMPUTE = ("none", "selective", "full")
#: Megatron-Core ``recompute_modules`` names (TransformerConfig).
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe_act", "layernorm", "mla_up_proj", "moe")
_INT_FIELDS = ("tp", "pp", "vpp", "cp", "etp")
_TEXT_FIELDS = ("name", "description", "source")


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """How the ranks are folded (module docstring). Defaults: no TP/PP/CP, the policy's EP and
    optimizer scheme, no recompute — exactly what moesim simulated before layouts existed."""

    tp: int = 1
    sp: bool = False
    pp: int = 1
    vpp: int = 1
    pp_schedule: str = "1f1b"
    cp: int = 1
    ep: int | None = None
    etp: int = 1
    zero: int | None = None
    recompute: str = "none"
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ("core_attn",)
    a2a_overlap: bool = False
    tp_cross_node: bool = False
    whole_model: bool = False
    name: str = ""
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for f in _INT_FIELDS:
            _check_int(f, getattr(self, f), 1)
        if self.ep is not None:
            _check_int("ep", self.ep, 1)
        if self.zero is not None and (isinstance(self.zero, bool)
                                      or self.zero not in (0, 1, 2, 3)):
            raise MoesimError(f"parallel layout: zero={self.zero!r}; use 0, 1, 2 or 3 (or "
                              "leave it unset for the policy's own optimizer scheme)")
        for f in ("sp", "a2a_overlap", "tp_cross_node", "whole_model"):
            if not isinstance(getattr(self, f), bool):
                raise MoesimError(f"parallel layout: {f} must be true or false, got "
                                  f"{getattr(self, f)!r}")
        _check_choice("pp_schedule", self.pp_schedule, SCHEDULES)
        _check_choice("recompute", self.recompute, RECOMPUTE)
        mods = self.recompute_modules
        if isinstance(mods, str):
            mods = tuple(m for m in mods.replace("+", " ").replace(";", " ").split() if m)
        object.__setattr__(self, "recompute_modules", tuple(mods))
        for m in self.recompute_modules:
            _check_choice("recompute_modules", m, RECOMPUTE_MODULES)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.sp and self.tp == 1:
            raise MoesimError("parallel layout: sp=true has no effect with tp=1; set tp>1 or "
                              "drop sp")
        if self.vpp > 1 and self.pp_schedule != "interleaved":
            raise MoesimError(f"parallel layout: vpp={self.vpp} needs pp_schedule=interleaved")
        if self.pp_schedule == "interleaved" and self.vpp < 2:
            raise MoesimError("parallel layout: pp_schedule=interleaved needs vpp >= 2 "
                              "(virtual stages per pipeline rank)")
        if self.pp == 1 and self.pp_schedule != "1f1b":
            raise MoesimError(f"parallel layout: pp_schedule={self.pp_schedule} needs pp > 1")
        if self.recompute_num_layers is not None:
            _check_int("recompute_num_layers", self.recompute_num_layers, 1)
            if self.recompute != "full":
                raise MoesimError("parallel layout: recompute_num_layers goes with "
                                  "recompute=full")

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def is_default(self) -> bool:
        """True when the layout changes nothing (the policy's own scheme on every rank)."""
        return self.same_fields(ParallelLayout())

    def same_fields(self, other: ParallelLayout) -> bool:
        """Equal in every field that acts (name, description and source aside)."""
        return all(getattr(self, f.name) == getattr(other, f.name)
                   for f in dataclasses.fields(self) if f.name not in _TEXT_FIELDS)

    def dp(self, world: int) -> int:
        """Data-parallel size of attention and dense layers: ``world / (tp·cp·pp)``."""
        return world // (self.tp * self.cp * self.pp)

    def edp(self, world: int, ep: int) -> int:
        """Expert-data-parallel size: ``world / (etp·ep·pp)``."""
        return world // (self.etp * ep * self.pp)

    def fields(self) -> dict[str, Any]:
        """The acting fields as a JSON-ready dict (what RunResult's config records)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _TEXT_FIELDS}
        out["recompute_modules"] = list(self.recompute_modules)
        if self.name:
            out["preset"] = self.name
        return out

    def describe(self) -> str:
        """A short ``key=value`` form of the fields that differ from the default."""
        base = ParallelLayout()
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if f.name not in _TEXT_FIELDS and getattr(self, f.name) != getattr(base, f.name)]
        return ",".join(parts) or "default"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "+".join(value)
    return str(value)


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MoesimError(f"parallel layout: {name}={value!r} must be an integer >= {lo}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoesimError(f"parallel layout: {name}={value!r}; use one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# parsing: --parallel NAME | PATH | key=value,... | NAME,key=value,...


def _coerce(key: str, text: str) -> Any:
    """A ``key=value`` string value as the field's type."""
    t = text.strip()
    if key in ("sp", "a2a_overlap", "tp_cross_node", "whole_model"):
        low = t.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise MoesimError(f"parallel layout: {key}={text!r}; use {key}=true or {key}=false")
    if key in ("pp_schedule", "recompute", *_TEXT_FIELDS):
        return t
    if key == "recompute_modules":
        return tuple(m for m in t.replace("+", " ").split() if m)
    if key in ("ep", "zero", "recompute_num_layers") and t.lower() in ("none", "auto", ""):
        return None
    try:
        return int(t)
    except ValueError:
        raise MoesimError(f"parallel layout: {key}={text!r} must be an integer") from None


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ParallelLayout)]


def layout_from_dict(data: dict[str, Any], where: str = "parallel layout") -> ParallelLayout:
    """A layout from a table of fields (a preset file's or a search spec's)."""
    if not isinstance(data, dict):
        raise MoesimError(f"{where}: expected a table of layout fields, got {data!r}")
    unknown = sorted(set(data) - set(_field_names()))
    if unknown:
        raise MoesimError(f"{where}: unknown layout field(s) {unknown}; the fields are "
                          f"{', '.join(_field_names())}")
    data = {k: _coerce(k, v) if isinstance(v, str) and k not in _TEXT_FIELDS else v
            for k, v in data.items()}
    if isinstance(data.get("recompute_modules"), list):
        data["recompute_modules"] = tuple(data["recompute_modules"])
    try:
        return ParallelLayout(**data)
    except MoesimError as exc:
        raise MoesimError(f"{where}: {exc}") from None


def list_layout_presets() -> list[str]:
    """Names of the built-in layout presets (``moesim/presets/parallel/*.toml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_layout(name_or_path: str | Path) -> ParallelLayout:
    """A preset by name, or a TOML/JSON file of layout fields."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = PRESET_DIR / f"{path.stem if path.suffix == '.toml' else path.name}.toml"
        if path.parent != Path(".") or not builtin.is_file():
            raise MoesimError(f"no parallel layout preset or file {str(name_or_path)!r}; "
                              f"choose one of {', '.join(list_layout_presets())}, give a "
                              "path, or key=value fields (e.g. tp=2,sp=true)")
        path = builtin
    try:
        text = path.read_text()
        import json

        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MoesimError(f"cannot parse {path}: {exc}; fix the file's syntax") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
        data.setdefault("whole_model", True)  # a layout given on purpose models the whole model
    return layout_from_dict(data, str(path))


def parse_layout(text: str | None) -> ParallelLayout:
    """``--parallel`` → a layout: ``NAME``, ``PATH``, ``k=v[,k=v...]`` or ``NAME,k=v,...``
    (a preset with fields overridden). None or ``""`` → the default layout. A layout given
    this way models the whole model (``whole_model=true``) unless its fields say otherwise."""
    if text is None or not str(text).strip():
        return ParallelLayout()
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    base: dict[str, Any] = {"whole_model": True}
    if parts and "=" not in parts[0]:
        preset = load_layout(parts.pop(0))
        base = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise MoesimError(f"--parallel: {part!r} is not key=value; give a preset name "
                              "first, then key=value fields")
        if key not in _field_names() or key in _TEXT_FIELDS:
            keys = [k for k in _field_names() if k not in _TEXT_FIELDS]
            raise MoesimError(f"--parallel: unknown key {key!r}; the keys are "
                              f"{', '.join(keys)}")
        base[key] = _coerce(key, value)
    try:
        return ParallelLayout(**base)
    except MoesimError as exc:
        raise MoesimError(f"--parallel {text}: {exc}") from None


PARALLEL_HELP = ("parallel layout: a preset name (moesim presets parallel), a .toml file, "
                 "key=value fields (tp, sp, pp, vpp, pp_schedule, cp, ep, etp, zero, recompute, "
                 "recompute_num_layers, recompute_modules, a2a_overlap, tp_cross_node, "
                 "whole_model), or PRESET,key=value to override a preset; default: none (every "
                 "rank one stage, the policy's own EP and optimizer scheme)")


def add_parallel_argument(parser: Any) -> None:
    """``--parallel`` on an argparse parser (simulate, run, validate share it)."""
    parser.add_argument("--parallel", default=None, metavar="LAYOUT", help=PARALLEL_HELP)
