"""Pair channels of the torch_dist backend: one sender thread and one receiver thread per pair.

A channel owns a ``PairGroup`` (see ``torch_dist``) and moves messages in FIFO order::

    header  (ctrl group, uint8 [HEADER_BYTES])
    chunk 0 (data group, layers [l0, l0 + k) of the payload, k = layers_per_chunk)
    chunk 1 ...

Pipelining: up to ``inflight_chunks`` chunks are on the wire at once, each in its own slot of
a staging buffer that is allocated once and grown when a bigger payload comes (never per
request). The sender gathers chunk i + 1 while chunk i is sent; the receiver has the receive
of chunk i + 1 posted while it scatters chunk i (one ``index_copy_`` per chunk). Slot s is
reused only after the operation that last used it has completed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import blocks
from kv_transfer.base import Endpoint, TransferConfig, TransferHandle, TransferStats
from kv_transfer.errors import PeerClosed, TransferError
from kv_transfer.header import CLOSE, DATA, TransferHeader, empty_header
from kv_transfer.receiving import ExpectTable

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


def chunk_view(buf: torch.Tensor, slot: int, header: TransferHeader, i: int) -> torch.Tensor:
    """Slot ``slot`` of ``buf`` as chunk ``i``'s payload ``[l1 - l0, 2, n, bs, kvh, D]``."""
    l0, l1 = header.chunk_layers(i)
    start = slot * header.layers_per_chunk * header.layer_nbytes()
    raw = buf[start : start + (l1 - l0) * header.layer_nbytes()]
    return raw.view(header.dtype).view(l1 - l0, *header.layer_shape())


def _staging_bytes(header: TransferHeader, depth: int) -> int:
    return min(depth, header.num_chunks) * header.layers_per_chunk * header.layer_nbytes()


@dataclass
class SendJob:
    """One queued send."""

    header: TransferHeader  # what goes on the wire first
    src_index: torch.Tensor  # [n] int64 source block ids on the cache's device
    handle: TransferHandle  # completed by the channel thread


_CLOSE = object()  # queue sentinel: send a CLOSE header and end


