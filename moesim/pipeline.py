"""Pipeline schedules as data: the order in which each stage runs forward and backward passes.

A schedule is, per stage, a list of :class:`Step`\\ s: a forward ``F`` or a backward ``B`` of one
micro-batch ``mb`` on one virtual chunk, or — with the all-to-all overlap — a fused step that
runs one micro-batch's forward and another's backward together. The lowering emits each step's
ops in this order; the event engine then makes stages wait for each other's activations and
gradients, so bubbles and cross-stage stragglers come out of the schedule, never a formula.

Schedules (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", SC'21, arXiv 2104.04473; orders as Megatron-Core's
``pipeline_parallel/schedules.py`` runs them):

- ``gpipe``: every forward, then every backward.
- ``1f1b``: stage ``i`` runs ``min(p − i − 1, m)`` warm-up forwards, then alternates one forward
  and one backward, then drains the remaining backwards. With ``p = 1`` this is gradient
  accumulation: ``F0 B0 F1 B1 …``.
- ``interleaved``: ``v`` chunks per stage; virtual micro-batch ``k`` of the forward order is
  micro-batch ``(k // (p·v))·p + k % p`` on chunk ``(k // p) % v`` (backward: chunk
  ``v − 1 − (k // p) % v``); warm-up ``(p − i − 1)·2 + (v − 1)·p`` forwards (capped at ``m·v``),
  then 1F1B over virtual micro-batches.

``overlap=True`` (Megatron-Core's ``--overlap-moe-expert-parallel-comm``, "combined 1F1B")
fuses each steady-state forward with the backward that follows it; one more warm-up forward
makes that backward an earlier micro-batch's (the fused pair is ``F(j+1)`` with ``B(j)``), so
each stage holds one more micro-batch of activations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """``kind`` ``"F"`` or ``"B"`` of micro-batch ``mb`` on virtual chunk ``chunk``; a fused
    step (``kind == "FB"``) carries the forward in ``fwd`` and the backward in ``bwd``."""

    kind: str
    mb: int = -1
    chunk: int = 0
    fwd: Step | None = None
    bwd: Step | None = None


def schedule_steps(name: str, stage: int, p: int, m: int, v: int = 1,
                   overlap: bool = False) -> list[Step]:
    """Stage ``stage``'s steps for ``p`` stages, ``m`` micro-batches and ``v`` virtual chunks."""
    if name == "gpipe":
        steps = [Step("F", j) for j in range(m)] + [Step("B", j) for j in range(m)]
        return steps
    if name == "1f1b":
        fwd = [Step("F", j) for j in range(m)]
        bwd = [Step("B", j) for j in range(m)]
        warmup = p - stage - 1
    elif name == "interleaved":
        fwd = [Step("F", *_virtual(k, p, v, forward=True)) for k in range(m * v)]
        bwd = [Step("B", *_virtual(k, p, v, forward=False)) for k in range(m * v)]
        warmup = (p - stage - 1) * 2 + (v - 1) * p
    else:
        raise ValueError(f"unknown pipeline schedule {name!r}")
    return _one_f_one_b(fwd, bwd, min(warmup + int(overlap), len(fwd)), overlap)


def _virtual(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """``(micro-batch, chunk)`` of virtual micro-batch ``k`` in the interleaved order."""
    group, pos = divmod(k, p * v)
    chunk = pos // p
    return group * p + pos % p, chunk if forward else v - 1 - chunk


def _one_f_one_b(fwd: list[Step], bwd: list[Step], warmup: int, overlap: bool) -> list[Step]:
    """Warm-up forwards, then one forward and one backward at a time, then the drain."""
    steps = list(fwd[:warmup])
    steady = len(fwd) - warmup
    for i in range(steady):
        f, b = fwd[warmup + i], bwd[i]
        steps.extend([Step("FB", fwd=f, bwd=b)] if overlap else [f, b])
    steps.extend(bwd[steady:])
    return steps


def bubble_fraction(name: str, p: int, m: int, v: int = 1) -> float:
    """The textbook bubble share of a uniform pipeline's total time (for tests and reports):
    ``(p − 1)/(m + p − 1)`` for 1F1B and GPipe, ``(p − 1)/(v·m + p − 1)`` interleaved."""
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)
