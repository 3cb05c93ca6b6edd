"""The torch.distributed backend: one stateless two-rank process group per (sender, receiver).

The only module of splitserve that touches torch.distributed (and NCCL). torch.distributed
cannot add ranks to a running world and pools grow and shrink, so no global
``init_process_group`` is used: every pair builds its own group from the receiver's TCPStore.

Handshake (keys in the receiver's TCPStore; the receiver hosts it on a free port and
advertises ``host:port`` in its ``Endpoint``)::

    sender                                   receiver (accept thread, in pair order)
    n = add("kv/pairs", 1)
    set("kv/pair/<n>", {sender, wire})  ──▶  wait(["kv/pair/<n>"]) → start channel thread n
    wait(["kv/pair/<n>/ack"])           ◀──  set("kv/pair/<n>/ack")
    group(PrefixStore("kv/pair/<n>/"), rank 0)  group(PrefixStore("kv/pair/<n>/"), rank 1)

Groups: ``ctrl`` is always gloo (headers: a CPU wait, no GPU kernel spinning while a channel
is idle); ``data`` carries payloads and is the same gloo group, or an NCCL group when both
caches are CUDA tensors. The receiver closes its store by writing a close marker as the next
pair, which ends its accept thread without polling.

Timeouts: every header/payload wait after the first header byte is bounded by
``config.timeout_s``; an idle receiver waits for the next header up to the group's default
timeout (``idle_timeout_s + timeout_s``), longer than a sender keeps an idle channel open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from kv_transfer import blocks
from kv_transfer.base import (
    Endpoint,
    KVSender,
    TransferConfig,
    TransferHandle,
    cache_layout,
    fail_fast,
    send_header,
)
from kv_transfer.channels import ChannelLRU, ReceiverChannel, SenderChannel, SendJob
from kv_transfer.errors import (
    PeerClosed,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from kv_transfer.header import (
    ANNOUNCE,
    DATA,
    DATA_TAG,
    MAX_RUN_BLOCKS,
    MAX_RUN_BYTES,
    RETRACT,
    TransferHeader,
    max_runs,
)
from kv_transfer.receiving import ExpectTable, TableReceiver

log = logging.getLogger(__name__)

_PAIRS = "kv/pairs"  # counter: number of pair channels ever announced to this store
CTRL_TAG = 0  # headers; payload messages use header.DATA_TAG or an announcement's tag


def _pair_key(n: int) -> str:
    return f"kv/pair/{n}"


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def tcp_store(host: str, port: int, is_master: bool, timeout_s: float) -> Any:
    """A TCPStore server (``is_master``; port 0 = any free port) or client.

    The server listens on ``host`` only: c10d's own server binds every interface (``::``),
    so it is handed a socket bound here instead (the store owns and closes it).

    Keep ``timeout_s`` well above 5 s: c10d's sockets reverse-resolve peer addresses
    (``::ffff:127.0.0.1`` too), and where DNS drops a query that lookup stalls 5 s (seen on
    the development VMs, about once in 50 lookups)."""
    if not is_master:
        return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                             timeout=_td(timeout_s))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, port))
        listener.listen(128)
        port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=_td(timeout_s), master_listen_fd=listener.detach())


def bind_host(host: str) -> str:
    """The configured address, or if "" this Ray node's IP inside a Ray worker (so nothing
    listens on other interfaces), else "" (gloo: its default device)."""
    if host:
        return host
    ray = sys.modules.get("ray")  # imported by a Ray worker; never imported here for this
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return ""


def resolve_host(host: str) -> str:
    """The address to bind and advertise: ``bind_host``, or this machine's resolved name."""
    return bind_host(host) or socket.gethostbyname(socket.gethostname())


def choose_wire(config: TransferConfig, kv_cache: torch.Tensor, peer: Endpoint) -> str:
    """ "nccl" when configured or (auto) when both caches are CUDA and NCCL exists, else gloo."""
    if config.wire != "auto":
        return config.wire
    both_cuda = kv_cache.is_cuda and peer.device == "cuda"
    return "nccl" if both_cuda and dist.is_nccl_available() else "gloo"


