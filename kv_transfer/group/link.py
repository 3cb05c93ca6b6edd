"""Rank 0 <-> rank k command links of a tensor-parallel worker's KV transfer.

Each rank of a TP worker moves its own KV shard with a sender or receiver of its own (see
``agent``); rank 0, which runs the worker's engine loop and talks to the cluster, drives
them. ``RankLinks`` is rank 0's end: a ``multiprocessing.connection`` listener on loopback
(the ranks of a worker share a node: local processes, or Ray actors packed by a STRICT_PACK
placement group) that each rank's agent connects to once, then::

    rank 0 -> k   ("call", seq, op, args)   a command answered by ("reply", seq, result, err)
                  ("post", 0, op, args)     a command with no answer (in order with calls)
    k -> rank 0   ("event", kind, request_id, error, nbytes)   a send or receive finished

A reader thread per rank delivers events to ``on_event`` and answers to waiting calls; a
link that breaks (the rank died) fails its waiting calls and is reported once through
``on_broken``, so no request waits on a dead rank. Errors cross as (class name, request id,
peer, what) and are rebuilt as the same ``TransferError`` subclass.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from kv_transfer import errors
from kv_transfer.errors import PeerClosed, TransferError

log = logging.getLogger(__name__)

LINK_HOST = "127.0.0.1"  # a worker's ranks share a node


def pack_error(error: TransferError | None) -> tuple | None:
    if error is None:
        return None
    return type(error).__name__, error.request_id, error.peer, error.what


def unpack_error(packed: tuple | None) -> TransferError | None:
    if packed is None:
        return None
    name, request_id, peer, what = packed
    cls = getattr(errors, name, TransferError)
    if not (isinstance(cls, type) and issubclass(cls, TransferError)):
        cls = TransferError
    return cls(request_id, peer, what)


class LinkBroken(PeerClosed):
    """A rank's agent is gone (its process died or closed the link)."""


class RankLinks:
    """Rank 0's links to ranks 1..size-1 (see the module docstring)."""

    def __init__(self, size: int, name: str,
                 on_event: Callable[[int, str, str, TransferError | None, int], None],
                 on_broken: Callable[[int], None]) -> None:
        self.size, self.name = size, name
        self.authkey = os.urandom(16)
        self._listener = Listener((LINK_HOST, 0), authkey=self.authkey)
        self.address = self._listener.address
        self._on_event, self._on_broken = on_event, on_broken
        self._conns: dict[int, Connection] = {}
        self._send_locks: dict[int, threading.Lock] = {}
        self._waiting: dict[int, Future] = {}
        self._waiting_rank: dict[int, int] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._closed = False

    def accept(self, timeout_s: float) -> None:
        """Wait until every rank's agent has connected (they start after ``call_ranks``);
        TimeoutError naming the missing ranks after ``timeout_s``."""
        done = threading.Event()
        failure: list[BaseException] = []

        def accept_all() -> None:
            try:
                while len(self._conns) < self.size - 1:
                    conn = self._listener.accept()
                    rank = conn.recv()
                    self._conns[rank] = conn
                    self._send_locks[rank] = threading.Lock()
            except BaseException as e:  # the listener closed (timeout below) or a bad peer
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=accept_all, name=f"{self.name} links", daemon=True).start()
        if not done.wait(timeout_s) or failure:
            missing = sorted(set(range(1, self.size)) - set(self._conns))
            self.close()
            raise TimeoutError(f"{self.name}: the KV-transfer agents of tensor-parallel "
                               f"ranks {missing} did not start within {timeout_s:.0f} s "
                               "(their log says why)")
        self._listener.close()
        for rank, conn in self._conns.items():
            threading.Thread(target=self._read, args=(rank, conn), daemon=True,
                             name=f"{self.name} link {rank}").start()

    # -- commands ---------------------------------------------------------------------------
    def post(self, rank: int, op: str, *args: Any) -> None:
        """Send a command with no answer; LinkBroken if the rank is gone."""
        self._send(rank, ("post", 0, op, args))

    def call(self, rank: int, op: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Send a command and wait for its answer (raises what the rank raised)."""
        seq, future = next(self._seq), Future()
        with self._lock:
            self._waiting[seq], self._waiting_rank[seq] = future, rank
        try:
            self._send(rank, ("call", seq, op, args))
            return future.result(timeout_s)
        finally:
            with self._lock:
                self._waiting.pop(seq, None)
                self._waiting_rank.pop(seq, None)

    def _send(self, rank: int, message: tuple) -> None:
        conn = self._conns.get(rank)
        if conn is None or self._closed:
            raise LinkBroken(None, f"{self.name} rank {rank}", "the rank's link is closed")
        try:
            with self._send_locks[rank]:
                conn.send(message)
        except (OSError, EOFError, ValueError) as e:
            raise LinkBroken(None, f"{self.name} rank {rank}",
                             f"the rank is gone ({type(e).__name__})") from e

    # -- rank 0's reader threads ------------------------------------------------------------
    def _read(self, rank: int, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "event":
                    _, kind, request_id, packed, nbytes = message
                    self._on_event(rank, kind, request_id, unpack_error(packed), nbytes)
                elif message[0] == "reply":
                    _, seq, result, problem = message
                    with self._lock:
                        future = self._waiting.get(seq)
                    if future is not None:
                        if problem is None:
                            future.set_result(result)
                        else:
                            future.set_exception(RuntimeError(problem))
        except (OSError, EOFError) as e:
            if not self._closed:
                log.error("%s: tensor-parallel rank %d's KV-transfer link broke (%s)",
                          self.name, rank, type(e).__name__)
        except Exception:  # a bug here must not leave requests waiting silently
            log.exception("%s: reading rank %d's KV-transfer link failed", self.name, rank)
        self._fail_waiting(rank)
        if not self._closed:
            self._on_broken(rank)

    def _fail_waiting(self, rank: int) -> None:
        with self._lock:
            seqs = [seq for seq, r in self._waiting_rank.items() if r == rank]
            futures = [self._waiting[seq] for seq in seqs]
        for future in futures:
            if not future.done():
                future.set_exception(LinkBroken(None, f"{self.name} rank {rank}",
                                                "the rank is gone"))

    def close(self) -> None:
        """Ask every agent to close its sender/receiver, then drop the links."""
        if self._closed:
            return
        for rank in list(self._conns):
            try:
                self.call(rank, "close", timeout_s=10.0)
            except Exception as e:  # gone already: nothing left to close there
                log.debug("%s: closing rank %d's agent: %s", self.name, rank, e)
        self._closed = True
        for conn in self._conns.values():
            conn.close()
        self._listener.close()


def connect(address: Any, authkey: bytes, rank: int) -> Connection:
    """A rank's end of its link (sends its rank first)."""
    conn = Client(address, authkey=authkey)
    conn.send(rank)
    return conn
