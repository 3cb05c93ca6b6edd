"""The receiver's TCPStore and the accept thread that learns about new pairs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kv_transfer.base import TransferConfig
from kv_transfer.torch_dist.wire import _PAIRS, _pair_key, _td, resolve_host, tcp_store

log = logging.getLogger(__name__)


class StoreServer:
    """The receiver's TCPStore plus the accept thread that learns about new pairs."""

    def __init__(self, config: TransferConfig, on_pair: Callable[[int, dict], None]) -> None:
        self.config = config
        self.host = resolve_host(config.host)
        self.store = tcp_store(self.host, 0, True, config.connect_timeout_s)
        self.port = self.store.port
        self._accept_store = self.client()  # a blocking wait holds its client's socket
        self._on_pair = on_pair  # (pair number, {"sender": name, "wire": "gloo"|"nccl"})
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._thread.start()

    def client(self) -> Any:
        """A new client connection to this store (one per blocking user)."""
        return tcp_store(self.host, self.port, False, self.config.connect_timeout_s)

    def _accept_loop(self) -> None:
        store, n = self._accept_store, 1
        while not self._closed.is_set():
            try:  # close() wakes this wait with a marker; the timeout only guards dead senders
                store.wait([_pair_key(n)], _td(self.config.idle_timeout_s))
            except RuntimeError:
                # Nobody came, or sender n died between add() and set(): skip its number.
                if store.add(_PAIRS, 0) >= n and not store.check([_pair_key(n)]):
                    log.warning("kv_transfer: pair %d announced but never described; skipped", n)
                    n += 1
                continue
            info = json.loads(store.get(_pair_key(n)))
            if info.get("close"):
                return
            store.set(_pair_key(n) + "/ack", "1")
            self._on_pair(n, info)
            n += 1

    def close(self) -> None:
        """End the accept thread (a close marker as the next pair) and wait for it."""
        if self._closed.is_set():
            return
        self._closed.set()
        n = self.store.add(_PAIRS, 1)
        self.store.set(_pair_key(n), json.dumps({"close": True}))
        self._thread.join(timeout=self.config.connect_timeout_s)
        self.store = self._accept_store = None  # the store server stops; its port is freed
