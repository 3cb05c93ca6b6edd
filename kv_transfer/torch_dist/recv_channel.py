"""The receiving end of a pair channel (see ``send_channel`` for the wire)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from kv_transfer import blocks
from kv_transfer.base import TransferConfig
from kv_transfer.errors import LayoutMismatch, PeerClosed, TransferError
from kv_transfer.header import (
    ANNOUNCE,
    CLOSE,
    DATA,
    DATA_TAG,
    MAX_RUN_BYTES,
    REFUSE,
    RETRACT,
    TransferHeader,
    empty_header,
    run_window,
)
from kv_transfer.receiving import ExpectTable
from kv_transfer.torch_dist.staging import Staging, StagingPool

log = logging.getLogger(__name__)

# A STAGED payload up to this size lands whole in the channel's staging (every receive
# posted at once, as into the cache) and is scattered by one copy once it is all in. A
# scatter per message needs this channel's thread to run amid the transfer, and on a busy
# host it is woken late (2 cores, 2 senders: the first message's wake-up came after the
# last byte), so the copies ran after the transfer anyway, one by one.
WHOLE_STAGED_BYTES = 32 << 20


class ReceiverChannel:
    """The receiving end of one pair: one thread that receives, scatters and reports.

    Headers are handled in wire order. Receives posted for an announcement (``_announced``,
    by tag) stay posted while later headers are handled; the payload's DATA header (or a
    RETRACT) completes them. When the channel ends, every posted receive is dropped with the
    pair group before its blocks are released."""

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
        self._heads_outer = blocks.heads_outer(table.kv_cache)
        self._config = config
        self._on_exit = on_exit
        self._staging: Staging | None = None
        self._pool: StagingPool | None = None  # announced STAGED payloads' own buffers
        self._announced: dict[int, _BlockReceives] = {}  # tag -> receives posted ahead
        self._closed_by_sender = False  # a CLOSE header ended it (else the link broke)
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
        self._pool = StagingPool(group.data_device)
        current: list[_BlockReceives] = []  # the payload being received, for the error path
        error: TransferError = PeerClosed(None, self.peer, "the channel closed while receiving")
        try:
            while (header := self._next_header(group)) is not None:
                self._handle(group, header, current)
                current.clear()
        except TransferError as e:
            log.warning("kv_transfer: receive channel from %s ends: %s", self.peer, e)
            error = e
        except Exception as e:  # a bug ends this channel (its request failed), never the others
            log.exception("kv_transfer: receive channel from %s failed", self.peer)
            error = PeerClosed(None, self.peer, f"internal error: {e!r}")
        finally:
            self._drop_all(group, current, error)
            self._on_exit(self)

    def _next_header(self, group: Any) -> TransferHeader | None:
        """The next header (DATA, ANNOUNCE or RETRACT), or None when the sender closed the
        channel."""
        buf = empty_header()
        try:
            group.wait(group.recv_ctrl(buf), None, "the next header")
        except PeerClosed:
            return None  # the sender (or the link) went away between messages
        header = TransferHeader.decode(buf)
        if header.kind == CLOSE:
            self._closed_by_sender = True
            return None
        return header

    def _handle(self, group: Any, h: TransferHeader, current: list[_BlockReceives]) -> None:
        if h.kind == REFUSE:  # nothing follows
            self._table.refuse(h, self.peer)
            return
        if h.kind != DATA and h.tag == DATA_TAG or h.kind == DATA and h.tag < DATA_TAG:
            raise PeerClosed(None, self.peer, f"header kind {h.kind} with tag {h.tag} (bad sender)")
        if h.largest_message_nbytes() > max(MAX_RUN_BYTES, h.block_nbytes()):
            error = PeerClosed(None, self.peer, f"a run over {MAX_RUN_BYTES} bytes (bad sender)")
            if h.kind == DATA:
                self._table.fail_id(h.request_id, error.for_request(h.request_id))
            raise error  # its messages cannot be drained within bounds: end the channel
        if h.kind == ANNOUNCE:
            self._announce(group, h)
            return
        posted = self._announced.pop(h.tag, None) if h.tag != DATA_TAG else None
        if posted is not None:
            was = posted.h
            if (was.request_id, was.num_blocks, was.runs) != (h.request_id, h.num_blocks, h.runs):
                current.append(posted)
                raise PeerClosed(None, self.peer, f"tag {h.tag} reused (bad sender)")
            current.append(posted)
            posted.complete(deadline=time.monotonic() + self._config.timeout_s,
                            land=h.kind == DATA)  # a RETRACT's fills are not KV
            if h.kind == DATA and posted.entry is not None:
                self._table.finish(posted.entry, h)
            return
        if h.kind == RETRACT:  # nothing was posted for it: take its 1-byte messages
            self._drain_fills(group, h)
            return
        entry = self._begin(h)
        blocks_in = _BlockReceives(group, self._table, entry, h, self._config, self._staging)
        current.append(blocks_in)
        blocks_in.run()
        if entry is not None:
            self._table.finish(entry, h)

    def _announce(self, group: Any, h: TransferHeader) -> None:
        """Post every receive of an announced payload straight into its reserved blocks (a
        STAGED one up to ``WHOLE_STAGED_BYTES``: into a staging buffer of its own, scattered
        when its DATA comes), if the request is expected and its cache is on the wire's
        device; else nothing (the DATA header is then handled like an unannounced one)."""
        if h.tag in self._announced:
            raise PeerClosed(None, self.peer, f"tag {h.tag} announced twice (bad sender)")
        if self._table.kv_cache.device != group.data_device:
            return  # through host staging: receive when the data comes
        if not self._table.in_place(h) and not _fits_whole(h):
            return  # through a few staging slots: receive when the data comes
        entry = self._begin(h)
        if entry is None:
            return
        receives = _BlockReceives(group, self._table, entry, h, self._config, self._staging,
                                  post_all=True, pool=self._pool)
        self._announced[h.tag] = receives
        receives.post_all()  # a failure ends the channel; _drop_all releases what was posted

    def _begin(self, h: TransferHeader) -> Any:
        """The table's entry for a payload (None: drain it), failing the request when its
        messages come in a byte order that this cache's memory does not have."""
        entry = self._table.begin(h, self.peer)
        problem = entry is not None and _order_problem(h, self._heads_outer)
        if problem:
            self._table.fail(entry, LayoutMismatch(h.request_id, self.peer, problem))
            return None
        return entry

    def _drain_fills(self, group: Any, h: TransferHeader) -> None:
        n = len(h.messages())
        scratch = torch.empty(n, dtype=torch.uint8, device=group.data_device)
        works = [group.recv(scratch[i : i + 1], h.tag) for i in range(n)]
        group.wait(works[-1], self._config.timeout_s, "a retraction")  # in order: the rest too

    def _drop_all(self, group: Any, current: list[_BlockReceives], error: TransferError) -> None:
        """The channel ends: drop every posted receive with the pair group (then nothing
        writes into the blocks any more), then release their blocks and fail the payload
        that was being received with ``error``. Announced requests fail too when the channel
        broke (no CLOSE from the sender: it died, or the link did), so the router retries
        them at once instead of after the KV deadline; after a clean CLOSE they stay
        expected (their sender sends them plainly on a new channel)."""
        receives = [*current, *self._announced.values()]
        self._announced.clear()
        claims = [r.drop_pending() for r in receives]
        broken = not self._closed_by_sender
        if not broken:  # the sender's link watch waits for this (see PairGroup.watch_link)
            try:
                group.ack_close(self._config.timeout_s)
            except TransferError as e:
                log.info("kv_transfer: acknowledging the close of %s: %s", self.peer, e)
        group.close()
        for r, claimed in zip(receives, claims, strict=True):
            r.release(claimed)
            if r.entry is not None and (r in current or broken):
                self._table.fail(r.entry, error.for_request(r.h.request_id))


