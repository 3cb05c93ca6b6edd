"""The transfer interface: a sender on the prefill side, a receiver on the decode side.

Push model. The decode worker reserves the request's blocks first and registers them with
``KVReceiver.expect``; then the prefill worker calls ``KVSender.send`` to push the request's
KV into them. The receiver never asks for anything, and "no free blocks" on the decode side
is backpressure handled before any transfer starts (outside this package).

Life of a transfer:
  decode: 1. reserve blocks  2. ``expect(rid, dst_blocks, on_done)``  3. ``on_done(rid, None)``
          (KV scattered into dst_blocks; the request may join the decode batch) or
          ``on_done(rid, TransferError)`` (free the blocks; the request fails or re-prefills)
  prefill: 0. optionally ``announce(rid, peer, src_blocks, dst_blocks)`` once the source
          blocks are known (the last prefill chunk is scheduled)
          1. ``handle = send(rid, peer, src_blocks)`` after the last prefill chunk (or
          ``abort(rid)``: an announcement must be settled by one of the two)
          2. when ``handle.done()`` (success or error) free the source blocks
  resharding (prefill TP=p, decode TP=d, see ``reshard``): each cache holds a range of the
          model's KV heads (``heads=`` of the sender/receiver; None = all). A decode rank
          expects ``parts=`` (one head range per prefill rank that sends to it); each prefill
          rank sends ``heads=`` its route's range. The request completes when every part
          (every layer of it) has arrived; an error on any part fails it once.
  abort: ``receiver.abort(rid)`` guarantees no later write into the request's dst blocks (a
          payload still on the wire is drained and discarded); ``sender.abort(rid)`` drops a
          transfer that has not started.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer import blocks
from kv_transfer.errors import LayoutMismatch, TransferError
from kv_transfer.header import REFUSE, STAGED, TransferHeader, check_request_id

OnDone = Callable[[str, TransferError | None], None]  # (request_id, error or None)
HeadRange = tuple[int, int]  # [first, last + 1) global KV head indices
KVScales = tuple[float, float]  # (k_scale, v_scale): an fp8 cache stores x / scale


@dataclass(frozen=True)
class TransferConfig:
    """How KV moves between workers; one per cluster, from the pool config."""

    backend: str = "torch_dist"  # registry name: "torch_dist", "ray" or "loopback"
    timeout_s: float = 30.0  # one request's header + payload must move within this
    connect_timeout_s: float = 30.0  # opening a pair channel (store handshake + rendezvous)
    idle_timeout_s: float = 600.0  # a sender closes a pair channel idle this long
    max_channels: int = 16  # LRU cap on a sender's open pair channels (idle ones are closed)
    # torch_dist: block receives posted ahead per channel (a payload is one message per
    # block). Deeper hides per-message hand-offs; an abort waits for at most this many
    # receives already writing into the request's blocks. Also the depth of host staging
    # slots where a cache is not on the wire's device.
    inflight_messages: int = 32
    # torch_dist over gloo: an announced payload up to this size goes on the wire from the
    # thread that calls send() (the prefill engine loop) when its channel is idle, saving the
    # hand-off to the channel thread; gloo writes it there until the socket would block.
    # 0: always hand off.
    inline_send_bytes: int = 64 << 20
    wire: str = (
        "auto"  # torch_dist: "auto" (nccl if both caches are CUDA, else gloo), "gloo", "nccl"
    )
    host: str = ""  # address this process advertises/binds; "" = resolve this host's name

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise ValueError("transfer timeouts must be positive")
        if self.max_channels < 1 or self.inflight_messages < 1:
            raise ValueError("need max_channels >= 1 and inflight_messages >= 1")
        if self.inline_send_bytes < 0:
            raise ValueError("inline_send_bytes must be >= 0")
        if self.wire not in ("auto", "gloo", "nccl"):
            raise ValueError(f"wire must be auto, gloo or nccl (got {self.wire!r})")


@dataclass(frozen=True)
class Endpoint:
    """What a sender needs to reach a receiver. Small and picklable: it travels through Ray."""

    backend: str  # backend of the receiver that made it
    name: str  # the receiving worker's name (error messages; loopback registry key)
    layout: tuple[int, ...]  # receiver's kv_cache shape without num_blocks: (L, 2, bs, kvh, D)
    dtype: str  # receiver's kv_cache dtype, e.g. "bfloat16"
    device: str = "cpu"  # "cpu" or "cuda": where the receiver's cache lives
    host: str = ""  # torch_dist: address of the receiver's TCPStore
    port: int = 0  # torch_dist: port of the receiver's TCPStore
    actor: Any = None  # ray: actor handle of the receiving worker
    method: str = ""  # ray: that actor's method that hands (rid, header, buffer) to the receiver
    heads: HeadRange | None = None  # the global KV heads the receiver's cache holds; None = all
    kv_scales: KVScales = (1.0, 1.0)  # the receiver's fp8 scales (must equal the sender's)
    heads_outer: bool = False  # the receiver's cache is head-major in memory (see blocks)

    def describe(self) -> str:
        where = f" ({self.host}:{self.port})" if self.port else ""
        return f"{self.name}{where}"

    def head_range(self) -> HeadRange:
        """The receiver's heads, global indices (``(0, num_kv_heads)`` if it holds all)."""
        return self.heads if self.heads is not None else (0, self.layout[3])


