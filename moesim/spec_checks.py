"""Field checks shared by the spec dataclasses (:mod:`moesim.model_spec`,
:mod:`moesim.cluster_spec`): each raises :class:`~moesim.errors.MoesimError` naming the field."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from moesim.errors import MoesimError

MAX_COUNT = 2**31  # layers, experts, hidden sizes, tokens, GPUs: far above any real model


def is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def _check_each(obj: Any, names: tuple[str, ...], ok: Callable[[float], bool], what: str) -> None:
    """One-line MoesimError for the first field ``name`` of ``obj`` that is not a number with
    ``ok(value)``; ``what`` completes "must be …"."""
    for name in names:
        value = getattr(obj, name)
        if not (is_number(value) and ok(value)):
            raise MoesimError(f"{type(obj).__name__}.{name} must be {what}, got {value!r}; "
                              f"fix the value in the spec")


def check_positive(obj: Any, *names: str) -> None:
    _check_each(obj, names, lambda v: v > 0, "a positive number")


def check_non_negative(obj: Any, *names: str) -> None:
    _check_each(obj, names, lambda v: v >= 0, "a number >= 0")


def check_integral(obj: Any, *names: str) -> None:
    """Counts must be whole numbers (an int, or a float like 8.0, which is stored as 8)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            object.__setattr__(obj, name, int(value))
        elif isinstance(value, numbers.Real) and float(value).is_integer():
            object.__setattr__(obj, name, int(value))
        else:
            raise MoesimError(
                f"{type(obj).__name__}.{name} must be a whole number, got {value!r}; "
                f"fix the value in the spec"
            )
        if abs(getattr(obj, name)) > MAX_COUNT:
            raise MoesimError(f"{type(obj).__name__}.{name} = {value!r} is too large to be real "
                              f"(the limit is {MAX_COUNT:.2g}); fix the value in the spec")


def check_text(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, str):
            raise MoesimError(f"{type(obj).__name__}.{name} must be a string, got {value!r}")
