"""Pair channels of the torch_dist backend: one sender thread and one receiver thread per pair.

A channel owns a ``PairGroup`` (see ``torch_dist``) and moves messages in FIFO order::

    header  (ctrl group, uint8 [HEADER_BYTES])
    block 0 (data group: layers [l0, l1) of the request's first block, one contiguous run)
    block 1 ...

Zero copy: the cache is block-major, so each message is sent straight from the sender's
cache and received straight into the receiver's reserved block (``ExpectTable.claim``); no
gather, no scatter, no staging. The sender posts a payload's messages at once; the receiver
keeps ``inflight_messages`` receives posted ahead (what an abort may have to wait for).
Staging is used only where the cache is not on the wire's
device (CUDA caches over a gloo wire: through host slots) and to drain a payload nobody
expects any more.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import blocks
from kv_transfer.base import Endpoint, TransferConfig, TransferHandle, TransferStats
from kv_transfer.errors import PeerClosed, TransferError
from kv_transfer.header import CLOSE, DATA, TransferHeader, empty_header
from kv_transfer.receiving import ExpectTable

log = logging.getLogger(__name__)

DATA_TAG = 1  # payload messages (headers use torch_dist.CTRL_TAG on the ctrl group)


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


@dataclass
class SendJob:
    """One queued send."""

    header: TransferHeader  # what goes on the wire first
    src_ids: list[int]  # source block ids, in the request's order
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
        """Header, then one message per block, each straight from the cache (gloo writes to
        the socket in the posting thread). Every message is posted at once: the blocks stay
        held until the handle completes, and a wait per message costs a thread hand-off
        (measured: 2 in flight took 2x as long as 32 for 128 blocks of 512 KiB). Through host
        staging slots, at most ``inflight_messages`` are unfinished."""
        h = job.header
        deadline = time.monotonic() + self._config.timeout_s
        left = lambda: deadline - time.monotonic()
        layers = slice(h.layer_start, h.layer_end)
        via_host = group.data_device != self._kv.device  # CUDA cache over a gloo wire
        depth = self._config.inflight_messages if via_host else max(1, h.num_blocks)
        if via_host:
            slots = self._staging_slots(group, h, depth)
        start = time.perf_counter()
        header = group.send_ctrl(h.encode())  # not waited for first: saves a hand-off
        pending: deque[Any] = deque()  # sends in flight, oldest first
        for i, block_id in enumerate(job.src_ids):
            if len(pending) == depth:  # also frees the staging slot of message i - depth
                group.wait(pending.popleft(), left(), "the payload to be taken")
            message = blocks.block_view(self._kv, block_id, layers)
            if via_host:
                message = slots[i % depth].copy_(message)
            pending.append(group.send(message, DATA_TAG))
        group.wait(header, left(), "the header to be taken")
        if pending:  # sends complete in order: after the newest, the rest return at once
            newest = pending.pop()
            group.wait(newest, left(), "the payload to be taken")
        while pending:  # waited once each (a gloo wait consumes its completion)
            group.wait(pending.popleft(), left(), "the payload to be taken")
        return TransferStats(h.num_blocks * h.block_nbytes(), time.perf_counter() - start)

    def _staging_slots(self, group: Any, h: TransferHeader, depth: int) -> list[torch.Tensor]:
        if self._staging is None:
            self._staging = Staging(group.data_device)
        return self._staging.slots(depth, h.block_nbytes())

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
        """Receive one payload block by block into the reserved blocks (or drain it if nobody
        expects it, or once it is aborted)."""
        assert self._staging is not None
        entry = self._table.begin(h, self.peer)
        blocks_in = _BlockReceives(group, self._table, entry, h, self._config, self._staging)
        try:
            blocks_in.run()
        except Exception as e:  # the request fails with the channel; the caller ends it
            error = e if isinstance(e, TransferError) else PeerClosed(None, self.peer, repr(e))
            group.close()  # a broken pair: no posted receive writes into the cache any more
            blocks_in.release_pending()
            if entry is not None:
                self._table.fail(entry, error.for_request(h.request_id))
            raise
        if entry is not None:
            self._table.finish(entry, (h.layer_start, h.layer_end))


class _BlockReceives:
    """The receives of one payload: ``inflight_messages`` posted ahead, each straight into
    its claimed block (or a staging slot: draining, or a CUDA cache over a gloo wire)."""

    def __init__(self, group: Any, table: ExpectTable, entry: Any, h: TransferHeader,
                 config: TransferConfig, staging: Staging) -> None:
        self.group, self.table, self.entry, self.h = group, table, entry, h
        self.depth = config.inflight_messages
        self.deadline = time.monotonic() + config.timeout_s
        self.staging = staging
        self.slots: list[torch.Tensor] = []  # taken only when needed
        self.pending: deque[tuple[Any, torch.Tensor | None, torch.Tensor]] = deque()

    def run(self) -> None:
        """Completions are waited for a half window at a time, newest first: messages of a
        pair complete in order, so one sleep covers the batch (a wake-up per message cost CPU
        that both sides' gloo threads need on a small host)."""
        n, depth = self.h.num_blocks, self.depth
        batch, posted, done = max(1, depth // 2), 0, 0
        while done < n:
            while posted < min(done + depth, n):
                self._post(posted)
                posted += 1
            end = min(done + batch, n)
            self._wait(self.pending[end - done - 1][0])
            for k in range(end - done):  # the older ones of the batch return at once
                self._settle_oldest(waited=k == end - done - 1)
            done = end

    def release_pending(self) -> None:
        """After a failure (the pair is closed): drop the claims of unfinished receives."""
        for _, target, _ in self.pending:
            if target is not None:
                self.table.release(self.entry)
        self.pending.clear()

    def _post(self, i: int) -> None:
        h = self.h
        layers = (h.layer_start, h.layer_end)
        target = self.table.claim(self.entry, i, layers) if self.entry is not None else None
        if target is not None and target.device == self.group.data_device:
            landing = target
        else:
            self.slots = self.slots or self.staging.slots(self.depth, h.block_nbytes())
            landing = self.slots[i % self.depth]
        try:
            work = self.group.recv(landing, DATA_TAG)
        except BaseException:
            if target is not None:
                self.table.release(self.entry)
            raise
        self.pending.append((work, target, landing))

    def _wait(self, work: Any) -> None:
        self.group.wait(work, self.deadline - time.monotonic(), "the payload")

    def _settle_oldest(self, waited: bool) -> None:
        work, target, landing = self.pending[0]
        if not waited:  # never wait twice: a gloo wait consumes its completion
            self._wait(work)
        self.pending.popleft()
        if target is not None:
            if landing is not target:  # CUDA cache over a gloo wire
                target.copy_(landing)
            self.table.release(self.entry)
