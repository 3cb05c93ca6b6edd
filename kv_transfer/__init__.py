"""Moving KV blocks from a prefill worker to a decode worker.

**Push model.** The decode side reserves the request's blocks and registers them
(``KVReceiver.expect``) before the prefill side sends; the prefill side pushes
(``KVSender.send``) and frees its source blocks when the returned handle is done, whether the
send succeeded or failed. "No free blocks" on the decode side is backpressure, handled before
a transfer starts (outside this package).

Layout: each engine holds one cache tensor
``kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` (2 = K, V),
head-major in memory as the engine allocates it (see ``blocks``); a request's KV is a list
of block ids on each side (different ids, same count).

Backends (``registry.make_sender`` / ``make_receiver`` by ``TransferConfig.backend``):
  - ``torch_dist``: one stateless two-rank torch.distributed group per (prefill, decode) pair,
    gloo on CPU, NCCL when both caches are CUDA; ordered header + one message per block,
    sent from and received into the caches directly (no gather, no scatter).
  - ``ray``: through the Ray object store (anywhere Ray runs; the fallback).
  - ``loopback``: in-process fake with fault injection, for tests not about the wire.

Modules: ``base`` (interface, config, endpoint, handle), ``errors``, ``header`` (wire header),
``blocks`` (block views, gather/scatter), ``receiving`` (receiver bookkeeping shared by backends),
``channels`` (torch_dist's pair threads), ``torch_dist``, ``ray_backend``, ``loopback``,
``registry``. Only ``torch_dist`` touches torch.distributed; only ``ray_backend`` imports ray.
"""

from kv_transfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferHandle,
    TransferStats,
)
from kv_transfer.errors import (
    LayoutMismatch,
    PeerClosed,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from kv_transfer.registry import make_receiver, make_sender

__all__ = [
    "Endpoint",
    "KVReceiver",
    "KVSender",
    "LayoutMismatch",
    "PeerClosed",
    "TransferAborted",
    "TransferConfig",
    "TransferError",
    "TransferHandle",
    "TransferStats",
    "TransferTimeout",
    "make_receiver",
    "make_sender",
]
