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

Lowering hooks: the simulator and the executor turn each decision into an op program with
:func:`moesim.lowering.lower_iteration`, which calls the policy back at fixed points —
``lower_relayout`` (iteration start), ``lower_after_route`` (between router and dispatch),
``lower_param_gather`` (before a layer's expert compute, on the prefetch stream),
``lower_layer_grads`` (after a layer's last backward), ``lower_grad_sync`` and
``lower_optimizer`` (once per iteration) — and asks ``memory_footprint`` for the plan's static
memory. The defaults are static expert parallelism (see ``policies/static_ep.py``, the worked
example); a policy overrides only what it does differently, usually with a few ``ctx.add(op)``
calls or the ``ctx.emit_*`` helpers.

Shape legend: ``T`` passes, ``L`` layers, ``R`` source ranks, ``E`` experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from moesim.errors import MoesimError
from moesim.placement import Decision
from moesim.specs import Cluster, ModelSpec

if TYPE_CHECKING:  # the lowering imports nothing from policies; hooks only receive its context
    from moesim.lowering import LoweringContext


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
        return sum_counts(window, axis=(0, 2))

    def last_load_LE(self) -> np.ndarray | None:
        """Expert load of the previous iteration, summed over its passes and ranks."""
        return self.recent_load_LE(1)


def sum_counts(counts: np.ndarray, axis) -> np.ndarray:
    """``counts.sum(axis)`` in at least int64: a directory trace may store its counts as uint16
    or int32 (:func:`moesim.traces.io.count_dtype`), whose numpy sums would be unsigned or
    narrow; int64 and float inputs sum as before."""
    return counts.sum(axis=axis, dtype=np.result_type(counts.dtype, np.int64))


def repeats_structure(policy: Any) -> bool:
    """Whether ``policy``'s own class declares ``repeats_structure`` (a subclass that
    overrides a lowering hook must declare it again)."""
    return bool(type(policy).__dict__.get("repeats_structure", False))


class Policy:
    """Base class: subclasses set ``Config`` and implement ``decide``."""

    name: ClassVar[str] = ""
    oracle: ClassVar[bool] = False
    #: under an unchanged decision every iteration lowers to the same ops (streams, deps,
    #: ranks, groups, and every payload but the routed data: dispatch / combine matrices and
    #: expert GEMM rows), so the simulator may lower one and batch the rest
    #: (:mod:`moesim.repeat`). A policy whose hooks emit anything that depends on the counts
    #: must leave it False; each class sets it itself (it is not inherited: see
    #: :func:`repeats_structure`).
    repeats_structure: ClassVar[bool] = False

    @dataclass(frozen=True, kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def decide(self, history: History, model: ModelSpec, cluster: Cluster,
               rng: np.random.Generator) -> Decision:
        raise NotImplementedError(f"{type(self).__name__} must implement decide()")

    # -- lowering hooks ---------------------------------------------------------------------
    # ``moesim.lowering.lower_iteration`` calls these while it writes one iteration's Program;
    # ``ctx`` is a :class:`moesim.lowering.LoweringContext` (program, decision, previous, model,
    # cluster, routed token counts, op-index anchors, and ``emit_*`` helpers). Each hook appends
    # ops with ``ctx.add(op)`` and returns the indices of ops that later work must wait for
    # (``[]`` if none). The defaults are static expert parallelism's behaviour, so a policy
    # overrides only what it does differently. Hooks must not mutate the decision.

    def lower_relayout(self, ctx: LoweringContext) -> list[int]:
        """Move weights from ``ctx.previous``'s placement to ``ctx.decision``'s, at the start
        of the iteration (phase ``relayout``); the first forward waits for the returned ops.

        Default: one ``SendRecv`` of each changed slot's expert weights from a rank that held
        that expert before (same rank, else same node, else round-robin over holders); nothing
        when the placement did not change. SwiftMoE / FlexMoE override it (weights from the
        optimizer's shards, or weights + optimizer state)."""
        return ctx.emit_relayout_sendrecv()

    def lower_after_route(self, ctx: LoweringContext, micro_batch: int,
                          layer: int) -> list[int]:
        """Ops between a layer's router and its dispatch all-to-all (e.g. SwiftMoE's
        all-reduce of the E-length count vector, Hecate's re-plan after gating). The dispatch
        waits for the returned ops. Default: none."""
        return []

    def lower_param_gather(self, ctx: LoweringContext, micro_batch: int, layer: int,
                           direction: str) -> list[int]:
        """Materialise ``layer``'s expert weights before its expert compute (``direction``
        ``fwd`` or ``bwd``), phase ``param_gather``, normally on the ``prefetch`` stream.

        Called in program order just before the layer's attention in the forward (so the
        gather overlaps it), and in the backward just after the expert backward of the layer
        above (overlapping that layer's dispatch-bwd and dense backward). ``ctx.gather_anchor``
        is the op whose end frees the buffer (the previous layer's expert compute, or -1); the
        expert compute waits for the returned ops. Default (static EP): nothing to gather."""
        return []

    def lower_layer_grads(self, ctx: LoweringContext, layer: int) -> list[int]:
        """Per-layer gradient ops after the last micro-batch's backward of ``layer``
        (``ctx.layer_bwd_done[layer]`` is that expert-backward op): LAER's all-to-all reduce,
        Hecate's SparseReduceScatter. The iteration's ``grad_sync`` waits for the returned ops.
        Default (static EP): none (expert grads are synced once per iteration)."""
        return []

    def lower_grad_sync(self, ctx: LoweringContext) -> list[int]:
        """Per-iteration gradient synchronisation (phase ``grad_sync``) after the backward.

        Default: all-reduce each layer's expert grads among the ranks that hold replicas of
        the same expert (static EP: the expert-data-parallel groups), then all-reduce the
        dense grads over all ranks (data parallel)."""
        return ctx.emit_expert_grad_allreduce() + ctx.emit_dense_grad_allreduce()

    def lower_optimizer(self, ctx: LoweringContext) -> list[int]:
        """The optimizer step (phase ``optimizer``). Default: ZeRO-1 / distributed optimizer:
        each rank updates 1/DP of the dense state and 1/EDP of its experts' state on the GPU
        (memory-bound Adam), then all-gathers the updated weights."""
        return ctx.emit_zero1_optimizer()

    def memory_footprint(self, decision: Decision, model: ModelSpec,
                         cluster: Cluster) -> tuple[dict[str, np.ndarray],
                                                    dict[str, np.ndarray]]:
        """Static per-rank memory of this plan: ``(gpu, host)``, each a dict component →
        ``[R]`` bytes (components ``weights``, ``grads``, ``optimizer``, ``buffers``, ...).
        Activations and all-to-all buffers are added by the lowering from the routed tokens.
        Default: :func:`moesim.memory.default_footprint` (static EP, ZeRO-1 optimizer on GPU)."""
        from moesim.memory import default_footprint

        return default_footprint(decision, model, cluster)

    def resolved_knobs(self, model: ModelSpec, cluster: Cluster) -> dict[str, Any]:
        """Choices a knob leaves to the topology (e.g. EPLB's ``balancing=auto``), as this
        model and cluster resolve them; stored in the run's ``config.json`` under
        ``policy.resolved``. Default: none."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# -- knob validation shared by the policies' Config.__post_init__ -----------------------------


def check_ints(policy: str, config: Any, minimums: dict[str, int],
               optional: tuple[str, ...] = ()) -> None:
    """Each knob in ``minimums`` is an integer (not a bool) at least its minimum; the knobs in
    ``optional`` may also be None."""
    for name, lo in minimums.items():
        v = getattr(config, name)
        if v is None and name in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            none = " or None" if name in optional else ""
            raise MoesimError(f"{policy}: {name}={v!r} must be an integer >= {lo}{none}; "
                              f"set {name}={max(lo, 1)} or more")


def check_capacity_factor(policy: str, cf: Any) -> None:
    """``capacity_factor`` is a positive number, or None for dropless."""
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float))
                           or not 0 < cf < float("inf")):
        raise MoesimError(f"{policy}: capacity_factor must be > 0 and finite, or None for "
                          f"dropless (got {cf!r})")


def check_choice(policy: str, name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise MoesimError(f"{policy}: {name}={value!r}; use one of "
                          f"{', '.join(map(str, choices))}")


def check_bools(policy: str, config: Any, *names: str) -> None:
    """Each named knob is True or False."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise MoesimError(f"{policy}: {name} must be true or false")


def check_slots_cover(policy: str, slots_per_rank: int, num_ranks: int,
                      num_experts: int) -> None:
    """``slots_per_rank × num_ranks`` slots can hold every expert at least once."""
    if slots_per_rank * num_ranks < num_experts:
        raise MoesimError(f"{policy}: {slots_per_rank} slots per GPU × {num_ranks} GPUs < "
                          f"{num_experts} experts; raise slots_per_rank to at least "
                          f"{-(-num_experts // num_ranks)}")


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
                              f"{', '.join(sorted(fields)) or '(none)'} (`moesim policies "
                              f"{name}` lists their defaults and valid values)")
        kwargs[key] = _coerce(value, fields[key].type, key)
    try:
        return cls(cls.Config(**kwargs))
    except MoesimError:
        raise
    except (TypeError, ValueError) as exc:  # Config.__post_init__ names the field and the fix
        raise MoesimError(f"policy {name!r}: {exc}") from None
