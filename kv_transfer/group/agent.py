"""A tensor-parallel rank's KV-transfer agent: its own sender or receiver over its own
KV shard, driven by rank 0 through a link (see ``link``).

Started on ranks 1..N-1 by rank 0 (``start_agent``, run there between two steps through the
engine's ``call_ranks``). Commands, in link order::

    announce / send (request_id, routes, src_blocks, dst_blocks)   routes: [(peer, heads)]
    abort_send (request_id)
    expect (request_id, dst_blocks, parts)        answered once registered; parts: the head
                                                  ranges that will arrive
    abort_recv (request_id)                       answered once nothing writes any more
    endpoint ()                                   this rank's receiver endpoint
    close ()

A send's routes finish together: one "sent" event when every route's handle is done (the
first error, if any); an expected request's outcome is one "landed" event.

Safety of reading a rank's KV here: rank 0 only asks for a send after the request's last
prefill step has returned on rank 0, and that step's logits gather needs every rank's
forward finished, so this rank's KV for the request is written before the command arrives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from kv_transfer.base import TransferConfig, TransferHandle
from kv_transfer.group.link import connect, pack_error
from kv_transfer.registry import make_receiver, make_sender

log = logging.getLogger(__name__)


class RankAgent:
    def __init__(self, kv_cache: Any, rank: int, role: str, config: TransferConfig,
                 name: str, heads: tuple[int, int], kv_scales: tuple[float, float]) -> None:
        self.rank, self.name = rank, name
        self.conn: Connection | None = None  # set once connected (after the parts exist)
        self._send_lock = threading.Lock()
        self.sender = self.receiver = None
        kwargs = dict(name=name, heads=heads, kv_scales=kv_scales)
        if role == "sender":
            self.sender = make_sender(config, kv_cache, **kwargs)
        else:
            self.receiver = make_receiver(config, kv_cache, **kwargs)

    def serve(self) -> None:
        """Run commands until ``close`` or the link ends (rank 0 is gone)."""
        try:
            while True:
                kind, seq, op, args = self.conn.recv()
                try:
                    result = getattr(self, f"_op_{op}")(*args)
                    problem = None
                except Exception as e:
                    log.exception("%s: KV-transfer command %s failed", self.name, op)
                    result, problem = None, f"{type(e).__name__}: {e}"
                if kind == "call":
                    self._emit(("reply", seq, result, problem))
                if op == "close":
                    return
        except (OSError, EOFError):
            log.warning("%s: rank 0's KV-transfer link ended", self.name)
        finally:
            self._op_close()

    def _emit(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, EOFError, ValueError):  # rank 0 gone: its reader fails the requests
            log.warning("%s: could not report to rank 0 (gone)", self.name)

    # -- sending ------------------------------------------------------------------------------
    def _op_announce(self, request_id: str, routes: Sequence, src: list[int],
                     dst: list[int]) -> None:
        for peer, heads in routes:
            self.sender.announce(request_id, peer, src, dst, heads=heads)

    def _op_send(self, request_id: str, routes: Sequence, src: list[int],
                 dst: list[int]) -> None:
        handles = [self.sender.send(request_id, peer, src, dst_block_ids=dst, heads=heads)
                   for peer, heads in routes]
        left = [len(handles)]
        lock = threading.Lock()

        def one_done(_: TransferHandle) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            error = next((h.error for h in handles if h.error is not None), None)
            nbytes = 0 if error else sum(h.result().nbytes for h in handles)
            self._emit(("event", "sent", request_id, pack_error(error), nbytes))

        for handle in handles:
            handle.add_done_callback(one_done)

    def _op_abort_send(self, request_id: str) -> bool:
        return self.sender.abort(request_id)

    # -- receiving ----------------------------------------------------------------------------
    def _op_endpoint(self):
        return self.receiver.endpoint()

    def _op_expect(self, request_id: str, dst: list[int], parts: list) -> None:
        def landed(rid: str, error) -> None:
            self._emit(("event", "landed", rid, pack_error(error), 0))

        self.receiver.expect(request_id, dst, on_done=landed, parts=parts)

    def _op_abort_recv(self, request_id: str) -> bool:
        return self.receiver.abort(request_id)

    def _op_close(self) -> None:
        for part in (self.sender, self.receiver):
            if part is not None:
                part.close()


def start_agent(runner: Any, comm: Any, address: Any, authkey: bytes, role: str,
                config: TransferConfig, name: str, heads: Sequence[tuple[int, int]],
                kv_scales: tuple[float, float]) -> None:
    """On rank ``comm.rank`` (called by the engine's OP_CALL between steps): connect to
    rank 0, build this rank's sender/receiver over ``runner.kv_cache`` and serve on a
    thread of its own."""
    rank = comm.rank
    # Built before connecting: a rank that cannot build its part never connects, and rank
    # 0's accept gives up with an error naming it.
    agent = RankAgent(runner.kv_cache, rank, role, config, f"{name}/tp{rank}",
                      tuple(heads[rank]), kv_scales)
    agent.conn = connect(address, authkey, rank)
    threading.Thread(target=agent.serve, name=f"kv-agent {rank}", daemon=True).start()
