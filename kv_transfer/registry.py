"""Transfer backends by name, imported only when selected (ray and torch.distributed stay
unimported on a machine that uses another backend).

    sender = make_sender(config, kv_cache, name="prefill-0")        # config.backend picks
    receiver = make_receiver(config, kv_cache, name="decode-3")

Backend-specific arguments pass through ``**kwargs``: ``hub=`` for loopback, ``actor=`` and
``method=`` for the ray receiver.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from kv_transfer.base import KVReceiver, KVSender, TransferConfig

# name -> ("module", "SenderClass", "ReceiverClass")
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch_dist": ("kv_transfer.torch_dist", "TorchDistSender", "TorchDistReceiver"),
    "ray": ("kv_transfer.ray_backend", "RaySender", "RayReceiver"),
    "loopback": ("kv_transfer.loopback", "LoopbackSender", "LoopbackReceiver"),
}


def _classes(name: str) -> tuple[type[KVSender], type[KVReceiver]]:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    module_name, sender, receiver = BACKENDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, sender), getattr(module, receiver)


def make_sender(config: TransferConfig, kv_cache: torch.Tensor, **kwargs: Any) -> KVSender:
    """The sender of ``config.backend`` for this worker's ``kv_cache``
    ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``."""
    return _classes(config.backend)[0](config, kv_cache, **kwargs)


def make_receiver(config: TransferConfig, kv_cache: torch.Tensor, **kwargs: Any) -> KVReceiver:
    """The receiver of ``config.backend`` for this worker's ``kv_cache``."""
    return _classes(config.backend)[1](config, kv_cache, **kwargs)
