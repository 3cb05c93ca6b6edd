"""The wire of one pair: a two-rank process group built from the receiver's TCPStore
(the handshake is in the package docstring), and the errors of its operations."""

from __future__ import annotations

import datetime
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kv_transfer.base import Endpoint, TransferConfig
from kv_transfer.errors import PeerClosed, TransferError, TransferTimeout

if TYPE_CHECKING:  # annotations only (a runtime import would be circular)
    from kv_transfer.torch_dist.store import StoreServer

log = logging.getLogger(__name__)


_PAIRS = "kv/pairs"  # counter: number of pair channels ever announced to this store
CTRL_TAG = 0  # headers; payload messages use header.DATA_TAG or an announcement's tag
LINK_TAG = 2**31 - 1  # the link watch's one message (see PairGroup.watch_link)
_FOREVER = datetime.timedelta(days=365)  # a timed-out gloo wait closes the pair: never time out


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
        self._watch: threading.Thread | None = None  # the sender's link watch (watch_link)

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

    def watch_link(self, on_broken: Callable[[TransferError], None]) -> None:
        """Call ``on_broken`` (on a thread of its own) as soon as this pair's link breaks.

        gloo fails the receives and the unmatched sends of a pair whose socket breaks, but
        not a send whose bytes are being written: its wait lasts until its timeout (seen with
        torch 2.13: a send mid-write when its socket was shut down waited out all 10 s), and
        every send queued behind it on the channel waited too. So the sender keeps one
        receive posted on ``LINK_TAG``, which gloo fails within milliseconds of a break;
        nothing is sent to it until the receiver acknowledges a CLOSE (``ack_close``)."""
        try:
            work = self._post(self.ctrl.recv, torch.empty(1, dtype=torch.uint8), LINK_TAG)
        except TransferError as e:  # broken already
            on_broken(e)
            return

        def watch() -> None:
            try:
                work.wait(_FOREVER)
            except RuntimeError as e:
                on_broken(_classify(e, None, self.peer, "watching the link"))

        self._watch = threading.Thread(target=watch, name=f"kv-link {self.peer}", daemon=True)
        self._watch.start()

    def end_watch(self, timeout_s: float) -> bool:
        """Sender side, after its CLOSE was taken: wait for the receiver's acknowledgement to
        end the link watch (a process that exits with the watch still blocked in gloo dies
        in C++ teardown: "terminate called without an active exception"). True if it
        ended (or there was none)."""
        if self._watch is not None:
            self._watch.join(timeout_s)
        return self._watch is None or not self._watch.is_alive()

    def ack_close(self, timeout_s: float) -> None:
        """Receiver side, on the sender's CLOSE: end the sender's link watch."""
        done = self._post(self.ctrl.send, torch.ones(1, dtype=torch.uint8), LINK_TAG)
        self.wait(done, timeout_s, "the close acknowledgement to be taken")

    def close(self) -> None:
        """Drop the groups: their sockets close, so a peer blocked on them fails at once."""
        if self.data is not self.ctrl:
            self.data.shutdown()
        self.ctrl = self.data = None


# gloo's messages start with their source file and line, and some go on with advice
# ("... before reporting an error. GLHF!"): what happened is the first sentence after it.
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*:\d+\]\s*")


def _classify(e: RuntimeError, timeout_s: float | None, peer: str, doing: str) -> TransferError:
    """A c10d/gloo/NCCL error as a ``TransferError`` (request id None) saying what failed."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = _SOURCE_PREFIX.sub("", text).split(". ")[0]
    if "timed out" in text.lower() or "timeout" in text.lower():
        limit = f" after {timeout_s:.1f} s" if timeout_s is not None else ""
        return TransferTimeout(None, peer, f"timed out{limit} {doing}")
    return PeerClosed(None, peer, f"peer closed or died while {doing} ({text})")
