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
