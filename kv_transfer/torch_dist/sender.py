"""TorchDistSender: pushes KV over pair channels, opened lazily per peer.

A tensor-parallel rank's sender holds a range of the model's KV heads (``heads=``) and sends
each request the heads of its resharding routes (``send(..., heads=...)``), to one or
several decode ranks' receivers, each over its own pair channel. A payload that is not all
the heads the receiver holds (or the sender) is, between head-major caches (the engine's),
SLICED (see ``header``): a message per block, straight from cache to cache. Otherwise (caches
allocated token-major, a layer range, or caches of different layouts), a payload that is
not all the heads the receiver holds is STAGED: the receiver scatters it into its blocks
from staging. A payload that is not all the heads the sender holds, or a STAGED one whose
blocks lie scattered in the source cache, is GATHERED: the sender copies it into staging, a
window of blocks per copy, up to ``STAGED_MESSAGE_BYTES`` a message (a message costs a gloo
round of notices and a post on each side, about as much CPU as gathering a few blocks).
Every route is announced ahead like a whole-cache payload (see ``announce``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence

import torch

from kv_transfer import blocks
from kv_transfer.base import (
    Endpoint,
    HeadRange,
    KVScales,
    KVSender,
    TransferConfig,
    TransferHandle,
    check_heads,
    fail_fast,
    refusal,
    send_header,
)
from kv_transfer.errors import LayoutMismatch, PeerClosed, TransferAborted, TransferError
from kv_transfer.header import (
    ANNOUNCE,
    DATA,
    DATA_TAG,
    GATHERED,
    HEADS_OUTER,
    MAX_RUN_BLOCKS,
    MAX_RUN_BYTES,
    RETRACT,
    SLICED,
    STAGED,
    TransferHeader,
    max_runs,
)
from kv_transfer.torch_dist.announcements import _Announced, _log_control_failure
from kv_transfer.torch_dist.send_channel import (
    ChannelLRU,
    SenderChannel,
    SendJob,
    in_place_messages,
)
from kv_transfer.torch_dist.wire import PairGroup, choose_wire

log = logging.getLogger(__name__)

# A message of a gathered head slice: small enough that gathering the next one overlaps this
# one's trip, large enough that per-message costs stay small.
STAGED_MESSAGE_BYTES = 1 << 20


_RouteKey = tuple[str, HeadRange]  # (peer.describe(), heads): one announced payload


def _route_key(peer: Endpoint, heads: HeadRange) -> _RouteKey:
    return peer.describe(), (int(heads[0]), int(heads[1]))


class TorchDistSender(KVSender):
    """Pushes KV over pair channels, opened lazily per peer and closed LRU-first over the cap."""

    def __init__(self, config: TransferConfig, kv_cache: torch.Tensor, name: str = "prefill",
                 heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0)):
        self.config, self.kv_cache, self.name = config, kv_cache, name
        self.heads = check_heads(kv_cache, heads)  # the global KV heads the cache holds
        self._own_heads, self.kv_scales = heads, kv_scales
        self._lock = threading.Lock()
        self._lru = ChannelLRU(config.max_channels, self._new_channel)
        self._queued: dict[str, list[SendJob]] = {}  # request id -> unfinished sends
        # request id -> its unsettled announcements (see _Announced), one per route: a TP
        # rank may send a request's KV to several decode ranks, each its own head slice
        self._announced: dict[str, dict[_RouteKey, _Announced]] = {}
        self._closed = False
        self._heads_outer = blocks.heads_outer(kv_cache)
        self._views = blocks.BlockViews(kv_cache)  # an announced payload's messages
        self._deferred = threading.local()  # .jobs: this thread's posts held back, or None

    def announce(self, request_id: str, peer: Endpoint, src_block_ids: Sequence[int],
                 dst_block_ids: Sequence[int], heads: HeadRange | None = None) -> bool:
        """Tell ``peer`` now how this request's KV will come (its runs, a tag of its own),
        so that it posts the receives before the KV is computed. Settled by the request's
        ``send`` to the same peer and heads, or ``abort``; a request announces one payload
        per route (peer, heads). False (nothing announced) where it cannot help: an NCCL wire
        (ordered, no tags), a cache that is not on the gloo wire's device (its messages go
        through a few host staging slots, each reused only once the receiver has taken it,
        while an announced payload's header trails its messages: a receiver that did not
        post its receives would never be told to), bad ids or a layout mismatch (``send``
        reports those). Head slices (resharding) are announced: a GATHERED payload's header
        leads its messages instead, for the same reason; a STAGED one the receiver posts
        into a staging buffer of its own, or ignores if it is too large for that."""
        if choose_wire(self.config, self.kv_cache, peer) != "gloo" or self.kv_cache.is_cuda:
            return False
        try:
            src_ids = blocks.check_id_list(self.kv_cache, src_block_ids)
            dst_ids = [int(i) for i in dst_block_ids]
            if len(dst_ids) != len(src_ids):
                return False
            header = self._header(request_id, peer, src_ids, None, dst_ids, heads)
        except (TransferError, ValueError):
            return False
        # made now, outside the lock (a view per block): send() only posts them
        messages = in_place_messages(self._views, self.heads[0],
                                     dataclasses.replace(header, kind=DATA), src_ids)
        key = _route_key(peer, header.heads)
        with self._lock:
            if self._closed or key in self._announced.get(request_id, {}):
                return False
            channel = self._lru.get(peer)
            header = dataclasses.replace(header, kind=ANNOUNCE, tag=channel.new_tag())
            job = SendJob(header, src_ids, TransferHandle(request_id))
            if not channel.submit(job):
                channel.settle()
                return False
            data = dataclasses.replace(header, kind=DATA)  # made now: send() stays short
            self._announced.setdefault(request_id, {})[key] = _Announced(
                job, dst_ids, data, data.encode(), messages)
        job.handle.add_done_callback(_log_control_failure)
        return True

    def send(
        self,
        request_id: str,
        peer: Endpoint,
        src_block_ids: Sequence[int],
        layers: tuple[int, int] | None = None,
        dst_block_ids: Sequence[int] | None = None,
        heads: HeadRange | None = None,
    ) -> TransferHandle:
        handle = TransferHandle(request_id)
        src_ids = blocks.check_id_list(self.kv_cache, src_block_ids)
        ann, others = self._take_announced(request_id, peer, heads)
        for other in others:  # a send unlike any announced: withdraw the request's others
            self._retract(other.job.channel, other.job.header)
            other.job.channel.settle()
        announced_on = ann.job.channel if ann is not None else None
        header, encoded, messages = None, None, None
        if ann is not None:  # as announced (same blocks and peer), else retracted
            if self._matches(ann, peer, src_ids, layers, dst_block_ids, heads):
                header, encoded, messages = ann.data, ann.encoded, ann.messages
            else:
                self._retract(announced_on, ann.job.header)
        if header is None:
            try:
                header = self._header(request_id, peer, src_ids, layers, dst_block_ids, heads)
            except TransferError as error:
                if isinstance(error, LayoutMismatch):
                    self._refuse(request_id, peer, len(src_ids), layers, heads)
                return fail_fast(handle, error)
        job = SendJob(header, src_ids, handle, encoded=encoded, messages=messages, peer=peer)
        with self._lock:
            if self._closed:
                return fail_fast(handle, PeerClosed(request_id, peer.describe(), "sender closed"))
            self._queued.setdefault(request_id, []).append(job)
            channel = self._lru.get(peer)
            if header.tag != DATA_TAG and channel is not announced_on:
                channel = None  # the announcing channel closed (it dropped the receives)
            if channel is None or not channel.submit(job):
                if header.tag != DATA_TAG:  # a fresh channel: unannounced
                    job.header = self._plain(job.header, src_ids, dst_block_ids)
                    job.encoded = job.messages = None  # its runs may differ
                self._lru.drop(announced_on if channel is None else channel)
                self._lru.get(peer).submit(job)
        if announced_on is not None:  # its DATA or RETRACT is queued: the channel may idle
            announced_on.settle()
        self._post(job)  # outside the lock: it may write the payload
        handle.add_done_callback(self._forget)
        return handle

    def abort(self, request_id: str) -> bool:
        with self._lock:
            jobs = list(self._queued.get(request_id, ()))
            announced = list(self._announced.pop(request_id, {}).values())
        error = TransferAborted(request_id, "-", "aborted by the sender before it was sent")
        dropped = [job for job in jobs if job.drop(error)]  # a send on the wire completes first
        for job in dropped:
            if job.header.tag != DATA_TAG:  # an announced payload that never went out
                self._retract(job.channel, job.header)
        for ann in announced:
            self._retract(ann.job.channel, ann.job.header)
            ann.job.channel.settle()
        return bool(dropped)

    @contextlib.contextmanager
    def deferred_writes(self) -> Iterator[None]:
        if getattr(self._deferred, "jobs", None) is not None:
            yield  # nested: the outermost context posts
            return
        self._deferred.jobs = []
        try:
            yield
        finally:
            jobs, self._deferred.jobs = self._deferred.jobs, None
            # Payloads to several peers (a rank's routes of a request, or a step's requests):
            # their channels' threads write all but the last, this thread the last, so the
            # sockets fill in parallel (written one after the other, a 1 -> 2 rank's second
            # route waited for the whole first one).
            writers = [job for job in jobs if job.post_on is not None]
            last = writers[-1] if writers else None
            for job in jobs:
                job.channel.post_submitted(job, write=job is last)

    def _post(self, job: SendJob) -> None:
        """Let a submitted job's channel take it from this thread (now, or when this
        thread's ``deferred_writes`` ends: its channel waits for that)."""
        deferred = getattr(self._deferred, "jobs", None)
        if deferred is None:
            job.channel.post_submitted(job)
        else:
            deferred.append(job)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = self._lru.channels()
        for channel in channels:
            channel.close()
        for channel in channels:
            channel.thread.join(timeout=self.config.timeout_s + self.config.connect_timeout_s)

    def _take_announced(self, request_id: str, peer: Endpoint, heads: HeadRange | None
                        ) -> tuple[_Announced | None, list[_Announced]]:
        """The announcement of this send's route (peer, and heads if given), else None and
        the request's other announcements, all taken: a send that was not announced while
        others were means the plan changed, and theirs would hold their receivers' posted
        receives (and blocks) until the request's abort."""
        with self._lock:
            routes = self._announced.get(request_id)
            if not routes:
                return None, []
            key = next((k for k in routes if k[0] == peer.describe()
                        and (heads is None or k[1] == tuple(heads))), None)
            ann = routes.pop(key) if key is not None else None
            if ann is None or not routes:
                del self._announced[request_id]
            return ann, [] if ann is not None else list(routes.values())

    @staticmethod
    def _matches(ann: _Announced, peer: Endpoint, src_ids: list[int],
                 layers: tuple[int, int] | None, dst_block_ids: Sequence[int] | None,
                 heads: HeadRange | None) -> bool:
        """Whether a send is the one announced: same peer, blocks, heads and (all) layers."""
        h, channel = ann.data, ann.job.channel
        return (
            channel is not None
            and channel.peer == peer.describe()
            and (layers is None or tuple(layers) == (h.layer_start, h.layer_end))
            and (heads is None or tuple(heads) == h.heads)
            and src_ids == ann.job.src_ids
            and dst_block_ids is not None
            and [int(i) for i in dst_block_ids] == ann.dst_ids
        )

    def _plain(self, header: TransferHeader, src_ids: list[int],
               dst_block_ids: Sequence[int] | None) -> TransferHeader:
        """An announced DATA header made unannounced (for a channel that never saw it)."""
        runs = self._runs(header, src_ids, dst_block_ids)
        return dataclasses.replace(header, runs=runs, tag=DATA_TAG)

    def _refuse(self, request_id: str, peer: Endpoint, num_blocks: int,
                layers: tuple[int, int] | None, heads: HeadRange | None) -> None:
        """Tell the receiver that a request will not come and why (a REFUSE header), so that
        it fails there at once too instead of timing out."""
        notice = refusal(request_id, self.kv_cache, peer, num_blocks, layers,
                         self._own_heads, self.kv_scales, heads)
        if notice is None:
            return
        job = SendJob(notice, [], TransferHandle(request_id))
        with self._lock:
            if self._closed or not self._lru.get(peer).submit(job):
                return
        self._post(job)
        job.handle.add_done_callback(_log_control_failure)

    def _retract(self, channel: SenderChannel | None, header: TransferHeader) -> None:
        """Settle an announcement without its payload (see ``channels``); nothing to do if
        its channel is gone (the receiver dropped the receives with it)."""
        if channel is None:
            return
        job = SendJob(dataclasses.replace(header, kind=RETRACT), [], TransferHandle(
            header.request_id))
        if channel.submit(job):
            self._post(job)
            job.handle.add_done_callback(_log_control_failure)

    def _header(self, request_id: str, peer: Endpoint, src_ids: list[int],
                layers: tuple[int, int] | None, dst_block_ids: Sequence[int] | None,
                heads: HeadRange | None) -> TransferHeader:
        """The DATA header of a send (``LayoutMismatch`` if the caches or heads disagree),
        with its runs and how its messages are made (see the module docstring)."""
        header = send_header(request_id, self.kv_cache, peer, len(src_ids), layers,
                             own_heads=self._own_heads, kv_scales=self.kv_scales, heads=heads)
        mine, theirs = self._heads_outer, peer.heads_outer
        head_slice = header.heads != self.heads or header.staged
        every_layer = header.num_layers == self.kv_cache.shape[1]
        if mine and theirs and head_slice and every_layer:
            # a message a block, in place on both sides (gathering a slice of the sender's
            # heads into fewer messages of contiguous receiver blocks measured slower: the
            # copy cost more than the messages it saved, once routes were written in parallel)
            return dataclasses.replace(header, flags=SLICED | HEADS_OUTER)
        if mine != theirs or mine and not every_layer:  # other byte orders, or a layer range
            header = dataclasses.replace(header, flags=STAGED | GATHERED)
        elif mine:
            header = dataclasses.replace(header, flags=HEADS_OUTER)
        elif header.heads != self.heads:
            header = dataclasses.replace(header, flags=header.flags | GATHERED)
        elif header.staged:  # from the cache, unless that takes many more messages
            in_place = self._runs(header, src_ids, dst_block_ids)
            chunks = self._runs(dataclasses.replace(header, flags=STAGED | GATHERED), src_ids,
                                dst_block_ids)
            if len(in_place or src_ids) > 2 * len(chunks or src_ids):
                header = dataclasses.replace(header, flags=STAGED | GATHERED)
        return dataclasses.replace(header, runs=self._runs(header, src_ids, dst_block_ids))

    def _runs(self, header: TransferHeader, src_ids: list[int],
              dst_block_ids: Sequence[int] | None) -> tuple[int, ...]:
        """Blocks per message: spans contiguous where the message is read and where it is
        written go as one message (fewer messages: each costs a gloo round of notices and
        ~100 us of CPU on a small host, or an NCCL kernel); () = one message per block (no
        hint, a layer range, nothing to merge, or more runs than a header holds). A GATHERED
        payload is contiguous in its staging slots; a STAGED one needs no contiguity on the
        receiving side. Messages through staging (either side) stay within
        ``STAGED_MESSAGE_BYTES``, so that the copy of one overlaps the trip of the next."""
        gather, n = header.gathered, len(src_ids)
        limit = STAGED_MESSAGE_BYTES if header.flags & (STAGED | GATHERED) else MAX_RUN_BYTES
        longest = max(1, min(MAX_RUN_BLOCKS, limit // header.block_nbytes()))
        if header.num_layers != self.kv_cache.shape[1] and not (gather and header.staged):
            return ()  # a layer range of adjacent blocks is one span only in staging
        read = list(range(n)) if gather else src_ids
        if header.staged:
            written = read
        elif dst_block_ids is None or len(dst_block_ids) != n:
            return ()
        else:
            written = [int(i) for i in dst_block_ids]
        runs = blocks.contiguous_runs(read, written, longest)
        if len(runs) == n or len(runs) > max_runs(header.request_id):
            return ()
        return tuple(runs)

    def open_peers(self) -> list[str]:
        """Peers with an open channel, least recently used first (for metrics and tests)."""
        return [c.peer for c in self._lru.channels()]

    def _new_channel(self, peer: Endpoint) -> SenderChannel:
        wire = choose_wire(self.config, self.kv_cache, peer)
        open_group = lambda: PairGroup.connect(
            peer, self.config, self.name, wire, self.kv_cache.device
        )
        return SenderChannel(
            peer.describe(), open_group, self.kv_cache, self.config, self._lru.drop,
            resend=self._resend, heads=self.heads,
        )

    def _resend(self, job: SendJob) -> bool:
        """A payload whose channel broke (its link closed under it, or it failed before the
        payload went out) goes once more, unannounced, on a new channel to the same peer.
        The receiver's end of a broken channel fails what it was receiving there, so the
        payload lands at most once: either the old channel had delivered it, or the new
        one does, or the receiver already failed the request and drains the new copy.
        False (the job fails) for control messages, a second break, an aborted or finished
        job, or a closed sender."""
        if job.header.kind != DATA or job.resent or job.peer is None:
            return False
        again = SendJob(dataclasses.replace(job.header, tag=DATA_TAG), job.src_ids,
                        job.handle, peer=job.peer, resent=True)
        with self._lock:
            jobs = self._queued.get(job.header.request_id, [])
            if self._closed or job not in jobs or job.handle.done():
                return False
            jobs[jobs.index(job)] = again
            self._lru.drop(job.channel)
            if not self._lru.get(job.peer).submit(again):
                return False
        log.warning("kv_transfer: the channel to %s broke; sending %s again on a new one",
                    job.peer.describe(), job.header.request_id)
        self._post(again)
        return True

    def _forget(self, handle: TransferHandle) -> None:
        with self._lock:
            jobs = [j for j in self._queued.get(handle.request_id, []) if j.handle is not handle]
            if jobs:
                self._queued[handle.request_id] = jobs
            else:
                self._queued.pop(handle.request_id, None)