def cache_layout(kv_cache: torch.Tensor) -> tuple[tuple[int, ...], str]:
    """``(layout, dtype name)`` of a cache, as an ``Endpoint`` advertises them."""
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2 or not (
            kv_cache.is_contiguous() or blocks.heads_outer(kv_cache)):
        raise ValueError(
            "kv_cache must be a [num_blocks, num_layers, 2, block_size, num_kv_heads, "
            "head_dim], contiguous or head-major in memory (engine.kv_layout.new_kv_cache), "
            f"got {tuple(kv_cache.shape)} with strides {kv_cache.stride()}"
        )
    return tuple(kv_cache.shape[1:]), str(kv_cache.dtype).removeprefix("torch.")


def check_heads(kv_cache: torch.Tensor, heads: HeadRange | None) -> HeadRange:
    """The global head range a cache holds (``heads``, or all of its heads from 0);
    ``ValueError`` unless its width is the cache's ``num_kv_heads`` (constructors call it)."""
    num_kv_heads = kv_cache.shape[4]
    if heads is None:
        return 0, num_kv_heads
    lo, hi = (int(h) for h in heads)
    if not 0 <= lo < hi or hi - lo != num_kv_heads:
        raise ValueError(f"heads=[{lo}, {hi}) does not match a cache of {num_kv_heads} KV heads "
                         f"{tuple(kv_cache.shape)}")
    return lo, hi


def check_layout(request_id: str, kv_cache: torch.Tensor, peer: Endpoint,
                 own_heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0),
                 heads: HeadRange | None = None) -> HeadRange:
    """The global head range a send of ``kv_cache`` (holding ``own_heads``, None = all) to
    ``peer`` carries: ``heads``, or (None) all the heads both caches hold. Raises
    ``LayoutMismatch`` if the caches differ in dtype, fp8 scales or any dimension but the
    heads, or (when neither names a head range) in the heads too, or if the range is not
    held by both. This is the handshake: the receiver advertises its cache in its
    ``Endpoint``, and the sender refuses before anything goes on a channel."""
    layout, dtype = cache_layout(kv_cache)
    who, mine = peer.describe(), check_heads(kv_cache, own_heads)
    if dtype != peer.dtype:
        raise LayoutMismatch(request_id, who, (
            f"sender cache dtype {dtype} != receiver cache dtype {peer.dtype}: prefill and "
            "decode pools must use the same kv_cache_dtype"))
    if tuple(map(float, kv_scales)) != tuple(map(float, peer.kv_scales)):
        raise LayoutMismatch(request_id, who, (
            f"sender kv scales (k, v) {tuple(kv_scales)} != receiver's "
            f"{tuple(peer.kv_scales)}: prefill and decode pools must use the same k_scale "
            "and v_scale"))
    theirs = peer.head_range()
    same_model = layout[:3] + layout[4:] == tuple(peer.layout[:3]) + tuple(peer.layout[4:])
    if not same_model or own_heads is None and peer.heads is None and mine != theirs:
        raise LayoutMismatch(request_id, who, (
            f"sender cache {layout} {dtype} != receiver cache {tuple(peer.layout)} "
            f"{peer.dtype}"))
    if heads is None:
        heads = max(mine[0], theirs[0]), min(mine[1], theirs[1])
    lo, hi = heads
    if not (mine[0] <= lo < hi <= mine[1] and theirs[0] <= lo and hi <= theirs[1]):
        raise LayoutMismatch(request_id, who, (
            f"KV heads [{lo}, {hi}) are not held by both caches (sender holds "
            f"[{mine[0]}, {mine[1]}), receiver [{theirs[0]}, {theirs[1]})); send the head "
            "ranges kv_transfer.reshard.plan_routes gives"))
    return lo, hi


