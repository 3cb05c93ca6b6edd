"""Pair channels of the torch_dist backend: one sender thread and one receiver thread per pair.

A channel owns a ``PairGroup`` (see ``torch_dist``) and moves messages in FIFO order::

    header  (ctrl group, uint8 [HEADER_BYTES])
    block 0 (data group: layers [l0, l1) of the request's first block, one contiguous run)
    block 1 ...

Zero copy: the cache is block-major, so each message is sent straight from the sender's
cache and received straight into the receiver's reserved block (``ExpectTable.claim``); no
gather, no scatter, no staging. So is a head slice (resharding between TP sizes: see
``header``) between head-major caches, the engine's: SLICED, a block's slice a message.
Between token-major caches (hand-made, in tests) or caches of different layouts, head
slices are the exception: a GATHERED payload is gathered a window of blocks at a time into
one half of the sender's staging (``_Window``) while the other half's messages are on the
wire; a STAGED one lands in the receiver's staging, whole up to
``recv_channel.WHOLE_STAGED_BYTES`` (one scatter into its blocks' head slice), else a
message at a time. The sender posts a
payload's messages at once; the receiver keeps ``inflight_messages`` receives posted ahead
(what an abort may have to wait for). Otherwise staging is used only where the cache is
not on the wire's device (CUDA caches over a gloo wire: through host slots) and to drain a
payload nobody expects any more.

Announced payloads (gloo wire): the prefill worker knows where a request's KV will go
(peer, source and reserved blocks) once the prompt's last chunk is scheduled, a forward
pass before the KV exists. It sends an ANNOUNCE header then, with the messages' layout
(runs) and a tag of their own; the receiver posts every receive into the reserved blocks
at once. When the KV is ready its messages go out on that tag, then the DATA header as a
trailer, and gloo writes each message as soon as it is posted: no header → post →
ready-notice round trip before the first byte, which was most of a small transfer's time.
An announcement is settled exactly once by the sender: by its DATA, or by RETRACT
(aborted, no transfer, or a send of other blocks than announced: then a plain DATA
follows) whose 1-byte messages complete the posted receives. Until then an abort on the
receiver waits (the receives write into the blocks); a channel that ends drops its
receives with the pair group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer import blocks
from kv_transfer.base import Endpoint, TransferConfig, TransferHandle, TransferStats
from kv_transfer.errors import PeerClosed, TransferError
from kv_transfer.header import (
    ANNOUNCE,
    CLOSE,
    DATA,
    DATA_TAG,
    REFUSE,
    RETRACT,
    TransferHeader,
    run_window,
)
from kv_transfer.torch_dist.announcements import _LAST_TAG, FIRST_ANNOUNCED_TAG
from kv_transfer.torch_dist.staging import Staging

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SendJob:
    """One send, from ``submit`` until its handle completes."""

    header: TransferHeader  # what goes on the wire first (DATA, ANNOUNCE, RETRACT, REFUSE)
    src_ids: list[int]  # source block ids, in the request's order ([] for RETRACT)
    handle: TransferHandle  # completed by the channel thread
    channel: SenderChannel | None = None  # the channel it was submitted to
    encoded: torch.Tensor | None = None  # the header's bytes, if made ahead (announced)
    messages: list[torch.Tensor] | None = None  # its messages' views, if made ahead (see
    # ``in_place_messages``)
    wire: _PayloadSend | None = None  # its messages once posted
    post_on: Any = None  # the pair group its submitter is to post it on (see SenderChannel)
    post_error: TransferError | None = None  # posting from the submitting thread failed
    peer: Endpoint | None = None  # where it goes (a resend opens a new channel there)
    resent: bool = False  # already sent again after a broken channel (once at most)
    _started: bool = False  # on the wire: an abort can no longer drop it
    _dropped: bool = False
    _claimed: bool = False  # its outcome is being settled (see ``claim``)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> bool:
        """Mark the job as going on the wire; False if it was dropped first (skip it)."""
        with self._lock:
            if self._dropped or self.handle.done():
                return False
            self._started = True
            return True

    def claim(self) -> bool:
        """True for the first caller only: the one that settles the job's outcome, either
        the channel thread when its wait ends, or the link watch when the link broke first
        (see ``SenderChannel._link_broke``)."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def drop(self, error: TransferError) -> bool:
        """Fail the job unless it is on the wire already (then its blocks are being read and
        it must finish first). True if dropped."""
        with self._lock:
            if self._started or self._dropped:
                return False
            self._dropped = True
        return self.handle.fail(error)


