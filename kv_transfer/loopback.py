"""In-process fake backend: sender and receivers in one process share a ``LoopbackHub``.

For every worker test that is not about the wire. The hub is the "network": it maps receiver
names to receivers and delivers payloads FIFO on one thread, copying tensors (gather on the
sender's cache, scatter into the receiver's), so sender and receiver never alias memory.

Faults, keyed by request id (``LoopbackHub(faults={"r1": Fault("drop")})``):
  - ``delay``: hold the payload ``delay_s`` seconds, then deliver (blocks later payloads too,
    like a slow link).
  - ``drop``: the payload is lost; the sender's handle fails with ``TransferTimeout`` after
    ``config.timeout_s``; the receiver hears nothing (its owner must abort the request).
  - ``fail``: both sides fail at once with ``PeerClosed`` (a link that broke mid-transfer).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Fault:
    """A fault injected into one request's transfer."""

    kind: str  # "delay", "drop" or "fail"
    delay_s: float = 0.0  # "delay" only: seconds the payload is held back

    def __post_init__(self) -> None:
        if self.kind not in ("delay", "drop", "fail"):
            raise ValueError(f"fault kind must be delay, drop or fail (got {self.kind!r})")


@dataclass
class _Job:
    sender: LoopbackSender
    peer: Endpoint
    header: TransferHeader
    src_index: torch.Tensor  # [n] int64 source block ids
    handle: TransferHandle


class LoopbackHub:
    """Receivers by name plus one FIFO delivery thread."""

    def __init__(self, faults: Mapping[str, Fault] | None = None) -> None:
        self.faults = dict(faults or {})  # request id -> fault injected into its transfer
        self._receivers: dict[str, LoopbackReceiver] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-loopback", daemon=True)
        self._thread.start()

    def register(self, receiver: LoopbackReceiver) -> None:
        with self._lock:
            if receiver.name in self._receivers:
                raise ValueError(f"a loopback receiver named {receiver.name!r} exists")
            self._receivers[receiver.name] = receiver

    def unregister(self, name: str) -> None:
        with self._lock:
            self._receivers.pop(name, None)

    def submit(self, job: _Job) -> None:
        if self._stopped.is_set():
            job.handle.fail(PeerClosed(job.header.request_id, job.peer.describe(), "hub closed"))
            return
        self._queue.put(job)

    def close(self) -> None:
        """Stop the delivery thread; queued payloads fail with ``PeerClosed``."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._stopped.is_set():
                job.handle.fail(
                    PeerClosed(job.header.request_id, job.peer.describe(), "hub closed")
                )
            elif not job.handle.done():  # done here = aborted by the sender while queued
                self._deliver(job)
        while not self._queue.empty():
            if (job := self._queue.get_nowait()) is not None:
                job.handle.fail(
                    PeerClosed(job.header.request_id, job.peer.describe(), "hub closed")
                )

    def _deliver(self, job: _Job) -> None:
        rid, peer = job.header.request_id, job.peer.describe()
        fault = self.faults.get(rid)
        with self._lock:
            receiver = self._receivers.get(job.peer.name)
        if receiver is None:
            job.handle.fail(PeerClosed(rid, peer, "no such receiver (closed or never opened)"))
        elif job.header.kind == REFUSE:
            receiver.table.refuse(job.header, job.sender.name)
            job.handle.succeed(TransferStats(0, 0.0))
        elif fault is not None and fault.kind == "fail":
            error = PeerClosed(rid, peer, "injected failure")
            receiver.table.fail_id(rid, error)
            job.handle.fail(error)
        elif fault is not None and fault.kind == "drop":
            timeout = job.sender.config.timeout_s
            error = TransferTimeout(rid, peer, f"timed out after {timeout} s (payload dropped)")
            timer = threading.Timer(timeout, job.handle.fail, (error,))
            timer.daemon = True
            timer.start()
        elif fault is not None and self._stopped.wait(fault.delay_s):
            job.handle.fail(PeerClosed(rid, peer, "hub closed"))
        else:
            start = time.perf_counter()
            payload = job.sender.gather(job.header, job.src_index)
            receiver.table.deliver(job.header, payload, job.sender.name)
            nbytes = payload.numel() * payload.element_size()
            job.handle.succeed(TransferStats(nbytes, time.perf_counter() - start))


class LoopbackSender(KVSender):
    """Sends through a ``LoopbackHub`` to receivers registered on it."""

    def __init__(
        self,
        config: TransferConfig,
        kv_cache: torch.Tensor,
        hub: LoopbackHub,
        name: str = "prefill",
        heads: HeadRange | None = None,
        kv_scales: KVScales = (1.0, 1.0),
    ) -> None:
        self.config, self.kv_cache, self.hub, self.name = config, kv_cache, hub, name
        self.heads = check_heads(kv_cache, heads)  # the global KV heads the cache holds
        self.kv_scales = kv_scales
        self._handles: dict[str, list[TransferHandle]] = {}
        self._lock = threading.Lock()
        self._closed = False

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
                    self.hub.submit(_Job(self, peer, notice, torch.empty(0, dtype=torch.long),
                                         TransferHandle(request_id)))
            return fail_fast(handle, error)
        src_index = blocks.check_ids(self.kv_cache, src_block_ids)
        with self._lock:
            self._handles.setdefault(request_id, []).append(handle)
        handle.add_done_callback(self._forget)
        self.hub.submit(_Job(self, peer, header, src_index, handle))
        return handle

    def gather(self, header: TransferHeader, src_index: torch.Tensor) -> torch.Tensor:
        """The payload of ``header``: its layers and heads of blocks ``src_index``."""
        lo = self.heads[0]
        return blocks.gather(self.kv_cache, src_index,
                             slice(header.layer_start, header.layer_end),
                             heads=slice(header.head_start - lo, header.heads[1] - lo))

    def abort(self, request_id: str) -> bool:
        with self._lock:
            handles = list(self._handles.get(request_id, ()))
        error = TransferAborted(request_id, "loopback", "aborted by the sender")
        return any([h.fail(error) for h in handles])

    def close(self) -> None:
        self._closed = True
        with self._lock:
            handles = [h for hs in self._handles.values() for h in hs]
        for h in handles:
            h.fail(PeerClosed(h.request_id, "loopback", "sender closed"))

    def _forget(self, handle: TransferHandle) -> None:
        with self._lock:
            hs = self._handles.get(handle.request_id, [])
            if handle in hs:
                hs.remove(handle)
            if not hs:
                self._handles.pop(handle.request_id, None)


class LoopbackReceiver(TableReceiver):
    """Receives through a ``LoopbackHub`` under ``name``."""

    def __init__(
        self, config: TransferConfig, kv_cache: torch.Tensor, hub: LoopbackHub,
        name: str = "decode", heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0),
    ) -> None:
        self.config, self.hub, self.name = config, hub, name
        self.table = ExpectTable(kv_cache, heads, kv_scales)
        self._layout, self._dtype = cache_layout(kv_cache)
        hub.register(self)

    def endpoint(self) -> Endpoint:
        return Endpoint(
            "loopback", self.name, self._layout, self._dtype,
            device=self.table.kv_cache.device.type, heads=self.table.heads,
            kv_scales=self.table.kv_scales,
        )

    def close(self) -> None:
        self.hub.unregister(self.name)
        self.table.close(PeerClosed(None, self.name, "receiver closed"))
