"""Receiver-side bookkeeping shared by every backend: expected requests, abort, completions.

One ``ExpectTable`` per receiver. Backends call, for each arriving payload::

    entry = table.begin(header, peer)      # None: nobody expects it -> drain and discard
    table.write(entry, layers, buffer)     # whole payload: scatter, unless aborted meanwhile
      or, block by block, straight into the cache (torch_dist):
    views = table.claim(entry, spans, header)  # (first, count) spans' destinations, None
    ... receive into each view ...; table.release(entry, blocks)  #   once aborted
    table.finish(entry, header)            # all parts' layers in -> on_done(rid, None) / poll()

A request may arrive in parts (resharding between TP sizes, see ``reshard``): each a head
range of the receiver's heads, from its own sender. A part's payload lands in the blocks'
head slice; the request is done when every layer of every part has arrived, and fails once,
on the first error of any part. A payload whose heads are not an expected part, or whose
dtype or fp8 scales are not the cache's, fails the request with ``LayoutMismatch``.

``abort`` takes the same lock as ``write`` and ``claim``, then waits until every claimed
block has been released: once it returns, nothing writes into the request's blocks any
more, so the decode worker may free them at once. That wait is bounded by the receives
already posted (``TransferConfig.inflight_messages`` blocks), each bounded by the timeout.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer import blocks
from kv_transfer.base import HeadRange, KVReceiver, KVScales, OnDone, check_heads
from kv_transfer.errors import LayoutMismatch, TransferError
from kv_transfer.header import REFUSE, TransferHeader

log = logging.getLogger(__name__)


@dataclass
class Expected:
    """A request whose KV this receiver waits for."""

    request_id: str
    dst_index: torch.Tensor  # [n] int64 block ids on the cache's device
    on_done: OnDone | None  # completion callback, or None to report through poll()
    parts: dict[HeadRange, set[int]] = field(default_factory=dict)  # part -> layers not in yet
    claimed: int = 0  # blocks being received straight into the cache (see ``claim``)
    dst_ids: list[int] = field(default_factory=list)  # dst_index as ints (no device reads)


class StagedTarget:
    """Where a staged message lands: the head slice of its destination blocks
    (``block_ids``), written from a staging buffer by ``copy_`` (as into a flat view)."""

    def __init__(self, table: ExpectTable, block_ids: list[int], h: TransferHeader) -> None:
        self.kv, self.block_ids = table.kv_cache, block_ids
        self.layers = slice(h.layer_start, h.layer_end)
        self.heads = slice(h.head_start - table.heads[0], h.heads[1] - table.heads[0])
        self.shape = (len(block_ids), *h.block_payload_shape())
        self.dtype = h.dtype

    def copy_(self, landing: torch.Tensor) -> None:
        """Scatter a message ``uint8 [count * block bytes]`` into the blocks' head slice."""
        buffer = landing.view(self.dtype).view(self.shape)
        blocks.scatter(self.kv, self.block_ids, buffer, self.layers, self.heads)


