"""The policy interface: a pure decision from the past, plus the ops and memory it implies.

A policy answers, once per iteration: *given the routing counts of earlier passes, where should
each expert live now?* ``decide`` must be a pure function of its arguments (``History``, model,
cluster and an explicit ``numpy.random.Generator``): no I/O, no global RNG, no
``torch.distributed``. A policy whose ``oracle`` flag is set is handed the current iteration's
counts too, and must carry "oracle" in its name.

Adding a policy is one file in ``policies/`` and one decorator::

    @register_policy("my_policy")
    class MyPolicy(Policy):
        @dataclass(frozen=True, kw_only=True)
        class Config:
            slots_per_rank: int = 2
        def decide(self, history, model, cluster, rng): ...

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks, ``E`` experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from moesim.errors import MoesimError
from moesim.placement import Decision
from moesim.specs import Cluster, ModelSpec


@dataclass(frozen=True)
class History:
    """What a policy may know when it decides iteration ``iteration``.

    ``past_TLRE``: counts of every earlier pass (passes of earlier iterations only), oldest
    first. ``passes_per_iteration`` groups them into iterations. ``previous``: the decision in
    force during the last iteration (``None`` at the start). ``current_TLRE``: this iteration's
    counts, given to oracle policies only (``None`` for everyone else).
    """

    iteration: int
    past_TLRE: np.ndarray
    passes_per_iteration: int
    previous: Decision | None = None
    current_TLRE: np.ndarray | None = None

    def recent_load_LE(self, iterations: int) -> np.ndarray | None:
        """Expert load summed over ranks and the last ``iterations`` iterations (None if none)."""
        if self.past_TLRE.shape[0] == 0:
            return None
        window = self.past_TLRE[-iterations * self.passes_per_iteration:]
        return window.sum(axis=(0, 2))

    def last_load_LE(self) -> np.ndarray | None:
        """Expert load of the previous iteration, summed over its passes and ranks."""
        return self.recent_load_LE(1)


class Policy:
    """Base class: subclasses set ``Config`` and implement ``decide``."""

    name: ClassVar[str] = ""
    oracle: ClassVar[bool] = False

    @dataclass(frozen=True, kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        raise NotImplementedError(f"{type(self).__name__} must implement decide()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def register_policy(name: str):
    """Class decorator: give a :class:`Policy` subclass its registry name."""

    def wrap(cls: type[Policy]) -> type[Policy]:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError("@register_policy decorates Policy subclasses")
        if cls.oracle != ("oracle" in name):
            raise TypeError(f"policy {name!r}: oracle policies (and only they) say so in "
                            "their name")
        cls.name = name
        return cls

    return wrap


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def _registry() -> dict[str, type[Policy]]:
    import importlib
    import pkgutil

    import moesim.policies as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    found: dict[str, type[Policy]] = {}
    for cls in _all_subclasses(Policy):
        if cls.name:
            if cls.name in found and found[cls.name] is not cls:
                raise TypeError(f"two policies registered as {cls.name!r}")
            found[cls.name] = cls
    return found


def available_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_registry())


def policy_class(name: str) -> type[Policy]:
    reg = _registry()
    if name not in reg:
        raise MoesimError(f"unknown policy {name!r}; choose one of {', '.join(sorted(reg))}")
    return reg[name]


def _coerce(value: Any, target: Any, field_name: str) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    kinds = str(target)
    try:
        if "bool" in kinds:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "int" in kinds and "." not in text:
            return int(text)
        if "float" in kinds or "int" in kinds:
            return float(text)
    except ValueError:
        raise MoesimError(f"knob {field_name}={value!r} is not a valid {kinds}") from None
    return text


def make_policy(name: str, knobs: dict[str, Any] | None = None) -> Policy:
    """Build a registered policy with config knobs (strings from the CLI are coerced)."""
    cls = policy_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs = {}
    for key, value in (knobs or {}).items():
        if key not in fields:
            raise MoesimError(f"policy {name!r} has no knob {key!r}; its knobs are "
                              f"{', '.join(sorted(fields)) or '(none)'}")
        kwargs[key] = _coerce(value, fields[key].type, key)
    try:
        return cls(cls.Config(**kwargs))
    except TypeError as exc:
        raise MoesimError(f"policy {name!r}: {exc}") from None