def _order_problem(h: TransferHeader, heads_outer: bool) -> str:
    """Why a payload's bytes (see ``header``) do not fit a cache that is head-major in
    memory or not (``heads_outer``), or "". Staged messages are scattered in logical
    (token-major) order; in place, they must be in this cache's memory order."""
    if h.sliced:
        ok = heads_outer
    elif h.staged:
        ok = not h.heads_outer
    else:
        ok = heads_outer == h.heads_outer
    if ok:
        return ""
    mine = "head-major" if heads_outer else "token-major"
    return (f"the sender's KV messages do not fit this receiver's {mine} cache in memory; "
            "allocate both pools' caches as engine.kv_layout.new_kv_cache does")


def _fits_whole(h: TransferHeader) -> bool:
    return h.num_blocks * h.block_nbytes() <= WHOLE_STAGED_BYTES


class _BlockReceives:
    """The receives of one payload, one per message (a block, or a run of blocks contiguous
    in both caches): ``inflight_messages`` posted ahead (every one, if announced), each
    straight into its claimed blocks (or a staging slot: draining, a CUDA cache over a
    gloo wire, or a STAGED payload, a head slice scattered into the blocks from there; a
    STAGED payload up to ``WHOLE_STAGED_BYTES`` lands whole in staging instead, all
    posted at once, and is scattered by one copy)."""

    def __init__(self, group: Any, table: ExpectTable, entry: Any, h: TransferHeader,
                 config: TransferConfig, staging: Staging, post_all: bool = False,
                 pool: StagingPool | None = None) -> None:
        self.group, self.table, self.entry, self.h = group, table, entry, h
        self.messages = h.messages()  # (first block index, block count), in wire order
        # else via staging slots
        self.in_place = table.kv_cache.device == group.data_device and table.in_place(h)
        # (a STAGED one only: a CUDA cache's whole blocks come through slots, each copied
        # into its own blocks, which a whole payload's one claim could not name)
        self.whole = entry is not None and not table.in_place(h) and _fits_whole(h)
        # an announced one's receives stay posted while later payloads use ``staging``
        self.pool = pool if post_all else None
        self.region: torch.Tensor | None = None  # a whole payload's buffer from ``pool``
        self.land = True  # False: complete the receives but write nothing (a RETRACT)
        if post_all or self.whole:
            self.depth = max(1, len(self.messages))
        else:
            self.depth = run_window(config.inflight_messages, h.runs)
        self.deadline = time.monotonic() + config.timeout_s
        self.staging = staging
        self.slots: list[torch.Tensor] = []  # taken only when needed
        # (work, claimed blocks' view or None, where it lands, number of blocks)
        self.pending: deque[tuple[Any, torch.Tensor | None, torch.Tensor, int]] = deque()
        self.posted = 0

    def run(self) -> None:
        """Completions are waited for a half window at a time (the rest at once when all is
        posted), newest only: receives of a pair complete in order, so once the newest of a
        batch is done the older ones are too (a wake-up, or even a wait call, per message
        costs CPU that both sides' gloo threads need on a small host)."""
        n, depth = len(self.messages), self.depth
        # A staged payload: each message is scattered as soon as it is in (its copy then
        # overlaps the next one's receive, and the last copy after the last byte is short).
        staged = not self.in_place and self.entry is not None and not self.whole
        batch = 1 if staged else max(1, depth // 2)
        done = 0
        while done < n:
            self._post_until(min(done + depth, n))
            end = n if self.posted == n and not staged else min(done + batch, n)
            self._wait(self.pending[end - done - 1][0])
            self._settle(end - done)
            done = end

    def post_all(self) -> None:
        """Post every receive now (an announced payload: the data comes later)."""
        self._post_until(len(self.messages))

    def complete(self, deadline: float, land: bool = True) -> None:
        """Wait for every posted receive (the newest covers the rest), by ``deadline``;
        ``land=False``: what came is not KV (a RETRACT's fills), nothing is scattered."""
        self.deadline, self.land = deadline, land
        if self.pending:
            self._wait(self.pending[-1][0])
            self._settle(len(self.pending))
        if self.region is not None:  # scattered (or discarded): reusable
            self.pool.give(self.region)
            self.region = None

    def drop_pending(self) -> int:
        """After a failure: forget the unfinished receives (their works: the last references
        to the pair group's context are then the caller's, which it drops before releasing
        the blocks); returns how many claimed blocks they held (see ``release``)."""
        claimed = sum(count for _, target, _, count in self.pending if target is not None)
        self.pending.clear()
        return claimed

    def release(self, claimed: int) -> None:
        if claimed:
            self.table.release(self.entry, claimed)

    def _post_until(self, stop: int) -> None:
        start = self.posted
        if start >= stop:
            return
        spans = self.messages[start:stop]
        if self.whole:
            self._post_whole()
            return
        targets = None
        if self.entry is not None:
            targets = self.table.claim(self.entry, spans, self.h)
        for i in range(start, stop):
            count = spans[i - start][1]
            target = targets[i - start] if targets is not None else None
            if target is not None and self.in_place:
                landing = target
            else:
                if not self.slots:
                    slot_nbytes = self.h.largest_message_nbytes()
                    self.slots = self.staging.slots(self.depth, slot_nbytes)
                landing = self.slots[i % self.depth][: count * self.h.block_nbytes()]
            try:
                work = self.group.recv(landing, self.h.tag)
            except BaseException:
                if targets is not None:  # this message's claim and those not posted yet
                    self.table.release(self.entry, sum(c for _, c in spans[i - start :]))
                raise
            self.pending.append((work, target, landing, count))
            self.posted = i + 1

    def _post_whole(self) -> None:
        """Every receive of a ``whole`` payload, each into its place in one staging buffer;
        the last one carries the payload's claim and scatters it all (see ``_settle``)."""
        bn, n = self.h.block_nbytes(), self.h.num_blocks
        if self.pool is not None:
            region = self.region = self.pool.take(n * bn)
        else:
            region = self.staging.take(n * bn)
        claimed = self.table.claim(self.entry, [(0, n)], self.h)
        for i, (first, count) in enumerate(self.messages):
            last = i == len(self.messages) - 1
            try:
                work = self.group.recv(region[first * bn : (first + count) * bn], self.h.tag)
            except BaseException:
                if claimed is not None:
                    self.table.release(self.entry, n)
                raise
            if last and claimed is not None:
                self.pending.append((work, claimed[0], region, n))
            else:
                self.pending.append((work, None, region, 0))
            self.posted = i + 1

    def _wait(self, work: Any) -> None:
        self.group.wait(work, self.deadline - time.monotonic(), "the payload")

    def _settle(self, count: int) -> None:
        """Retire the ``count`` oldest receives (complete: the newest of them was waited
        for), copying staged ones into their blocks; their claims are released at once,
        even if a copy raises."""
        landed = 0
        try:
            for _ in range(count):
                _work, target, landing, blocks_in = self.pending.popleft()
                if target is not None:
                    landed += blocks_in
                    if landing is not target and self.land:  # via host, or staged
                        target.copy_(landing)
        finally:
            if landed:
                self.table.release(self.entry, landed)