class _PayloadSend:
    """One job's messages: the header on the ctrl group, then (DATA) one message per block
    (or per run of blocks contiguous in both caches, as the header says), each straight from
    the cache (gloo writes to the socket in the posting thread), or (RETRACT) one 1-byte
    message per announced message; ANNOUNCE has none. Every message
    is posted without waiting: the blocks stay held until the handle completes, and a wait per
    message costs a thread hand-off (measured: 2 in flight took 2x as long as 32 for 128
    blocks of 512 KiB). Through host staging slots, at most ``inflight_messages`` are
    unfinished."""

    def __init__(self, channel: SenderChannel, group: Any, job: SendJob) -> None:
        h = job.header
        self.start = time.perf_counter()
        # The header first (the receiver's work starts when it lands; not waited for: a wait
        # costs a hand-off), except behind an announced payload: its receives are posted, so
        # the header only tells the receiver that the messages before it are complete (one
        # wake-up at the end instead of one amid the transfer, whose CPU it would slow).
        # Not behind a GATHERED one: its few slots are reused once the receiver took their
        # messages, so a receiver that posted nothing (it no longer expects the request)
        # must learn of it before the slots run out, to drain it.
        self.header_bytes = job.encoded if job.encoded is not None else h.encode()
        trailer = _is_announced_data(h) and not h.gathered
        self.header = None if trailer else group.send_ctrl(self.header_bytes)
        self.group, self.src_ids, self.tag = group, job.src_ids, h.tag
        self.views, self.layers = channel.views, (h.layer_start, h.layer_end)
        self.kv = channel.kv
        self.deadline = time.monotonic() + channel.config.timeout_s
        self.via_host = group.data_device != self.kv.device  # CUDA cache over a gloo wire
        # A GATHERED payload's messages are gathered into slots (see ``sender``)
        lo = channel.heads[0]
        self.gather_heads = (slice(h.head_start - lo, h.heads[1] - lo)
                             if h.kind == DATA and h.gathered else None)
        # a SLICED payload's messages are that head range of a block, in place
        self.slice = _own_slice(h, lo)
        # views made ahead (announced), else made as posted; never for messages that go
        # through staging (announce refuses those today: this keeps it so if that changes)
        self.made = None if self.via_host or self.gather_heads is not None else job.messages
        self.block_shape, self.dtype = h.block_payload_shape(), h.dtype
        self.block_nbytes = h.block_nbytes() if h.kind == DATA else 0
        # (first block index, block count), in wire order
        self.messages = [] if h.kind in (ANNOUNCE, REFUSE) else h.messages()
        self.windows: list[_Window] = []
        if self.gather_heads is not None:  # gathered a window at a time (see _Window)
            self.windows = _Window.plan(self.messages, channel.config.inflight_messages)
            self.window_of = [w for w, win in enumerate(self.windows)
                              for _ in range(win.first_message, win.end_message)]
            self.depth, self.slots = max(1, len(self.messages)), []
            largest = max(w.num_blocks for w in self.windows)
            self.halves = list(channel.staging(group).take(
                2 * largest * self.block_nbytes).view(2, -1))
        elif h.kind == DATA and self.via_host:
            self.depth = run_window(channel.config.inflight_messages, h.runs)
            self.slots = channel.staging_slots(group, h, self.depth)
        else:
            self.depth, self.slots = max(1, len(self.messages)), []
        self.fill = channel.fill(group) if h.kind == RETRACT else None
        self.nbytes = h.num_blocks * h.block_nbytes() if h.kind == DATA else 0
        self.pending: deque[Any] = deque()  # sends in flight, oldest first
        self.posted = 0

    def post(self, up_to: int) -> None:
        """Post the messages before index ``up_to`` (waiting for the oldest once ``depth``
        are unfinished, which frees its staging slot)."""
        for i in range(self.posted, min(up_to, len(self.messages))):
            if len(self.pending) == self.depth:
                self._wait(self.pending.popleft())
            if self.fill is not None:
                message = self.fill
            elif self.windows:
                message = self._gathered(i)
            elif self.made is not None:
                message = self.made[i]
            else:
                first, count = self.messages[i]
                message = self.views(self.src_ids[first], self.layers, count, self.slice)
                if self.via_host:
                    message = self.slots[i % self.depth][: message.numel()].copy_(message)
            self.pending.append(self.group.send(message, self.tag))
            self.posted = i + 1

    def post_all(self) -> None:
        """Post the rest, and the header if it trails the messages."""
        self.post(len(self.messages))
        if self.header is None:
            self.header = self.group.send_ctrl(self.header_bytes)

    def _gathered(self, i: int) -> torch.Tensor:
        """Message ``i`` of a head slice (``uint8``), in its window's half of the staging;
        its window is gathered first if ``i`` opens it, once the window that used that half
        before is taken (sends of a pair complete in order: its last send covers it)."""
        first, count = self.messages[i]
        w = self.window_of[i]
        win, half = self.windows[w], self.halves[w % 2]
        if i == win.first_message:
            if w >= 2:
                self._wait(self.pending[self.windows[w - 2].end_message - 1])  # all in pending
            ids = self.src_ids[win.first_block : win.first_block + win.num_blocks]
            out = half[: win.num_blocks * self.block_nbytes].view(self.dtype).view(
                win.num_blocks, *self.block_shape)
            layers = slice(*self.layers)
            if half.device == self.kv.device:
                blocks.gather(self.kv, ids, layers, out, self.gather_heads)
            else:  # CUDA cache over a gloo wire: gather there, then one copy to the host
                out.copy_(blocks.gather(self.kv, ids, layers, heads=self.gather_heads))
        start = (first - win.first_block) * self.block_nbytes
        return half[start : start + count * self.block_nbytes]

    def finish(self) -> TransferStats:
        """Post the rest (and a trailing header), then wait for every message to be taken."""
        self.post_all()
        self.group.wait(self.header, self.deadline - time.monotonic(), "the header to be taken")
        if self.pending:  # sends of a pair complete in order: the newest covers the rest
            self._wait(self.pending.pop())
            self.pending.clear()
        return TransferStats(self.nbytes, time.perf_counter() - self.start)

    def _wait(self, work: Any) -> None:
        self.group.wait(work, self.deadline - time.monotonic(), "the payload to be taken")


