"""The executor's optimizer and host-memory ops (:class:`HostOps`, mixed into
:class:`~moesim.executor.interpreter.RankExecutor`): Adam over the rank's slot parameters and
dense shard, device↔host copies into pinned buffers, the host (CPU) Adam of the offloading
policies, and the cached scratch buffers every compiler shares."""

from __future__ import annotations

from collections.abc import Callable

import torch


class HostOps:
    """Compilers of the optimizer and host ops; the executor supplies ``model``, ``device``,
    ``dtype``, ``slots``, ``slot_grads``, ``expert_grads``, ``adam``, ``host_adam``, ``flow``
    and ``_buffers``."""

    def _optimizer_step(self, numel: int) -> None:
        """Adam over ``numel`` parameters: slot parameters (all layers, in order) first, then a
        buffer for the rest (the dense shard)."""
        for l in sorted(self.slots):
            for s, (e, p) in enumerate(self.slots[l]):
                if e < 0 or numel <= 0:
                    continue
                k = min(numel, p.numel())
                g = self.expert_grads.get((l, e), self.slot_grads[l][s])
                self.adam.step((l, s, e, k), p[:k], g[:k])
                numel -= k
        if numel > 0 and self.flow is not None:  # the real dense shard (its DP share)
            p, g = self.flow.dense_chunk(numel)
            if p.numel():
                self.adam.step(("dense", p.numel()), p, g)
            numel -= p.numel()
        if numel > 0:
            p = self._buffer(("opt_p", numel), (numel,))
            g = self._buffer(("opt_g", numel), (numel,), randn=True)
            self.adam.step(("dense", numel), p, g)

    def _host_copy(self, nbytes: int, to_host: bool) -> Callable[[], None]:
        """Copy ``nbytes`` between device memory and (pinned, on CUDA) host memory."""
        if nbytes <= 0:
            return lambda: None
        dev = self._buffer(("copy_dev", nbytes), (nbytes,), dtype=torch.uint8)
        host = self._buffers.get(("copy_host", nbytes))
        if host is None:  # pinned on CUDA, as a real offload buffer would be
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._buffers[("copy_host", nbytes)] = host
        src, dst = (dev, host) if to_host else (host, dev)
        return lambda: dst.copy_(src)

    def _host_adam(self, state_bytes: float) -> Callable[[], None]:
        """A CPU Adam step over the parameters whose optimizer state is ``state_bytes``."""
        numel = int(state_bytes / (self.model.bytes_optim or 12.0))
        if numel <= 0:
            return lambda: None
        cpu = torch.device("cpu")
        p = self._buffer(("host_p", numel), (numel,), device=cpu, dtype=torch.float32)
        g = self._buffer(("host_g", numel), (numel,), device=cpu, dtype=torch.float32,
                         randn=True)
        return lambda: self.host_adam.step(("host", numel), p, g)

    def _buffer(self, key: tuple, shape: tuple, *, randn: bool = False,
                device: torch.device | None = None, dtype: torch.dtype | None = None
                ) -> torch.Tensor:
        if key not in self._buffers:
            dev, dt = device or self.device, dtype or self.dtype
            self._buffers[key] = (torch.randn(shape, device=dev).to(dt) if randn
                                  else torch.zeros(shape, device=dev, dtype=dt))
        return self._buffers[key]