def send_header(request_id: str, kv_cache: torch.Tensor, peer: Endpoint, num_blocks: int,
                layers: tuple[int, int] | None, runs: tuple[int, ...] = (),
                own_heads: HeadRange | None = None, kv_scales: KVScales = (1.0, 1.0),
                heads: HeadRange | None = None) -> TransferHeader:
    """The DATA header of a send to ``peer``, every backend's first step; raises
    ``LayoutMismatch`` if the two caches disagree or the layer or head range is bad. The
    payload is STAGED (the receiver takes it through staging) unless its heads are all the
    receiver holds."""
    sent = check_layout(request_id, kv_cache, peer, own_heads, kv_scales, heads)
    return TransferHeader.for_blocks(
        request_id, kv_cache, num_blocks, layers, peer.describe(), runs, sent, kv_scales,
        0 if sent == peer.head_range() else STAGED)


def refusal(request_id: str, kv_cache: torch.Tensor, peer: Endpoint, num_blocks: int,
            layers: tuple[int, int] | None, own_heads: HeadRange | None,
            kv_scales: KVScales, heads: HeadRange | None) -> TransferHeader | None:
    """The REFUSE header of a send that ``send_header`` refused: the sender's side of it, so
    that the receiver fails the request at once naming what differs. None if the request id
    does not fit a header."""
    try:
        check_request_id(request_id, peer.describe())
    except TransferError:
        return None
    mine, num_layers = check_heads(kv_cache, own_heads), kv_cache.shape[1]
    h0, h1 = heads if heads is not None and 0 <= heads[0] < heads[1] < 2**16 else mine
    l0, l1 = layers if layers is not None and 0 <= layers[0] < layers[1] < 2**16 \
        else (0, num_layers)
    return TransferHeader(REFUSE, request_id, num_blocks, l0, l1, kv_cache.dtype,
                          (kv_cache.shape[3], h1 - h0, kv_cache.shape[5]), head_start=h0,
                          kv_scales=(float(kv_scales[0]), float(kv_scales[1])))


@dataclass(frozen=True)
class TransferStats:
    """What a finished send moved."""

    nbytes: int  # payload bytes (header excluded)
    seconds: float  # from the start of the send on the wire to its last byte acknowledged