@dataclass(frozen=True)
class _Window:
    """Consecutive messages of a GATHERED payload whose blocks are gathered by one index
    op (a copy per message cost as much Python as the copy itself for one-block messages)
    into one half of the channel's staging, while the other half's messages are on the
    wire. A window holds about half ``inflight_messages`` blocks, at least one message."""

    first_message: int
    end_message: int
    first_block: int
    num_blocks: int

    @staticmethod
    def plan(messages: list[tuple[int, int]], inflight_blocks: int) -> list[_Window]:
        limit, out, i = max(1, inflight_blocks // 2), [], 0
        while i < len(messages):
            start, blocks_in = i, 0
            while i < len(messages) and (i == start or blocks_in + messages[i][1] <= limit):
                blocks_in += messages[i][1]
                i += 1
            out.append(_Window(start, i, messages[start][0], blocks_in))
        return out


def _is_announced_data(h: TransferHeader) -> bool:
    return h.kind == DATA and h.tag != DATA_TAG


def _own_slice(h: TransferHeader, lo: int) -> tuple[int, int] | None:
    """A SLICED payload's head range as indices into the sender's cache (which holds the
    global heads from ``lo``), else None."""
    return (h.head_start - lo, h.heads[1] - lo) if h.kind == DATA and h.sliced else None


def in_place_messages(views: blocks.BlockViews, lo: int, h: TransferHeader,
                      src_ids: list[int]) -> list[torch.Tensor] | None:
    """The messages of a DATA payload sent straight from the cache (``views`` of it; its
    heads start at global head ``lo``), as ``_PayloadSend`` would make them one by one; None
    for a GATHERED one. Made when a payload is announced, a forward pass before it is sent:
    a view costs a few microseconds, per block, on the transfer's critical path."""
    if h.kind != DATA or h.gathered:
        return None
    part, layers = _own_slice(h, lo), (h.layer_start, h.layer_end)
    return [views(src_ids[first], layers, count, part) for first, count in h.messages()]


# Messages an idle channel posts from the submitting thread (the prefill engine loop) for a
# plain payload, after its header: a few, so that the receiver finds data ready as soon as it
# posts its receives. The rest waits for the receives, which the channel thread waits for.
DIRECT_MESSAGES = 4

_CLOSE = object()  # job sentinel: send a CLOSE header and end


class SenderChannel:
    """The sending end of one pair: a FIFO of jobs and the one thread that completes them.

    An idle channel lets the submitting thread put a submitted job on the wire
    (``post_submitted``), with no thread hand-off before the first byte: on a small host the
    wake-up of another thread is most of the fixed cost of a small transfer.
      - A plain payload: its header and the first ``DIRECT_MESSAGES`` messages (the
        receiver learns of the request at once; the rest needs its receives posted).
      - An announced payload (receives already posted) up to ``inline_send_bytes``: all of
        it. gloo writes a message to a ready receive in the posting thread until the socket
        would block (16 MiB over loopback: ~5 ms), so the engine loop pays the write it
        would otherwise wait a hand-off for; only CPU caches are announced, whose prefill
        compute is orders of magnitude longer than writing its KV.
    Jobs behind a busy one are posted by the channel thread, in order; it also waits for
    every job's completion."""

    def __init__(
        self,
        peer: str,
        open_group: Callable[[], Any],
        kv_cache: torch.Tensor,
        config: TransferConfig,
        on_exit: Callable[[SenderChannel], None],
        resend: Callable[[SendJob], bool] = lambda job: False,
        heads: tuple[int, int] | None = None,
    ) -> None:
        self.peer = peer  # "decode-2 (10.0.0.5:41231)"
        self.heads = heads or (0, kv_cache.shape[4])  # the global KV heads the cache holds
        self._open_group = open_group  # () -> PairGroup; runs on the channel thread
        self.kv, self.views, self.config = kv_cache, blocks.BlockViews(kv_cache), config
        self._on_exit = on_exit
        # A payload this channel could not deliver because the link broke: the sender may
        # take it over (send it on a new channel); True if it did.
        self._resend = resend
        self._cond = threading.Condition()  # guards everything below
        self._jobs: deque[Any] = deque()  # SendJob or _CLOSE, in submit order
        self._group: Any = None  # the open pair group (None before connect and after exit)
        self._closed = False  # no more submits accepted
        self._busy = False  # a job is on the wire
        self._current: SendJob | None = None  # the job the channel thread is completing
        self._broken: TransferError | None = None  # the link watch saw the link break
        self._ended = False  # the channel thread is done
        self._submitter_posting = False  # the head job is being posted by its submitter
        self._staging: Staging | None = None
        self._fill: torch.Tensor | None = None  # RETRACT's 1-byte message
        self._next_tag = FIRST_ANNOUNCED_TAG
        self._unsettled = 0  # announcements without their DATA or RETRACT yet
        self.thread = threading.Thread(target=self._run, name=f"kv-send {peer}", daemon=True)
        self.thread.start()

    def new_tag(self) -> int:
        """A tag for one announced payload, unused on this channel so far; the channel
        counts as busy (the LRU keeps it open) until ``settle``."""
        with self._cond:
            tag = self._next_tag
            self._next_tag = tag + 1 if tag < _LAST_TAG else FIRST_ANNOUNCED_TAG
            self._unsettled += 1
            return tag

    def submit(self, job: SendJob) -> bool:
        """Queue ``job``; False if the channel is closing (open a new one). If the channel
        is idle the job is left for its submitter to post: call ``post_submitted`` next,
        outside any lock that others may need meanwhile (posting may write the payload)."""
        with self._cond:
            if self._closed:
                return False
            job.channel = self
            # Never an ANNOUNCE: it is early by design, and posting it costs a socket write.
            if job.header.kind != ANNOUNCE and self._group is not None and not self._busy \
                    and not self._jobs and self._may_post_here(job.header) and job.start():
                job.post_on = self._group
                self._busy = self._submitter_posting = True  # the channel thread waits
            self._jobs.append(job)
            if not self._submitter_posting:  # else post_submitted wakes it, once
                self._cond.notify()
            return True

    def post_submitted(self, job: SendJob, write: bool = True) -> None:
        """Put a just-submitted job on the wire from this thread, if ``submit`` left it to
        the submitter (see the class); the channel thread takes it from there.
        ``write=False``: its header only, its messages from the channel thread (this thread
        writes another payload meanwhile)."""
        group, job.post_on = job.post_on, None
        if group is None:
            return
        try:
            job.wire = _PayloadSend(self, group, job)
            if write and _is_announced_data(job.header):
                job.wire.post_all()
            elif write:  # a gathered message costs a copy: the rest waits for the channel thread
                job.wire.post(1 if job.header.gathered else DIRECT_MESSAGES)
        except Exception as e:  # the channel thread fails the job and the channel
            if not isinstance(e, TransferError):
                log.exception("kv_transfer: posting %s failed", job.header.request_id)
                e = PeerClosed(None, self.peer, f"internal error: {e!r}")
            job.post_error = e
        finally:
            with self._cond:
                self._submitter_posting = False
                self._cond.notify()

    def _may_post_here(self, h: TransferHeader) -> bool:
        if not _is_announced_data(h):
            return True  # a few messages only
        if h.gathered:  # each message is a copy, then a write: a rank sending several
            return False  # routes of a request writes them on their channels' threads
        return h.num_blocks * h.block_nbytes() <= self.config.inline_send_bytes

    def idle(self) -> bool:
        """Nothing queued or on the wire, and no announcement waiting for its payload."""
        with self._cond:
            return not self._busy and not self._jobs and not self._unsettled

    def settle(self) -> None:
        """An announcement of this channel got its DATA or RETRACT job."""
        with self._cond:
            self._unsettled -= 1

    def close(self) -> None:
        """Send what is queued, then a CLOSE header, then end."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._jobs.append(_CLOSE)
                self._cond.notify()

    def fill(self, group: Any) -> torch.Tensor:
        if self._fill is None:
            self._fill = torch.zeros(1, dtype=torch.uint8, device=group.data_device)
        return self._fill

    def staging(self, group: Any) -> Staging:
        if self._staging is None:
            self._staging = Staging(group.data_device)
        return self._staging

    def staging_slots(self, group: Any, h: TransferHeader, depth: int) -> list[torch.Tensor]:
        return self.staging(group).slots(depth, h.largest_message_nbytes())

    def _run(self) -> None:
        if self.kv.is_cuda:  # the CUDA current device is per thread
            torch.cuda.set_device(self.kv.device)
        try:
            group = self._open_group()
        except Exception as e:  # TransferError, or a bug: either way no queued send may hang
            error = e if isinstance(e, TransferError) else PeerClosed(None, self.peer, repr(e))
            self._fail_queued(error, resend=False)  # unreachable: a new channel would be too
        else:
            with self._cond:
                self._group = group
            group.watch_link(self._link_broke)
            error = self._serve(group)
            if error is None:
                if self._send_close(group) and not group.end_watch(self.config.timeout_s):
                    log.info("kv_transfer: %s did not acknowledge the close", self.peer)
            else:
                self._fail_queued(error)
            group.close()
        with self._cond:
            self._ended = True
        self._on_exit(self)

    def _link_broke(self, error: TransferError) -> None:
        """The link watch saw the pair's link break (see ``PairGroup.watch_link``). gloo may
        never fail the send being written, so its wait would hold every job behind it until
        the timeout: instead the channel closes now, the job on the wire and those queued
        are sent again on a new channel (``_resend``), and new sends open one. The channel
        thread ends once its wait does, and leaves the jobs' outcomes to this."""
        with self._cond:
            if self._ended or self._broken is not None:
                return
            self._broken = error
            self._closed, self._group = True, None
            jobs = [j for j in (self._current, *self._jobs) if j is not None and j is not _CLOSE]
            self._jobs = deque()
            self._cond.notify()
        log.warning("kv_transfer: the link to %s broke (%s); %d send(s) move to a new channel",
                    self.peer, error.what, len(jobs))
        self._on_exit(self)  # forget this channel now: the next send opens a new one
        for job in jobs:
            if job.claim() and not self._resend(job):
                job.handle.fail(PeerClosed(job.header.request_id, self.peer,
                                           f"the link broke: {error.what}"))

    def _next_job(self) -> Any:
        """The next job (marked busy), ``_CLOSE``, or None after ``idle_timeout_s`` idle."""
        with self._cond:
            while (not self._jobs or self._submitter_posting) and self._broken is None:
                if not self._cond.wait(self.config.idle_timeout_s) and not self._jobs:
                    self._closed = True
                    self._group = None
                    return None
            if self._broken is not None:  # its jobs moved on (see _link_broke)
                return None
            job = self._jobs.popleft()
            if job is _CLOSE:
                self._group = None
            else:
                self._busy = True
                self._current = job
            return job

    def _serve(self, group: Any) -> TransferError | None:
        """Send queued jobs until CLOSE or idle; the channel's error if it broke."""
        while (job := self._next_job()) is not None and job is not _CLOSE:
            error: TransferError | None = None
            stats: TransferStats | None = None
            try:
                if job.post_error is not None:
                    raise job.post_error
                if job.wire is None and job.start():
                    job.wire = _PayloadSend(self, group, job)
                if job.wire is not None:  # else: dropped (aborted) while queued
                    stats = job.wire.finish()
            except TransferError as e:
                error = e.for_request(job.header.request_id)
            except Exception as e:  # a bug must fail the request, not hang it
                log.exception("kv_transfer: sending %s failed", job.header.request_id)
                error = PeerClosed(job.header.request_id, self.peer, f"internal error: {e!r}")
            # The channel is free (or closed) before the job completes: a send made as it
            # completes finds it idle (and may post at once) or opens a new one.
            with self._cond:
                self._busy, self._current = False, None
                if error is not None:  # a broken pair: nothing more is posted on it
                    self._closed, self._group = True, None
            if not job.claim():  # the link watch moved it to a new channel already
                return error or self._broken
            if error is not None:
                if not (isinstance(error, PeerClosed) and self._resend(job)):
                    job.handle.fail(error)
                return error
            if stats is not None:
                job.handle.succeed(stats)
        return self._broken

    def _send_close(self, group: Any) -> bool:
        """Send CLOSE; True once the receiver took it (it then acknowledges on the link)."""
        try:
            group.wait(
                group.send_ctrl(TransferHeader(CLOSE).encode()),
                self.config.timeout_s,
                "the close message to be taken",
            )
        except TransferError as error:
            log.info("kv_transfer: closing channel to %s: %s", self.peer, error)
            return False
        return True

    def _fail_queued(self, error: TransferError, resend: bool = True) -> None:
        with self._cond:
            self._closed, self._group = True, None
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:  # never on the wire: each may go on a new channel
            if job is not _CLOSE and not (resend and self._resend(job)):
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
            if len(self._open) <= self._max:
                return channel
            idle = [c for c in self._open.values() if c is not channel and c.idle()]
            for victim in idle[: len(self._open) - self._max]:
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