class SenderChannel:
    """The sending end of one pair: a queue and the one thread that drains it in order."""

    def __init__(
        self,
        peer: str,
        open_group: Callable[[], Any],
        kv_cache: torch.Tensor,
        config: TransferConfig,
        on_exit: Callable[[SenderChannel], None],
    ) -> None:
        self.peer = peer  # "decode-2 (10.0.0.5:41231)"
        self._open_group = open_group  # () -> PairGroup; runs on the channel thread
        self._kv = kv_cache
        self._config = config
        self._on_exit = on_exit
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False  # no more submits accepted
        self._busy = False  # a job is on the wire
        self._staging: Staging | None = None
        self._gatherer = futures.ThreadPoolExecutor(  # gathers the next chunk during a send
            1, thread_name_prefix=f"kv-gather {peer}", initializer=self._bind_device
        )
        self.thread = threading.Thread(target=self._run, name=f"kv-send {peer}", daemon=True)
        self.thread.start()

    def submit(self, job: SendJob) -> bool:
        """Queue ``job``; False if the channel is closing (open a new one)."""
        with self._lock:
            if self._closed:
                return False
            self._queue.put(job)
            return True

    def idle(self) -> bool:
        with self._lock:
            return not self._busy and self._queue.empty()

    def close(self) -> None:
        """Send what is queued, then a CLOSE header, then end."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_CLOSE)

    def _bind_device(self) -> None:
        if self._kv.is_cuda:  # the CUDA current device is per thread
            torch.cuda.set_device(self._kv.device)

    def _run(self) -> None:
        self._bind_device()
        try:
            group = self._open_group()
        except Exception as e:  # TransferError, or a bug: either way no queued send may hang
            error = e if isinstance(e, TransferError) else PeerClosed(None, self.peer, repr(e))
            self._fail_queued(error)
        else:
            error = self._serve(group)
            if error is None:
                self._send_close(group)
            else:
                self._fail_queued(error)
            group.close()
        self._gatherer.shutdown(wait=True)
        self._on_exit(self)

    def _serve(self, group: Any) -> TransferError | None:
        """Send queued jobs until CLOSE or idle; the channel's error if it broke."""
        while True:
            try:
                job = self._queue.get(timeout=self._config.idle_timeout_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._closed = True
                        return None
                continue
            if job is _CLOSE:
                return None
            if job.handle.done():  # aborted while queued
                continue
            with self._lock:
                self._busy = True
            try:
                job.handle.succeed(self._send_job(group, job))
            except TransferError as error:
                job.handle.fail(error.for_request(job.header.request_id))
                return error
            except Exception as e:  # a bug must fail the request, not hang it
                log.exception("kv_transfer: sending %s failed", job.header.request_id)
                error = PeerClosed(job.header.request_id, self.peer, f"internal error: {e!r}")
                job.handle.fail(error)
                return error
            finally:
                with self._lock:
                    self._busy = False

    def _send_job(self, group: Any, job: SendJob) -> TransferStats:
        """Header, then the chunks: chunk i + 1 is gathered on the gather thread while chunk i
        is posted (gloo writes to the socket in the posting thread: about 7 ms of its CPU per
        32 MiB chunk, measured), and a slot is refilled only once its send completed."""
        h, depth = job.header, self._config.inflight_chunks
        deadline = time.monotonic() + self._config.timeout_s
        left = lambda: deadline - time.monotonic()
        if self._staging is None:
            self._staging = Staging(group.data_device)
        buf = self._staging.take(_staging_bytes(h, depth))
        start = time.perf_counter()
        group.wait(group.send_ctrl(h.encode()), left(), "the header to be taken")
        pending: deque[tuple[int, Any]] = deque()  # (chunk, its send) in flight
        gathering = self._gatherer.submit(self._gather, job, buf, 0)
        try:
            for i in range(h.num_chunks):
                out = gathering.result()
                if i + 1 < h.num_chunks:
                    while pending and pending[0][0] <= i + 1 - depth:  # slot of chunk i + 1
                        group.wait(pending.popleft()[1], left(), "the payload to be taken")
                    gathering = self._gatherer.submit(self._gather, job, buf, i + 1)
                pending.append((i, group.send(out.view(torch.uint8).view(-1), 1 + i % depth)))
            while pending:
                group.wait(pending.popleft()[1], left(), "the payload to be taken")
        finally:
            futures.wait([gathering])  # never leave a gather writing into the staging buffer
        nbytes = h.num_layers * h.layer_nbytes()
        return TransferStats(nbytes, time.perf_counter() - start)

    def _gather(self, job: SendJob, buf: torch.Tensor, i: int) -> torch.Tensor:
        """Gather chunk ``i`` of ``job`` into its staging slot; returns the slot's view."""
        h = job.header
        out = chunk_view(buf, i % self._config.inflight_chunks, h, i)
        layers = slice(*h.chunk_layers(i))
        if out.device == self._kv.device:
            blocks.gather(self._kv, job.src_index, layers, out=out)
        else:  # CUDA cache over a gloo wire: through the host staging buffer
            out.copy_(blocks.gather(self._kv, job.src_index, layers))
        return out

    def _send_close(self, group: Any) -> None:
        try:
            group.wait(
                group.send_ctrl(TransferHeader(CLOSE).encode()),
                self._config.timeout_s,
                "the close message to be taken",
            )
        except TransferError as error:
            log.info("kv_transfer: closing channel to %s: %s", self.peer, error)

    def _fail_queued(self, error: TransferError) -> None:
        with self._lock:
            self._closed = True
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not _CLOSE:
                job.handle.fail(
                    PeerClosed(
                        job.header.request_id,
                        self.peer,
                        f"channel failed before this request was sent: {error.what}",
                    )
                )


class ChannelLRU:
    """A sender's open channels by peer, least recently used first; over ``max_channels``,
    idle ones are closed (busy ones are never interrupted: the cap is then exceeded)."""

    def __init__(self, max_channels: int, make: Callable[[Endpoint], SenderChannel]) -> None:
        self._max = max_channels
        self._make = make  # opens a channel to a peer (lazily: the connect runs on its thread)
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[str, int, str], SenderChannel] = OrderedDict()

    def get(self, peer: Endpoint) -> SenderChannel:
        """The channel to ``peer`` (opened if needed), marked most recently used."""
        key = (peer.host, peer.port, peer.name)
        with self._lock:
            channel = self._open.get(key)
            if channel is None:
                channel = self._open[key] = self._make(peer)
            self._open.move_to_end(key)
            idle = [c for c in self._open.values() if c is not channel and c.idle()]
            for victim in idle[: max(0, len(self._open) - self._max)]:
                self._drop_locked(victim)
                victim.close()
        return channel

    def drop(self, channel: SenderChannel) -> None:
        """Forget ``channel`` (it ended or is closing); the next ``get`` opens a new one."""
        with self._lock:
            self._drop_locked(channel)

    def channels(self) -> list[SenderChannel]:
        with self._lock:
            return list(self._open.values())

    def _drop_locked(self, channel: SenderChannel) -> None:
        for key, open_channel in list(self._open.items()):
            if open_channel is channel:
                del self._open[key]


