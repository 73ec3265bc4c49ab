"""What ``moesim policies`` prints: every registered policy with its knobs, their defaults, the
values its ``Config`` accepts, and one line of description.

The valid range of a knob is not written down twice: it is found by asking the policy's own
``Config.__post_init__`` (the one place the rule lives) about a few probe values, so the listing
cannot drift from the validation. Knob descriptions come from the ``Config`` docstring's
````name``: text`` clauses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from moesim.errors import MoesimError
from moesim.policies.base import available_policies, policy_class

INT_PROBES = (-(10**9), -1, 0, 1, 2, 10**9)
FLOAT_PROBES = (-1e9, -1.0, 0.0, 1e-9, 0.5, 1.0, 1.0 + 1e-9, 2.0, 1e9)
TINY = 1e-6


def _accepts(config_cls: type, name: str, value: Any) -> tuple[bool, str]:
    """Whether ``Config(name=value)`` (other knobs at their defaults) validates, and why not."""
    try:
        config_cls(**{name: value})
    except (MoesimError, TypeError, ValueError) as exc:
        return False, str(exc)
    return True, ""


def _fmt(x: float) -> str:
    return f"{x:g}"


def _interval(probes: tuple, ok: list[bool]) -> str | None:
    """The accepted probes as one interval (``>= 1``, ``> 0``, ``[0, 1)``), or None when they
    are not contiguous."""
    idx = [i for i, good in enumerate(ok) if good]
    if not idx:
        return "no value accepted"
    i, j = idx[0], idx[-1]
    if idx != list(range(i, j + 1)):
        return None
    lo = hi = ""
    if i > 0:
        below = probes[i - 1]
        lo = f"> {_fmt(below)}" if probes[i] - below < TINY else f">= {_fmt(probes[i])}"
    if j < len(probes) - 1:
        above = probes[j + 1]
        hi = f"<= {_fmt(probes[j])}" if above - probes[j] < TINY else f"< {_fmt(above)}"
    if lo and hi:
        left = "(" if lo.startswith("> ") else "["
        right = ")" if hi.startswith("< ") else "]"
        return f"{left}{lo.split()[-1]}, {hi.split()[-1]}{right}"
    return lo or hi or "any"


def knob_range(config_cls: type, field: dataclasses.Field) -> str:
    """Human-readable set of values ``field`` accepts, found by probing ``Config``."""
    kind = str(field.type)
    none_ok = "None" in kind and _accepts(config_cls, field.name, None)[0]
    suffix = ", or none" if none_ok else ""
    if "bool" in kind:
        return "true or false"
    if "int" in kind and "float" not in kind:
        probes = INT_PROBES
    elif "float" in kind:
        probes = FLOAT_PROBES
    else:
        good, why = _accepts(config_cls, field.name, "\x00not-a-choice")
        if good:
            return f"any text{suffix}"
        match = re.search(r"use one of ([^;]+)", why)
        return (f"one of {match.group(1).strip()}" if match else why) + suffix
    ok = [_accepts(config_cls, field.name, p)[0] for p in probes]
    interval = _interval(probes, ok)
    if interval is None:
        interval = "see the policy's docstring"
    return f"{'integer ' if probes is INT_PROBES else ''}{interval}{suffix}"


def knob_descriptions(config_cls: type) -> dict[str, str]:
    """``name`` → text from the ``Config`` docstring's ````name``: text.`` clauses."""
    doc = " ".join((config_cls.__doc__ or "").split())
    out = {}
    for match in re.finditer(r"``(\w+)``(?: \([^)]*\))?: (.*?)(?=(?: ``\w+``(?: \([^)]*\))?:)|$)",
                             doc):
        out[match.group(1)] = match.group(2).replace("``", "").strip()
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def describe_policy(name: str) -> dict:
    """One policy as a JSON-ready dict: name, description, oracle flag, knobs."""
    cls = policy_class(name)
    texts = knob_descriptions(cls.Config)
    knobs = [{"name": f.name, "type": str(f.type), "default": _default(f),
              "valid": knob_range(cls.Config, f), "description": texts.get(f.name, "")}
             for f in dataclasses.fields(cls.Config)]
    doc = (cls.__doc__ or "").strip().splitlines()
    return {"name": name, "description": doc[0].replace("``", "") if doc else "",
            "oracle": bool(cls.oracle),
            "knobs": knobs}


def catalog() -> list[dict]:
    """Every registered policy, sorted by name."""
    return [describe_policy(name) for name in available_policies()]


def format_default(value: Any) -> str:
    """A default as the user types it on the command line (``none``, ``true``, ``1.0``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def format_catalog(entries: list[dict]) -> str:
    """The plain-text listing of ``moesim policies``."""
    lines = []
    for entry in entries:
        lines.append(f"{entry['name']}: {entry['description']}")
        width = max((len(k["name"]) for k in entry["knobs"]), default=0)
        for k in entry["knobs"]:
            lines.append(f"  {k['name']:<{width}} = {format_default(k['default']):<9} "
                         f"{k['valid']}")
        lines.append("")
    lines.append("set a knob with --knob NAME=VALUE (e.g. --knob capacity_factor=1.0; "
                 "none = dropless / automatic)")
    return "\n".join(lines)
