"""What kind an op is, as the cost model and its calibration name it: the collective kind
(:data:`moesim.specs.COLLECTIVE_KINDS`), the context class and key under which
``HardwareProfile.context_factors`` apply (:data:`moesim.specs.CONTEXT_CLASSES`), and
nccl-tests' bus-bandwidth factor of a group collective (nccl-tests ``doc/PERFORMANCE.md``)."""

from __future__ import annotations

import numpy as np

from moesim.ops import (
    AllGather,
    AllReduce,
    AllToAll,
    Broadcast,
    Compute,
    GroupCollective,
    HostCompute,
    HostCopy,
    Op,
    Reduce,
    ReduceScatter,
    SendRecv,
)

_KIND = {AllReduce: "all_reduce", AllGather: "all_gather", ReduceScatter: "reduce_scatter",
         Broadcast: "broadcast", Reduce: "reduce", AllToAll: "all_to_all",
         SendRecv: "send_recv"}


def collective_kind(op: Op) -> str:
    """The :data:`moesim.specs.COLLECTIVE_KINDS` name of a collective op."""
    for cls, kind in _KIND.items():
        if isinstance(op, cls):
            return kind
    raise TypeError(f"{type(op).__name__} is not a collective")


def context_class(op_type: type) -> str:
    """The :data:`moesim.specs.CONTEXT_CLASSES` name of an op type."""
    for cls, name in ((Compute, "compute"), (HostCompute, "host_compute"),
                      (HostCopy, "host_copy"), *_KIND.items()):
        if issubclass(op_type, cls):
            return name
    raise TypeError(f"{op_type.__name__} has no context class")


def context_key(op: Op) -> str:
    """``class.phase.direction`` of ``op`` (:func:`context_class`), the most specific key of
    ``HardwareProfile.context_factors``."""
    return f"{context_class(type(op))}.{op.phase}.{op.direction}"


def context_factor(factors: dict[str, float], key: str) -> float:
    """The factor of an op with :func:`context_key` ``key``: the most specific of
    ``class.phase.direction``, ``class.phase`` and ``class`` in ``factors``, else 1."""
    while key:
        if key in factors:
            return factors[key]
        key = key.rpartition(".")[0]
    return 1.0


def bus_factor(op: GroupCollective, n: np.ndarray) -> np.ndarray:
    """nccl-tests' bus-bandwidth factor of ``op`` for group sizes ``n`` (``[G]``)."""
    n = np.asarray(n, dtype=np.float64)
    if isinstance(op, AllReduce):
        return 2.0 * (n - 1) / n
    if isinstance(op, (AllGather, ReduceScatter)):
        return (n - 1) / n
    if isinstance(op, (Broadcast, Reduce)):
        return np.ones_like(n)
    raise TypeError(f"no bus factor for {type(op).__name__}")