class TransferHandle:
    """The sender's view of one send: returned at once, completed from a transfer thread."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.submitted_at = time.monotonic()
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._stats: TransferStats | None = None
        self._error: TransferError | None = None
        self._callbacks: list[Callable[[TransferHandle], None]] = []

    def done(self) -> bool:
        """True once the send succeeded or failed (the source blocks may then be freed).
        Success means the payload reached the receiver, which may have discarded it (the
        request was aborted there)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` seconds; returns ``done()``."""
        return self._event.wait(timeout)

    @property
    def error(self) -> TransferError | None:
        """The failure, or None (success, or not done yet)."""
        return self._error

    def result(self, timeout: float | None = None) -> TransferStats:
        """Wait, then return the stats or raise the ``TransferError``."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.request_id}: send not done after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    def add_done_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        """Call ``fn(handle)`` when done (at once if already done), from the finishing thread."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, stats: TransferStats | None, error: TransferError | None) -> bool:
        """Complete once (later calls are ignored and return False)."""
        with self._lock:
            if self._event.is_set():
                return False
            self._stats, self._error = stats, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
        return True

    def succeed(self, stats: TransferStats) -> bool:
        return self._finish(stats, None)

    def fail(self, error: TransferError) -> bool:
        return self._finish(None, error)


class KVSender(ABC):
    """Prefill side: pushes a request's blocks to a receiver."""

    @abstractmethod
    def send(
        self,
        request_id: str,
        peer: Endpoint,
        src_block_ids: Sequence[int],
        layers: tuple[int, int] | None = None,
        dst_block_ids: Sequence[int] | None = None,
        heads: HeadRange | None = None,
    ) -> TransferHandle:
        """Start pushing blocks ``src_block_ids`` (layers ``[start, end)``, default all) to
        ``peer``; returns without waiting for the receiver (a backend may write some or all
        of the payload in the calling thread first: see ``deferred_writes``). Sends to one
        peer go out in call order. The source blocks must stay untouched until the handle
        is done. Several sends of disjoint layer ranges may carry one request (layer-by-layer
        overlap with compute); the receiver completes the request when every layer has
        arrived.

        ``dst_block_ids``, the blocks the receiver reserved (when the caller knows them, as
        the prefill worker does), is a hint: a backend may then move spans contiguous in
        both caches as one message (torch_dist does). The receiver's ``expect`` still
        decides where the KV lands.

        ``heads``: the global KV heads to send (a resharding route), which both caches must
        hold; None = every head both hold (all of them when neither names a range)."""

    def announce(self, request_id: str, peer: Endpoint, src_block_ids: Sequence[int],
                 dst_block_ids: Sequence[int], heads: HeadRange | None = None) -> bool:
        """Optional, before ``send``: tell ``peer`` now that blocks ``src_block_ids`` will
        go to its ``dst_block_ids``, so that it can prepare (torch_dist posts the receives
        into the reserved blocks) while the KV is being computed. Every announcement must
        be settled by the request's ``send`` (same blocks and heads) or ``abort``. True if
        announced; the default announces nothing."""
        return False

    def deferred_writes(self) -> contextlib.AbstractContextManager[None]:
        """Within this context, this thread's ``send`` calls only queue; payload writes a
        backend makes in the calling thread (torch_dist: announced payloads) happen when
        it exits. For a caller with quick work to finish for every send first (the prefill
        worker answers all of a step's first tokens). Default: nothing to defer."""
        return contextlib.nullcontext()

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Drop the request's sends that have not started (their handles fail with
        ``TransferAborted``) and withdraw its announcement; True if a send was dropped. A
        send already on the wire finishes."""

    @abstractmethod
    def close(self) -> None:
        """Finish nothing new: fail queued sends, close every channel. Idempotent."""


class KVReceiver(ABC):
    """Decode side: receives pushed blocks into preallocated block ids."""

    @abstractmethod
    def endpoint(self) -> Endpoint:
        """How senders reach this receiver (give it to the router / prefill worker)."""

    @abstractmethod
    def expect(
        self, request_id: str, dst_block_ids: Sequence[int], on_done: OnDone | None = None,
        parts: Sequence[HeadRange] | None = None,
    ) -> None:
        """Register reserved blocks for a request before its sender sends. ``on_done(rid,
        error)`` runs once, on a transfer thread (keep it short: enqueue); without it the
        outcome is returned by ``poll``. ``parts``: the head ranges that will arrive, one
        payload (per layer range) each, tiling this receiver's heads (``reshard.parts_for``);
        None = one part, all of them."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Forget the request. After this returns nothing more is written into its blocks and
        no completion is reported for it; a payload arriving later is drained and discarded.
        True if the request was still expected."""

    @abstractmethod
    def poll(self) -> list[tuple[str, TransferError | None]]:
        """Completions of requests registered without ``on_done``, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving; requests still expected fail with ``PeerClosed``. Idempotent."""


def fail_fast(handle: TransferHandle, error: TransferError) -> TransferHandle:
    """Fail ``handle`` at once and return it (for checks done inside ``send``)."""
    handle.fail(error)
    return handle