class PairGroup:
    """Two ranks, one pair: rank 0 (sender) sends, rank 1 (receiver) receives."""

    def __init__(self, ctrl: Any, data: Any, data_device: torch.device, peer: str) -> None:
        self.ctrl = ctrl  # gloo group for headers
        self.data = data  # gloo (== ctrl) or NCCL group for payloads
        self.data_device = data_device  # where payload buffers must live: cpu or cuda:i
        self.peer = peer  # the other side, for error messages
        self.rank = ctrl.rank()

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        config: TransferConfig,
        sender_name: str,
        wire: str,
        cache_device: torch.device,
    ) -> PairGroup:
        """Sender side: announce a new pair to ``endpoint``'s store and join it as rank 0.

        The sender waits with explicit timeouts only, so its group's default timeout just
        bounds the rendezvous: ``connect_timeout_s``."""
        peer = endpoint.describe()
        try:
            store = tcp_store(endpoint.host, endpoint.port, False, config.connect_timeout_s)
            n = store.add(_PAIRS, 1)
            store.set(_pair_key(n), json.dumps({"sender": sender_name, "wire": wire}))
            store.wait([_pair_key(n) + "/ack"], _td(config.connect_timeout_s))
        except RuntimeError as e:
            raise PeerClosed(None, peer, f"cannot connect (store handshake): {e}") from e
        prefix = dist.PrefixStore(_pair_key(n) + "/", store)
        return cls._join(prefix, 0, wire, bind_host(config.host), config.connect_timeout_s,
                         cache_device, peer)

    @classmethod
    def accept(
        cls, server: StoreServer, n: int, wire: str, cache_device: torch.device, peer: str
    ) -> PairGroup:
        """Receiver side: join announced pair ``n`` as rank 1 (its sender is waiting).

        Gloo's default timeout is the receiver's idle wait for the next header (a timed-out
        gloo wait breaks the pair), so it outlasts the sender's idle close."""
        config = server.config
        prefix = dist.PrefixStore(_pair_key(n) + "/", server.client())
        idle_s = config.idle_timeout_s + config.timeout_s
        return cls._join(prefix, 1, wire, bind_host(config.host), idle_s, cache_device, peer)

    @classmethod
    def _join(
        cls,
        store: Any,
        rank: int,
        wire: str,
        host: str,
        timeout_s: float,
        cache_device: torch.device,
        peer: str,
    ) -> PairGroup:
        try:
            opts = dist.ProcessGroupGloo._Options()
            gloo = dist.ProcessGroupGloo
            opts._devices = [
                gloo.create_device(hostname=host) if host else gloo.create_default_device()
            ]
            opts._timeout = _td(timeout_s)
            ctrl = gloo(dist.PrefixStore("ctrl/", store), rank, 2, opts)
            if wire == "gloo":
                return cls(ctrl, ctrl, torch.device("cpu"), peer)
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = _td(timeout_s)
            data = dist.ProcessGroupNCCL(dist.PrefixStore("data/", store), rank, 2, nccl_opts)
            return cls(ctrl, data, cache_device, peer)
        except RuntimeError as e:
            raise PeerClosed(None, peer, f"cannot create the {wire} pair group: {e}") from e

    def send_ctrl(self, tensor: torch.Tensor) -> Any:
        return self._post(self.ctrl.send, tensor, CTRL_TAG)

    def recv_ctrl(self, tensor: torch.Tensor) -> Any:
        return self._post(self.ctrl.recv, tensor, CTRL_TAG)

    def send(self, tensor: torch.Tensor, tag: int) -> Any:
        return self._post(self.data.send, tensor, tag)

    def recv(self, tensor: torch.Tensor, tag: int) -> Any:
        return self._post(self.data.recv, tensor, tag)

    def _post(self, op: Callable[..., Any], tensor: torch.Tensor, tag: int) -> Any:
        try:
            return op([tensor], 1 - self.rank, tag)
        except RuntimeError as e:  # gloo fails at post time once the pair is broken
            raise _classify(e, None, self.peer, "posting a message") from e

    def wait(self, work: Any, timeout_s: float | None, what: str) -> None:
        """Wait for ``work``; ``None`` = the group's default (idle) timeout. Raises
        ``TransferTimeout`` or ``PeerClosed`` (request id None: the caller re-addresses)."""
        if timeout_s is not None and timeout_s <= 0:
            raise TransferTimeout(None, self.peer, f"timed out while waiting for {what}")
        try:
            if timeout_s is None:
                work.wait()
            else:
                work.wait(_td(timeout_s))
        except RuntimeError as e:
            raise _classify(e, timeout_s, self.peer, f"waiting for {what}") from e

    def close(self) -> None:
        """Drop the groups: their sockets close, so a peer blocked on them fails at once."""
        if self.data is not self.ctrl:
            self.data.shutdown()
        self.ctrl = self.data = None


