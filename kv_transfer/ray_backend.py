"""The Ray object store backend: works wherever Ray does, across nodes, with no extra setup.

Slower than torch_dist (the payload is serialized into the object store and copied out), so
it is the fallback. Push, like every backend: the sender gathers the request's blocks into
one buffer, ``ray.put``s it and calls a method of the receiving worker's actor with the
header and the ObjectRef; Ray resolves the ref before the method runs, and the method hands
both to ``RayReceiver.deliver``, which scatters into the reserved blocks.

Wiring (cluster layer): the decode worker actor builds its receiver with its own handle and
exposes the method the endpoint names::

    class DecodeWorker:
        def __init__(...):
            me = ray.get_runtime_context().current_actor
            self.kv_receiver = RayReceiver(config, kv_cache, name, actor=me, method="receive_kv")

        def receive_kv(self, header: bytes, payload) -> bool:
            return self.kv_receiver.deliver(header, payload)

``ray`` is imported only here, and this module only when the "ray" backend is selected.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from kv_transfer import blocks
from kv_transfer.base import (
    Endpoint,
    HeadRange,
    KVScales,
    KVSender,
    TransferConfig,
    TransferHandle,
    TransferStats,
    cache_layout,
    check_heads,
    fail_fast,
    refusal,
    send_header,
)
from kv_transfer.errors import (
    LayoutMismatch,
    PeerClosed,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from kv_transfer.header import REFUSE, TransferHeader
from kv_transfer.receiving import ExpectTable, TableReceiver

# (receiver endpoint, header, [n] int64 source block ids, handle)
_Job = tuple[Endpoint, TransferHeader, torch.Tensor, TransferHandle]


class RaySender(KVSender):
    """Gathers, puts and calls on one FIFO thread; completions come from Ray futures."""

    def __init__(self, config: TransferConfig, kv_cache: torch.Tensor, name: str = "prefill",
                 heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0)):
        self.config, self.kv_cache, self.name = config, kv_cache, name
        self.heads = check_heads(kv_cache, heads)  # the global KV heads the cache holds
        self.kv_scales = kv_scales
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv-ray-send", daemon=True)
        self._thread.start()
        self._queued: dict[str, TransferHandle] = {}
        self._lock = threading.Lock()

    def send(
        self,
        request_id: str,
        peer: Endpoint,
        src_block_ids: Sequence[int],
        layers: tuple[int, int] | None = None,
        dst_block_ids: Sequence[int] | None = None,  # unused: one buffer per payload anyway
        heads: HeadRange | None = None,
    ) -> TransferHandle:
        handle = TransferHandle(request_id)
        if self._closed:
            return fail_fast(handle, PeerClosed(request_id, peer.describe(), "sender closed"))
        try:
            header = send_header(request_id, self.kv_cache, peer, len(src_block_ids), layers,
                                 own_heads=self.heads, kv_scales=self.kv_scales, heads=heads)
        except TransferError as error:
            if isinstance(error, LayoutMismatch):  # tell the receiver, so that it fails too
                notice = refusal(request_id, self.kv_cache, peer, len(src_block_ids), layers,
                                 self.heads, self.kv_scales, heads)
                if notice is not None:
                    self._queue.put((peer, notice, torch.empty(0, dtype=torch.long),
                                     TransferHandle(request_id)))
            return fail_fast(handle, error)
        src_index = blocks.check_ids(self.kv_cache, src_block_ids)
        with self._lock:
            self._queued[request_id] = handle
        self._queue.put((peer, header, src_index, handle))
        return handle

    def abort(self, request_id: str) -> bool:
        with self._lock:
            handle = self._queued.pop(request_id, None)
        error = TransferAborted(request_id, "-", "aborted by the sender before it was sent")
        return handle is not None and handle.fail(error)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            peer, header, src_index, handle = item
            with self._lock:
                self._queued.pop(header.request_id, None)
            if not handle.done():
                self._start(peer, header, src_index, handle)

    def _start(
        self,
        peer: Endpoint,
        header: TransferHeader,
        src_index: torch.Tensor,
        handle: TransferHandle,
    ) -> None:
        """Gather, put and call the receiver; arm the timeout. Completion is asynchronous."""
        rid, who, timeout = header.request_id, peer.describe(), self.config.timeout_s
        if header.kind == REFUSE:  # no payload, no answer awaited
            with contextlib.suppress(Exception):  # the receiver times the request out
                getattr(peer.actor, peer.method).remote(header.encode().numpy().tobytes(),
                                                        np.empty(0, dtype=np.uint8))
            return
        start = time.perf_counter()
        lo = self.heads[0]
        payload = blocks.gather(self.kv_cache, src_index,
                                slice(header.layer_start, header.layer_end),
                                heads=slice(header.head_start - lo, header.heads[1] - lo))
        payload = payload.cpu().contiguous().view(torch.uint8).view(-1).numpy()
        try:
            ref = ray.put(payload)
            result = getattr(peer.actor, peer.method).remote(header.encode().numpy().tobytes(), ref)
        except Exception as e:  # any Ray failure here fails only this request
            handle.fail(PeerClosed(rid, who, f"cannot call {peer.method}: {e}"))
            return
        timer = threading.Timer(
            timeout, handle.fail, (TransferTimeout(rid, who, f"timed out after {timeout} s"),)
        )
        timer.daemon = True
        timer.start()

        def finished(future: Any) -> None:
            timer.cancel()
            try:
                future.result()  # False: delivered but no longer expected (aborted): done too
            except Exception as e:  # the receiver's actor died or raised
                handle.fail(PeerClosed(rid, who, f"receiver failed: {type(e).__name__}: {e}"))
                return
            handle.succeed(TransferStats(payload.nbytes, time.perf_counter() - start))

        result.future().add_done_callback(finished)


class RayReceiver(TableReceiver):
    """Receives payloads handed to ``deliver`` by its actor's method."""

    def __init__(
        self,
        config: TransferConfig,
        kv_cache: torch.Tensor,
        name: str = "decode",
        actor: Any = None,
        method: str = "receive_kv",
        heads: HeadRange | None = None,
        kv_scales: KVScales = (1.0, 1.0),
    ) -> None:
        self.config, self.name = config, name
        self.actor = actor  # handle of the actor that owns this receiver
        self.method = method  # that actor's method calling ``deliver``
        self.table = ExpectTable(kv_cache, heads, kv_scales)
        self._layout, self._dtype = cache_layout(kv_cache)

    def endpoint(self) -> Endpoint:
        if self.actor is None:
            raise ValueError("RayReceiver needs the handle of its actor (actor=...) to be reached")
        return Endpoint(
            "ray",
            self.name,
            self._layout,
            self._dtype,
            device=self.table.kv_cache.device.type,
            heads=self.table.heads,
            kv_scales=self.table.kv_scales,
            actor=self.actor,
            method=self.method,
        )

    def deliver(self, header: bytes, payload: np.ndarray) -> bool:
        """Scatter a payload (``uint8`` array, read-only from the object store) into the
        request's reserved blocks; False if nobody expects it (discarded)."""
        parsed = TransferHeader.decode(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        with warnings.catch_warnings():  # read-only object-store memory: we only read it
            warnings.simplefilter("ignore", UserWarning)
            buffer = torch.from_numpy(payload)
        return self.table.deliver(parsed, buffer, "ray sender")

    def close(self) -> None:
        self.table.close(PeerClosed(None, self.name, "receiver closed"))
