"""Host staging buffers: where a message goes when the cache is not on the wire's device
or a payload nobody expects is drained."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class Staging:
    """A reusable byte buffer on one device, grown on demand (pinned on CUDA hosts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buf = torch.empty(0, dtype=torch.uint8, device=device)

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8 [nbytes]`` view; contents are garbage."""
        if self._buf.numel() < nbytes:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
        return self._buf[:nbytes]

    def slots(self, count: int, nbytes: int) -> list[torch.Tensor]:
        """``count`` disjoint ``uint8 [nbytes]`` views."""
        return list(self.take(count * nbytes).view(count, nbytes))


class StagingPool:
    """Byte buffers lent out one per payload (an announced STAGED payload's receives stay
    posted while its channel handles later payloads, so it cannot share ``Staging``), and
    reused once given back: a fresh buffer costs its page faults on the critical path.
    Used from one thread (a receive channel's)."""

    KEEP = 4  # buffers kept for reuse

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8 [nbytes]`` buffer of its own until ``give``; contents are garbage."""
        for i, buf in enumerate(self._free):
            if buf.numel() >= nbytes:
                return self._free.pop(i)[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give(self, buf: torch.Tensor) -> None:
        """Take back a buffer from ``take`` (its whole allocation)."""
        self._free.append(buf if buf._base is None else buf._base)
        if len(self._free) > self.KEEP:  # the smallest goes (by position: == is elementwise)
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))