class ExpectTable:
    """Thread-safe table of expected requests of one receiver and its ``kv_cache``, which
    holds the global KV heads ``heads`` (None: all of its heads, from 0) stored with fp8
    scales ``kv_scales``."""

    def __init__(self, kv_cache: torch.Tensor, heads: HeadRange | None = None,
                 kv_scales: KVScales = (1.0, 1.0)) -> None:
        self.kv_cache = kv_cache  # [num_blocks, L, 2, block_size, num_kv_heads, head_dim]
        self.heads = check_heads(kv_cache, heads)
        self.kv_scales = (float(kv_scales[0]), float(kv_scales[1]))
        self._views = blocks.BlockViews(kv_cache)
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # a claimed block was released
        self._expected: dict[str, Expected] = {}
        self._completions: deque[tuple[str, TransferError | None]] = deque()
        self._closed_error: TransferError | None = None

    def add(self, request_id: str, dst_block_ids: Sequence[int], on_done: OnDone | None,
            parts: Sequence[HeadRange] | None = None) -> None:
        ids = blocks.check_id_list(self.kv_cache, dst_block_ids)  # no tensor round trip
        index = torch.tensor(ids, dtype=torch.long, device=self.kv_cache.device)
        layers = range(self.kv_cache.shape[1])
        entry = Expected(request_id, index, on_done,
                         {part: set(layers) for part in self._check_parts(parts)}, dst_ids=ids)
        with self._lock:
            if self._closed_error is not None:
                error = self._closed_error.for_request(request_id)
            elif request_id in self._expected:
                raise ValueError(f"request {request_id} is already expected")
            else:
                self._expected[request_id] = entry
                return
        self._report(entry, error)

    def _check_parts(self, parts: Sequence[HeadRange] | None) -> list[HeadRange]:
        """``parts`` as tuples; ``ValueError`` unless they tile this receiver's heads."""
        if parts is None:
            return [self.heads]
        ranges = sorted((int(lo), int(hi)) for lo, hi in parts)
        edges = [self.heads[0]] + [hi for _, hi in ranges]
        if not ranges or any(lo != edge or hi <= lo for (lo, hi), edge
                             in zip(ranges, edges, strict=False)) or edges[-1] != self.heads[1]:
            raise ValueError(f"parts {ranges} do not tile this receiver's KV heads "
                             f"[{self.heads[0]}, {self.heads[1]}) (see reshard.parts_for)")
        return ranges

    def in_place(self, h: TransferHeader) -> bool:
        """Whether a payload's messages go straight into the blocks (not staged): whole
        blocks, or head slices of a head-major cache."""
        return h.sliced or not h.staged and h.heads == self.heads

    def abort(self, request_id: str) -> bool:
        """Forget the request; returns once nothing writes into its blocks any more."""
        with self._lock:
            entry = self._expected.pop(request_id, None)
            if entry is not None:
                self._released.wait_for(lambda: entry.claimed == 0)
            return entry is not None

    def begin(self, header: TransferHeader, peer: str) -> Expected | None:
        """The entry a payload is for, or None if it must be discarded (unknown, aborted or
        not matching the reservation; a mismatch fails the request)."""
        with self._lock:
            entry = self._expected.get(header.request_id)
        if entry is None:
            return None
        problem = self._mismatch(header, entry)
        if problem:
            self.fail(entry, LayoutMismatch(header.request_id, peer, problem))
            return None
        return entry

    def refuse(self, header: TransferHeader, peer: str) -> None:
        """The sender refused to send a request (a REFUSE header: see ``header``): fail it
        now with what differs between the two caches."""
        with self._lock:
            entry = self._expected.get(header.request_id)
        if entry is None:
            return
        problem = self._mismatch(header, entry) or (
            "the sender refused to send it: its KV cache does not match this receiver's "
            "(see the sender's log)")
        self.fail(entry, LayoutMismatch(header.request_id, peer, problem))

    def write(self, entry: Expected, h: TransferHeader, buffer: torch.Tensor) -> bool:
        """Scatter the payload ``buffer`` ``[n, l1 - l0, 2, bs, heads, D]`` of header ``h``
        into the entry's blocks (their head slice), unless it was aborted or failed
        meanwhile; True if written."""
        lo = self.heads[0]
        with self._lock:
            if self._expected.get(entry.request_id) is not entry:
                return False
            blocks.scatter(self.kv_cache, entry.dst_index, buffer,
                           slice(h.layer_start, h.layer_end),
                           slice(h.head_start - lo, h.heads[1] - lo))
            return True

    def claim(self, entry: Expected, spans: list[tuple[int, int]],
              h: TransferHeader) -> list[torch.Tensor | StagedTarget] | None:
        """For each ``(first, count)`` span of the entry's blocks, where the message lands:
        in place (contiguous in the cache: checked by ``begin``), layers ``[l0, l1)`` as one
        flat ``uint8`` view to receive into; staged, a ``StagedTarget`` to copy the staged
        message into. None if the entry was aborted or failed (receive into a discard
        buffer). Every claimed block must be ``release``d once the receive into it (or the
        copy from staging) is over (or broken)."""
        with self._lock:
            if self._expected.get(entry.request_id) is not entry:
                return None
            entry.claimed += sum(count for _, count in spans)
        ids = entry.dst_ids
        if not self.in_place(h):
            return [StagedTarget(self, ids[first : first + count], h) for first, count in spans]
        layers, views, lo = (h.layer_start, h.layer_end), self._views, self.heads[0]
        heads = (h.head_start - lo, h.heads[1] - lo) if h.sliced else None
        return [views(ids[first], layers, count, heads) for first, count in spans]

    def claimed_blocks(self, request_id: str) -> int:
        """Blocks of an expected request that receives are writing into (0 if unknown)."""
        with self._lock:
            entry = self._expected.get(request_id)
            return entry.claimed if entry is not None else 0

    def release(self, entry: Expected, count: int = 1) -> None:
        """``count`` claimed blocks are no longer being written."""
        with self._lock:
            entry.claimed -= count
            if entry.claimed == 0:
                self._released.notify_all()

    def finish(self, entry: Expected, h: TransferHeader) -> None:
        """Mark the layers of ``h``'s part received; report success once every layer of
        every part is in."""
        with self._lock:
            if self._expected.get(entry.request_id) is not entry:
                return
            entry.parts[h.heads].difference_update(range(h.layer_start, h.layer_end))
            if any(entry.parts.values()):
                return
            del self._expected[entry.request_id]
        self._report(entry, None)

    def fail(self, entry: Expected, error: TransferError) -> None:
        """Fail the entry (if still expected) and report the error."""
        with self._lock:
            if self._expected.get(entry.request_id) is not entry:
                return
            del self._expected[entry.request_id]
        self._report(entry, error)

    def fail_id(self, request_id: str, error: TransferError) -> bool:
        """Fail a request by id (if still expected); True if it was."""
        with self._lock:
            entry = self._expected.pop(request_id, None)
        if entry is not None:
            self._report(entry, error)
        return entry is not None

    def close(self, error: TransferError) -> None:
        """Fail every expected request with ``error`` (re-addressed) and refuse new ones."""
        with self._lock:
            self._closed_error = error
            entries, self._expected = list(self._expected.values()), {}
        for entry in entries:
            self._report(entry, error.for_request(entry.request_id))

    def poll(self) -> list[tuple[str, TransferError | None]]:
        with self._lock:
            out, self._completions = list(self._completions), deque()
        return out

    def deliver(self, header: TransferHeader, buffer: torch.Tensor, peer: str) -> bool:
        """Whole-payload delivery (loopback, ray): begin, write, finish. True if written."""
        if header.kind == REFUSE:
            self.refuse(header, peer)
            return False
        entry = self.begin(header, peer)
        if entry is None:
            return False
        payload = buffer.view(header.dtype).view(header.payload_shape())
        written = self.write(entry, header, payload)
        if written:
            self.finish(entry, header)
        return written

    def _mismatch(self, header: TransferHeader, entry: Expected) -> str:
        kv = self.kv_cache
        if header.dtype != kv.dtype:
            return (f"payload dtype {str(header.dtype).removeprefix('torch.')} != receiver "
                    f"cache dtype {str(kv.dtype).removeprefix('torch.')}: prefill and decode "
                    "pools must use the same kv_cache_dtype")
        if header.kv_scales != self.kv_scales:
            return (f"payload kv scales (k, v) {header.kv_scales} != receiver's "
                    f"{self.kv_scales}: prefill and decode pools must use the same k_scale "
                    "and v_scale")
        bs, _, hd = header.block_shape
        if (bs, hd) != (kv.shape[3], kv.shape[5]):
            cache = tuple(kv.shape[3:])
            return f"payload blocks {header.block_shape} do not fit cache blocks {cache}"
        if header.num_blocks != entry.dst_index.numel():
            return f"{header.num_blocks} blocks sent, {entry.dst_index.numel()} reserved"
        if header.heads not in entry.parts:
            lo, hi = header.heads
            return (f"payload KV heads [{lo}, {hi}) are not a part this receiver expects "
                    f"(parts {sorted(entry.parts)} of its heads [{self.heads[0]}, "
                    f"{self.heads[1]})); send the head ranges kv_transfer.reshard.plan_routes "
                    "gives, and expect its parts_for")
        if not 0 <= header.layer_start < header.layer_end <= kv.shape[1]:
            return f"layers [{header.layer_start}, {header.layer_end}) outside [0, {kv.shape[1]})"
        if header.runs and self.in_place(header):
            if header.num_layers != kv.shape[1]:
                return "runs of several blocks with a layer range"
            ids = entry.dst_ids
            for first, count in header.messages():
                if any(ids[i + 1] != ids[i] + 1 for i in range(first, first + count - 1)):
                    return f"a run of {count} blocks is not contiguous in the reserved blocks"
        return ""

    def _report(self, entry: Expected, error: TransferError | None) -> None:
        if entry.on_done is not None:
            try:
                entry.on_done(entry.request_id, error)
            except Exception:  # the caller's bug: it must not end a channel other requests use
                log.exception("kv_transfer: on_done of request %s raised", entry.request_id)
            return
        with self._lock:
            self._completions.append((entry.request_id, error))


class TableReceiver(KVReceiver):
    """A receiver whose bookkeeping is an ``ExpectTable`` (``self.table``): expect, abort and
    poll are the table's; backends add ``endpoint``, ``close`` and the receiving itself."""

    table: ExpectTable

    def expect(
        self, request_id: str, dst_block_ids: Sequence[int], on_done: OnDone | None = None,
        parts: Sequence[HeadRange] | None = None,
    ) -> None:
        self.table.add(request_id, dst_block_ids, on_done, parts)

    def abort(self, request_id: str) -> bool:
        return self.table.abort(request_id)

    def poll(self) -> list[tuple[str, TransferError | None]]:
        return self.table.poll()
