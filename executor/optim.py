"""The executor's optimizer: a plain Adam over flat tensors, in place, keyed by the caller.

The interpreter steps one expert-sized tensor per call on the device (as the lowering counts the
optimizer's traffic) and SwiftMoE-style host shards in chunks on the CPU; ``moesim calibrate``
times the same calls.
"""

from __future__ import annotations

import torch

HOST_ADAM_CHUNK = 1 << 20  # parameters per host Adam call (see Adam)


class Adam:
    """A plain Adam (β 0.9/0.999) over arbitrary tensors; state keyed by the caller.

    ``chunk`` (elements) splits each step into slices of at most that many parameters, each
    with its own state, as CPU optimizers do (DeepSpeed's CPU Adam works in tiles): the step's
    one temporary stays ``chunk`` long instead of the whole tensor. Measured on an H100 host:
    SwiftMoE's host step over 553 M parameters in one call, on one thread, ran 1.7× its
    calibrated time (a fresh 2.2 GB temporary, mmap-ed and page-faulted every step); chunked,
    with the rank's cores, the optimizer phase went from 2.9 s to 0.30 s."""

    def __init__(self, lr: float, chunk: int | None = None) -> None:
        self.lr = lr
        self.chunk = chunk
        self.state: dict[object, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def step(self, key: object, p: torch.Tensor, g: torch.Tensor) -> None:
        """One update of ``p`` in place from gradient ``g`` (same shape)."""
        if self.chunk is None or p.numel() <= self.chunk:
            self._step(key, p, g)
            return
        for i, (pc, gc) in enumerate(zip(p.view(-1).split(self.chunk),
                                         g.view(-1).split(self.chunk), strict=True)):
            self._step((key, i), pc, gc)

    def _step(self, key: object, p: torch.Tensor, g: torch.Tensor) -> None:
        m, v, t = self.state.get(key) or (torch.zeros_like(p), torch.zeros_like(p), 0)
        t += 1
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        denom = (v / (1 - 0.999**t)).sqrt_().add_(1e-8)
        p.addcdiv_(m, denom, value=-self.lr / (1 - 0.9**t))
        self.state[key] = (m, v, t)