class ReceiverChannel:
    """The receiving end of one pair: one thread that receives, scatters and reports."""

    def __init__(
        self,
        peer: str,
        open_group: Callable[[], Any],
        table: ExpectTable,
        config: TransferConfig,
        on_exit: Callable[[ReceiverChannel], None],
    ) -> None:
        self.peer = peer
        self._open_group = open_group
        self._table = table
        self._config = config
        self._on_exit = on_exit
        self._staging: Staging | None = None
        self.thread = threading.Thread(target=self._run, name=f"kv-recv {peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self._table.kv_cache.is_cuda:  # the CUDA current device is per thread
            torch.cuda.set_device(self._table.kv_cache.device)
        try:
            group = self._open_group()
        except Exception:  # the sender's connect fails too and reports it
            log.exception("kv_transfer: cannot open the receive channel from %s", self.peer)
            self._on_exit(self)
            return
        self._staging = Staging(group.data_device)
        try:
            while (header := self._next_header(group)) is not None:
                self._receive(group, header)
        except TransferError as error:
            log.warning("kv_transfer: receive channel from %s ends: %s", self.peer, error)
        except Exception:  # a bug ends this channel (its request failed), never the others
            log.exception("kv_transfer: receive channel from %s failed", self.peer)
        finally:
            group.close()
            self._on_exit(self)

    def _next_header(self, group: Any) -> TransferHeader | None:
        """The next DATA header, or None when the sender closed the channel."""
        buf = empty_header()
        try:
            group.wait(group.recv_ctrl(buf), None, "the next header")
        except PeerClosed:
            return None  # the sender went away between messages: a normal end
        header = TransferHeader.decode(buf)
        return header if header.kind == DATA else None

    def _receive(self, group: Any, h: TransferHeader) -> None:
        """Receive one payload into staging and scatter it, or drain it if unexpected."""
        entry = self._table.begin(h, self.peer)
        depth = self._config.inflight_chunks
        deadline = time.monotonic() + self._config.timeout_s
        assert self._staging is not None
        buf = self._staging.take(_staging_bytes(h, depth))
        views = [chunk_view(buf, i % depth, h, i) for i in range(h.num_chunks)]
        post = lambda i: group.recv(views[i].view(torch.uint8).view(-1), 1 + i % depth)
        try:
            pending = deque(post(i) for i in range(min(depth, h.num_chunks)))
            for i in range(h.num_chunks):
                group.wait(pending.popleft(), deadline - time.monotonic(), "the payload")
                if entry is not None:
                    self._table.write(entry, h.chunk_layers(i), views[i])
                if i + depth < h.num_chunks:
                    pending.append(post(i + depth))
        except Exception as e:  # the request fails with the channel; the caller ends it
            error = e if isinstance(e, TransferError) else PeerClosed(None, self.peer, repr(e))
            if entry is not None:
                self._table.fail(entry, error.for_request(h.request_id))
            raise
        if entry is not None:
            self._table.finish(entry, (h.layer_start, h.layer_end))
