"""One validation rule per quantity, shared by every command that takes it.

``simulate``, ``search``, ``run``, ``trace`` and ``calibrate`` read the same quantities (an
iteration range, a seed, a count, a fraction, a memory budget); each is checked here, once, so
the commands agree. Every check returns the clean value or raises a one-line
:class:`MoesimError` naming the flag and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from moesim import bounds
from moesim.errors import MoesimError

OPEN_END = 2**62  # "A:" selects to the end of the trace
SEED_MAX = 2**63 - 1
MAX_STEP_S = 1e7  # ~4 months for one training step: only an absurd input predicts more
SLOT_KNOBS = ("slots_per_rank", "max_shadow", "extra_slots_per_rank", "num_redundant_per_rank")


def integer(value: Any, flag: str, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """``value`` as an int (an int, or a string of digits; never a bool or 1.7) in range."""
    if isinstance(value, bool):
        raise MoesimError(f"{flag} {value!r} must be an integer, not true/false")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise MoesimError(f"{flag} {value!r} is not an integer") from None
    if not isinstance(value, int):
        raise MoesimError(f"{flag} {value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise MoesimError(f"{flag} {value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise MoesimError(f"{flag} {value} must be <= {maximum}")
    return value


def positive_int(value: Any, flag: str) -> int:
    """An integer >= 1."""
    return integer(value, flag, minimum=1)


def non_negative_int(value: Any, flag: str) -> int:
    """An integer >= 0."""
    return integer(value, flag, minimum=0)


def seed(value: Any, flag: str = "--seed") -> int:
    """A random seed: an integer in 0 .. 2**63-1 (numpy refuses negative seeds)."""
    return integer(value, flag, minimum=0, maximum=SEED_MAX)


def number(value: Any, flag: str, *, minimum: float | None = None,
           maximum: float | None = None, strict_minimum: bool = False) -> float:
    """A finite real number in range (NaN and infinity refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MoesimError(f"{flag} {value!r} must be a number")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise MoesimError(f"{flag} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise MoesimError(f"{flag} {value!r} must be a finite number")
    if minimum is not None and (x <= minimum if strict_minimum else x < minimum):
        raise MoesimError(f"{flag} {value!r} must be {'>' if strict_minimum else '>='} "
                          f"{minimum:g}")
    if maximum is not None and x > maximum:
        raise MoesimError(f"{flag} {value!r} must be <= {maximum:g}")
    return x


def fraction(value: Any, flag: str) -> float:
    """A number in [0, 1]."""
    return number(value, flag, minimum=0.0, maximum=1.0)


def positive_seconds(value: Any, flag: str) -> float:
    """A finite duration > 0 s."""
    return number(value, flag, minimum=0.0, strict_minimum=True)


def optional(check, value: Any, flag: str) -> Any:
    """``check(value, flag)``, or None for None."""
    return None if value is None else check(value, flag)


def iteration_range(value: Any, flag: str = "--iterations") -> tuple[int, int] | None:
    """An iteration selection → ``(start, stop)``, or None for all.

    ``"A:B"`` (either end may be left out), ``"A"`` (one iteration) or, in a search spec, an
    integer N (the first N). Refused: negative ends, an empty range, anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise MoesimError(f"{flag} {value} selects nothing; give N >= 1 (the first N "
                              "iterations) or \"A:B\"")
        return 0, value
    if not isinstance(value, str):
        raise MoesimError(f"{flag} {value!r} must be \"A:B\" or a count of iterations")
    text = value.strip()
    try:
        if ":" not in text:
            a = int(text)
            return _checked_range(a, a + 1, value, flag)
        lo, hi = text.split(":", 1)
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else OPEN_END
    except ValueError:
        raise MoesimError(f"{flag} {value!r} is not A:B with integers; e.g. 0:10") from None
    return _checked_range(a, b, value, flag)


def _checked_range(a: int, b: int, text: Any, flag: str) -> tuple[int, int]:
    if a < 0 or b <= a:
        raise MoesimError(f"{flag} {text!r} selects nothing; use A:B with 0 <= A < B")
    return a, b


def iterations_within(selection: tuple[int, int] | None, available: int,
                      flag: str = "--iterations") -> list[int]:
    """The trace iterations a selection names; an explicit end past the trace is refused
    (never silently truncated)."""
    if selection is None:
        return list(range(available))
    a, b = selection
    if a >= available or (b != OPEN_END and b > available):
        raise MoesimError(f"{flag} {a}:{b if b != OPEN_END else ''} is outside the trace's "
                          f"iterations 0..{available - 1} (it is not truncated); choose A:B "
                          f"within 0:{available}")
    return list(range(a, min(b, available)))


def timeline_within(timeline: list[int], iterations: list[int],
                    flag: str = "--timeline") -> list[int]:
    """Timeline iterations must be among the iterations run (else nothing would be written)."""
    chosen = set(iterations)
    outside = [i for i in timeline if i not in chosen]
    if outside:
        raise MoesimError(f"{flag} {outside[0]} is not among the iterations run "
                          f"({iterations[0]}..{iterations[-1]}); choose one of those")
    return timeline


def int_list(text: str, flag: str, *, minimum: int = 0) -> list[int]:
    """``"2,4,8"`` → ``[2, 4, 8]`` (each >= ``minimum``)."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise MoesimError(f"{flag} {text!r} is empty; give comma-separated integers")
    return [integer(t, flag, minimum=minimum) for t in items]


def plan_size(policy: Any, num_layers: int, num_ranks: int, num_experts: int) -> None:
    """Refuse slot knobs whose routing plan would not fit in memory.

    The router keeps three ``[layers, source ranks, physical slots]`` int64 arrays
    (:mod:`moesim.routing`); physical slots are ranks x (owners + the slot knobs)."""
    config = getattr(policy, "config", None)
    knobs = {k: getattr(config, k) for k in SLOT_KNOBS
             if isinstance(getattr(config, k, None), int)}
    if not knobs:
        return
    per_rank = -(-num_experts // max(num_ranks, 1)) + sum(max(v, 0) for v in knobs.values())
    slots = num_ranks * per_rank
    names = ", ".join(f"{k}={v}" for k, v in knobs.items())
    bounds.check_bytes(3 * bounds.cells_bytes((num_layers, num_ranks, slots)),
                       f"policy {getattr(policy, 'name', '?')} with {names}: the routing plan "
                       f"[{num_layers} layers, {num_ranks} ranks, {slots} slots]",
                       f"lower {' / '.join(knobs)}")


def _at_least(lo: int):
    return lambda v, f: integer(v, f, minimum=lo)


def _positive_number(v: Any, f: str) -> float:
    return number(v, f, minimum=0.0, strict_minimum=True)


# Command-line quantities (argparse ``dest`` → rule), the same for every command that takes
# one; ``None`` values (flag not given) are skipped, and every float flag must be finite.
FLAG_RULES = {
    "seed": seed, "micro_batches": positive_int, "micro_batches_per_iteration": positive_int,
    "ep_size": positive_int, "experts": positive_int, "naive_dp_size": positive_int,
    "gpus_per_node": positive_int, "nodes": positive_int, "world_size": positive_int,
    "workers": positive_int, "num_experts": positive_int, "num_iterations": positive_int,
    "num_layers": positive_int, "num_ranks": positive_int, "ranks": positive_int,
    "layers": positive_int, "iteration_stride": positive_int, "doc_tokens": positive_int,
    "top_k": positive_int, "tokens_per_rank": positive_int, "tokens": positive_int,
    "seq_len": positive_int, "passes": positive_int, "steps": positive_int,
    "d_model": positive_int, "ffn_hidden": positive_int, "repeats": positive_int,
    "reps": positive_int, "top": positive_int,
    "warmup": non_negative_int, "limit": non_negative_int, "context_iterations":
    non_negative_int, "iteration": non_negative_int, "layer": non_negative_int,
    "hang_timeout_s": positive_seconds, "timeout_s": positive_seconds,
    "quiet_wait_s": lambda v, f: number(v, f, minimum=0.0),
    "max_memory_GiB": _positive_number, "max_drop_frac": fraction,
    "capacity_factor": _positive_number, "lr": _positive_number,
}


def flag_names(parser: Any) -> dict[str, str]:
    """``dest`` → the option string users type (``popularity_sigma`` → ``--skew``), over a
    parser and all its subcommands."""
    import argparse

    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for dest, flag in flag_names(sub).items():
                    names.setdefault(dest, flag)
        elif action.option_strings:
            names.setdefault(action.dest, max(action.option_strings, key=len))
    return names


def check_flags(args: object, names: dict[str, str] | None = None) -> None:
    """Apply :data:`FLAG_RULES` to a parsed command line (numbers only: a ``--layers 0,3``
    list of another command is left to that command). ``names`` maps dests to the flags
    shown in messages (:func:`flag_names`)."""
    for dest, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = (names or {}).get(dest) or "--" + dest.replace("_", "-")
        if isinstance(value, float):
            number(value, flag)
        rule = FLAG_RULES.get(dest)
        if rule is not None:
            rule(value, flag)


def finite_results(summary: dict, iteration: int) -> None:
    """A predicted iteration whose times are infinite or NaN comes from an absurd input
    (``peak_flops = 1e-300``, a zero bandwidth), and so does a step of zero seconds that moved
    tokens (the scheduler's NaN-to-zero of infinite ops), or one of more than ``MAX_STEP_S``:
    refuse it rather than print
    ``inf ms`` or ``nan %``."""
    worked = summary.get("tokens_total", 0) > 0
    for key in ("step_time_s", "moe_time_s", "a2a_time_s"):
        value = summary.get(key)
        if isinstance(value, (int, float)) and (not math.isfinite(value) or value > MAX_STEP_S
                                                or (key == "step_time_s" and worked
                                                    and not value > 0)):
            raise MoesimError(f"iteration {iteration}: the cost model gives {key} = {value}; an "
                              "input figure is absurd (check the cluster's and hardware "
                              "profile's peak_flops, bandwidths and latencies)")
