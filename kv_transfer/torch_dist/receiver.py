"""TorchDistReceiver: hosts the TCPStore senders connect to; one thread per pair."""

from __future__ import annotations

import logging
import threading

import torch

from kv_transfer import blocks
from kv_transfer.base import Endpoint, HeadRange, KVScales, TransferConfig, cache_layout
from kv_transfer.errors import PeerClosed
from kv_transfer.receiving import ExpectTable, TableReceiver
from kv_transfer.torch_dist.recv_channel import ReceiverChannel
from kv_transfer.torch_dist.store import StoreServer
from kv_transfer.torch_dist.wire import PairGroup

log = logging.getLogger(__name__)


class TorchDistReceiver(TableReceiver):
    """Hosts a TCPStore that senders connect to; one receive thread per pair channel."""

    def __init__(self, config: TransferConfig, kv_cache: torch.Tensor, name: str = "decode",
                 heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0)):
        self.config, self.kv_cache, self.name = config, kv_cache, name
        self.table = ExpectTable(kv_cache, heads, kv_scales)
        self._layout, self._dtype = cache_layout(kv_cache)
        self._lock = threading.Lock()
        self._channels: list[ReceiverChannel] = []
        self._server = StoreServer(config, self._on_pair)

    def endpoint(self) -> Endpoint:
        return Endpoint(
            "torch_dist",
            self.name,
            self._layout,
            self._dtype,
            device=self.kv_cache.device.type,
            host=self._server.host,
            port=self._server.port,
            heads=self.table.heads,
            kv_scales=self.table.kv_scales,
            heads_outer=blocks.heads_outer(self.kv_cache),
        )

    def close(self) -> None:
        """Stop accepting and fail what is expected. Open channels end when their sender
        closes them or dies (a receive cannot be interrupted locally); their payloads are
        drained and discarded until then."""
        self._server.close()
        self.table.close(PeerClosed(None, self.name, "receiver closed"))

    def open_peers(self) -> list[str]:
        """Senders with an open channel to this receiver."""
        with self._lock:
            return [c.peer for c in self._channels]

    def _on_pair(self, n: int, info: dict) -> None:
        peer = f"{info['sender']} (pair {n})"
        wire, device = info["wire"], self.kv_cache.device
        open_group = lambda: PairGroup.accept(self._server, n, wire, device, peer)
        with self._lock:
            self._channels.append(
                ReceiverChannel(peer, open_group, self.table, self.config, self._channel_exited)
            )

    def _channel_exited(self, channel: ReceiverChannel) -> None:
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)