def _classify(e: RuntimeError, timeout_s: float | None, peer: str, doing: str) -> TransferError:
    """A c10d/gloo/NCCL error as a ``TransferError`` (request id None) saying what failed."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        limit = f" after {timeout_s:.1f} s" if timeout_s is not None else ""
        return TransferTimeout(None, peer, f"timed out{limit} {doing}")
    return PeerClosed(None, peer, f"peer closed or died while {doing} ({text})")


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


class TorchDistSender(KVSender):
    """Pushes KV over pair channels, opened lazily per peer and closed LRU-first over the cap."""

    def __init__(self, config: TransferConfig, kv_cache: torch.Tensor, name: str = "prefill"):
        self.config, self.kv_cache, self.name = config, kv_cache, name
        self._lock = threading.Lock()
        self._lru = ChannelLRU(config.max_channels, self._new_channel)
        self._queued: dict[str, list[SendJob]] = {}  # request id -> unfinished sends
        # request id -> its unsettled announcement (see _Announced)
        self._announced: dict[str, _Announced] = {}
        self._closed = False
        self._block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self._deferred = threading.local()  # .jobs: this thread's posts held back, or None

    def announce(self, request_id: str, peer: Endpoint, src_block_ids: Sequence[int],
                 dst_block_ids: Sequence[int]) -> bool:
        """Tell ``peer`` now how this request's KV will come (its runs, a tag of its own),
        so that it posts the receives before the KV is computed. Settled by the request's
        ``send`` or ``abort``. False (nothing announced) where it cannot help: an NCCL wire
        (ordered, no tags), a cache that is not on the gloo wire's device (its messages go
        through a few host staging slots, each reused only once the receiver has taken it,
        while an announced payload's header trails its messages: a receiver that did not
        post its receives would never be told to), bad ids or a layout mismatch (``send``
        reports those)."""
        if choose_wire(self.config, self.kv_cache, peer) != "gloo" or self.kv_cache.is_cuda:
            return False
        try:
            src_ids = blocks.check_id_list(self.kv_cache, src_block_ids)
            dst_ids = [int(i) for i in dst_block_ids]
            if len(dst_ids) != len(src_ids):
                return False
            runs = self._runs(request_id, src_ids, None, dst_ids)
            header = send_header(request_id, self.kv_cache, peer, len(src_ids), None, runs)
        except (TransferError, ValueError):
            return False
        with self._lock:
            if self._closed or request_id in self._announced:
                return False
            channel = self._lru.get(peer)
            header = dataclasses.replace(header, kind=ANNOUNCE, tag=channel.new_tag())
            job = SendJob(header, src_ids, TransferHandle(request_id))
            if not channel.submit(job):
                channel.settle()
                return False
            data = dataclasses.replace(header, kind=DATA)  # made now: send() stays short
            self._announced[request_id] = _Announced(job, dst_ids, data, data.encode())
        job.handle.add_done_callback(_log_control_failure)
        return True

    def send(
        self,
        request_id: str,
        peer: Endpoint,
        src_block_ids: Sequence[int],
        layers: tuple[int, int] | None = None,
        dst_block_ids: Sequence[int] | None = None,
    ) -> TransferHandle:
        handle = TransferHandle(request_id)
        src_ids = blocks.check_id_list(self.kv_cache, src_block_ids)
        with self._lock:
            ann = self._announced.pop(request_id, None)
        announced_on = ann.job.channel if ann is not None else None
        header, encoded = None, None
        if ann is not None:  # as announced (same blocks and peer), else retracted
            if self._matches(ann, peer, src_ids, layers, dst_block_ids):
                header, encoded = ann.data, ann.encoded
            else:
                self._retract(announced_on, ann.job.header)
        if header is None:
            runs = self._runs(request_id, src_ids, layers, dst_block_ids)
            try:
                header = send_header(request_id, self.kv_cache, peer, len(src_ids), layers, runs)
            except TransferError as error:
                return fail_fast(handle, error)
        job = SendJob(header, src_ids, handle, encoded=encoded, peer=peer)
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
                    job.encoded = None
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
            ann = self._announced.pop(request_id, None)
        error = TransferAborted(request_id, "-", "aborted by the sender before it was sent")
        dropped = [job for job in jobs if job.drop(error)]  # a send on the wire completes first
        for job in dropped:
            if job.header.tag != DATA_TAG:  # an announced payload that never went out
                self._retract(job.channel, job.header)
        if ann is not None:
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
            for job in jobs:
                job.channel.post_submitted(job)

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

    @staticmethod
    def _matches(ann: _Announced, peer: Endpoint, src_ids: list[int],
                 layers: tuple[int, int] | None, dst_block_ids: Sequence[int] | None) -> bool:
        """Whether a send is the one announced: same peer, blocks and (all) layers."""
        h, channel = ann.data, ann.job.channel
        return (
            channel is not None
            and channel.peer == peer.describe()
            and (layers is None or tuple(layers) == (h.layer_start, h.layer_end))
            and src_ids == ann.job.src_ids
            and dst_block_ids is not None
            and [int(i) for i in dst_block_ids] == ann.dst_ids
        )

    def _plain(self, header: TransferHeader, src_ids: list[int],
               dst_block_ids: Sequence[int] | None) -> TransferHeader:
        """An announced DATA header made unannounced (for a channel that never saw it)."""
        runs = self._runs(header.request_id, src_ids, None, dst_block_ids)
        return dataclasses.replace(header, runs=tuple(runs), tag=DATA_TAG)

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

    def _runs(self, request_id: str, src_ids: list[int], layers: tuple[int, int] | None,
              dst_block_ids: Sequence[int] | None) -> tuple[int, ...]:
        """Blocks per message: spans contiguous in both caches go as one message (fewer
        messages: each costs a gloo round of notices and ~100 us of CPU on a small host, or
        an NCCL kernel); () = one message per block (no hint, a layer range, nothing to
        merge, or more runs than a header holds)."""
        num_layers = self.kv_cache.shape[1]
        if dst_block_ids is None or len(dst_block_ids) != len(src_ids):
            return ()
        if layers is not None and tuple(layers) != (0, num_layers):
            return ()  # a layer range of adjacent blocks is not one contiguous span
        dst_ids = [int(i) for i in dst_block_ids]
        longest = max(1, min(MAX_RUN_BLOCKS, MAX_RUN_BYTES // self._block_bytes))
        runs = blocks.contiguous_runs(src_ids, dst_ids, longest)
        if len(runs) == len(src_ids) or len(runs) > max_runs(request_id):
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
            resend=self._resend,
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


@dataclasses.dataclass
class _Announced:
    """An announcement not settled yet: its ANNOUNCE job (channel, tag, runs, source ids),
    the reserved ids, and its DATA header made ahead (with its bytes)."""

    job: SendJob
    dst_ids: list[int]
    data: TransferHeader
    encoded: torch.Tensor


def _log_control_failure(handle: TransferHandle) -> None:
    if handle.error is not None:  # its channel failed: the receiver dropped the receives
        log.info("kv_transfer: announcement of %s: %s", handle.request_id, handle.error)


class TorchDistReceiver(TableReceiver):
    """Hosts a TCPStore that senders connect to; one receive thread per pair channel."""

    def __init__(self, config: TransferConfig, kv_cache: torch.Tensor, name: str = "decode"):
        self.config, self.kv_cache, self.name = config, kv_cache, name
        self.table = ExpectTable(kv_cache)
        self._layout, self._dtype = cache_layout(kv_cache)
        self._lock = threading.Lock()
        self._channels: list[ReceiverChannel] = []
        self._server = StoreServer(config, self._on_pair)

    def endpoint(self) -> Endpoint:
        return Endpoint(
            "torch_dist",
            self.name,
            self._layout,
            self._dtype,
            device=self.kv_cache.device.type,
            host=self._server.host,
            port=self._server.port,
        )

    def close(self) -> None:
        """Stop accepting and fail what is expected. Open channels end when their sender
        closes them or dies (a receive cannot be interrupted locally); their payloads are
        drained and discarded until then."""
        self._server.close()
        self.table.close(PeerClosed(None, self.name, "receiver closed"))

    def open_peers(self) -> list[str]:
        """Senders with an open channel to this receiver."""
        with self._lock:
            return [c.peer for c in self._channels]

    def _on_pair(self, n: int, info: dict) -> None:
        peer = f"{info['sender']} (pair {n})"
        wire, device = info["wire"], self.kv_cache.device
        open_group = lambda: PairGroup.accept(self._server, n, wire, device, peer)
        with self._lock:
            self._channels.append(
                ReceiverChannel(peer, open_group, self.table, self.config, self._channel_exited)
            )

    def _channel_exited(self, channel: ReceiverChannel) -> None:
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)
