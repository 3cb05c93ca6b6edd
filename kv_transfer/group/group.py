"""A worker's KV transfer when its model is split over tensor-parallel ranks.

Every rank holds the KV heads it computes (``heads[rank]``, global head indices) in a cache
of its own, so KV moves rank to rank: ``reshard.plan_routes(source heads, destination
heads)`` says which source rank sends which heads to which destination rank (each head a
destination rank holds comes from exactly one source rank; no rank gathers the full KV).
Both sides compute the same plan from the two head layouts: the sender from the peer's
``GroupEndpoint``, the receiver from the ``source_heads`` the cluster passes at reserve
time; every payload's header carries its head range, so a disagreement fails that request
with ``LayoutMismatch`` instead of writing wrong heads.

``GroupSender`` / ``GroupReceiver`` are the worker-level ``KVSender`` / ``KVReceiver``: rank
0's own part is a normal per-rank sender/receiver in this process; ranks 1..N-1 run theirs
in their own processes (``agent``), driven over ``RankLinks``. A send's handle completes
when every route is done (so the source blocks are freed only when no rank reads them
any more); an expected request lands when every rank's parts landed, and fails once, at
the first error, after which the other ranks' parts are aborted. A worker with one rank
and a one-rank peer holding all heads takes today's path unchanged (no routes, no links).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kv_transfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    OnDone,
    TransferConfig,
    TransferHandle,
    TransferStats,
)
from kv_transfer.errors import TransferError
from kv_transfer.group.link import LinkBroken, RankLinks
from kv_transfer.registry import make_receiver, make_sender
from kv_transfer.reshard import Route, parts_for, plan_routes, routes_from

log = logging.getLogger(__name__)

Heads = tuple[int, int]
AGENT_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GroupEndpoint:
    """How to reach a tensor-parallel receiver: one endpoint per rank and the KV heads each
    rank holds (picklable: it travels through Ray like ``Endpoint``)."""

    name: str
    ranks: tuple[Endpoint, ...]
    heads: tuple[Heads, ...]

    def describe(self) -> str:
        return f"{self.name} (TP={len(self.ranks)})"


def rank_heads(peer: Endpoint | GroupEndpoint) -> tuple[Heads, ...]:
    """The head range of each rank of ``peer``."""
    return peer.heads if isinstance(peer, GroupEndpoint) else (peer.head_range(),)


def rank_endpoints(peer: Endpoint | GroupEndpoint) -> tuple[Endpoint, ...]:
    return peer.ranks if isinstance(peer, GroupEndpoint) else (peer,)


def _start_links(role: str, config: TransferConfig, name: str, heads: Sequence[Heads],
                 kv_scales: tuple[float, float], call_ranks: Callable[..., None],
                 on_event, on_broken) -> RankLinks:
    from kv_transfer.group.agent import start_agent

    if config.backend != "torch_dist":
        raise ValueError(f"KV transfer backend {config.backend!r} cannot reach the ranks of "
                         "a tensor-parallel worker (they run in processes of their own); "
                         "use transfer backend torch_dist")
    links = RankLinks(len(heads), name, on_event, on_broken)
    call_ranks(start_agent, links.address, links.authkey, role, config, name,
               list(heads), kv_scales)
    links.accept(AGENT_START_TIMEOUT_S)
    return links


class _RankGroup:
    """What a worker's sender and receiver share: rank 0's own part (a per-rank sender or
    receiver made by ``make``, holding every head when the worker has one rank) and, with
    N > 1 ranks, the links to the agents of ranks 1..N-1 (``role``)."""

    def __init__(self, role: str, make: Callable[..., Any], config: TransferConfig,
                 kv_cache: Any, name: str, heads: Sequence[Heads], num_kv_heads: int,
                 call_ranks: Callable[..., None] | None, kv_scales: tuple[float, float],
                 kwargs: dict[str, Any]) -> None:
        """``heads[r]``: rank r's KV heads; ``call_ranks(fn, *args)``: runs ``fn(runner,
        comm, *args)`` on ranks 1..N-1 (the engine's ``call_ranks``; needed when N > 1)."""
        self.name, self.heads, self.num_kv_heads = name, tuple(map(tuple, heads)), num_kv_heads
        self.whole = len(self.heads) == 1 and self.heads[0] == (0, num_kv_heads)
        own = None if self.whole else self.heads[0]
        self.local = make(config, kv_cache, name=f"{name}/tp0" if own else name, heads=own,
                          kv_scales=kv_scales, **kwargs)
        self._lock = threading.Lock()
        self.links = None
        if len(self.heads) > 1:
            self.links = _start_links(role, config, name, self.heads, kv_scales, call_ranks,
                                      self._on_event, self._on_broken)


class _Parts:
    """Outstanding parts of one request (ranks, or a rank's routes) and the first error."""

    def __init__(self, count: int) -> None:
        self.left, self.error, self.nbytes = count, None, 0


class GroupSender(_RankGroup, KVSender):
    def __init__(self, config: TransferConfig, kv_cache: Any, name: str,
                 heads: Sequence[Heads], num_kv_heads: int,
                 call_ranks: Callable[..., None] | None = None,
                 kv_scales: tuple[float, float] = (1.0, 1.0), **kwargs: Any) -> None:
        self._sends: dict[str, tuple[TransferHandle, _Parts, set[int]]] = {}
        super().__init__("sender", make_sender, config, kv_cache, name, heads, num_kv_heads,
                         call_ranks, kv_scales, kwargs)

    def _routes(self, peer) -> list[Route] | None:
        """The plan to ``peer``, or None for today's single-rank whole-cache send."""
        dst = rank_heads(peer)
        if self.whole and len(dst) == 1 and dst[0] == (0, self.num_kv_heads):
            return None
        return plan_routes(self.heads, dst)

    def _by_rank(self, peer, routes: list[Route]) -> dict[int, list]:
        endpoints = rank_endpoints(peer)
        out: dict[int, list] = {}
        for rank in range(len(self.heads)):
            mine = [(endpoints[r.dst_rank], r.heads) for r in routes_from(routes, rank)]
            if mine:
                out[rank] = mine
        return out

    def announce(self, request_id: str, peer, src_block_ids: Sequence[int],
                 dst_block_ids: Sequence[int]) -> bool:
        routes = self._routes(peer)
        if routes is None:
            return self.local.announce(request_id, peer, src_block_ids, dst_block_ids)
        src, dst = list(src_block_ids), list(dst_block_ids)
        announced = False
        for rank, mine in self._by_rank(peer, routes).items():
            if rank == 0:
                for endpoint, heads in mine:
                    announced |= self.local.announce(request_id, endpoint, src, dst,
                                                     heads=heads)
            else:
                self.links.post(rank, "announce", request_id, mine, src, dst)
                announced = True
        return announced

    def send(self, request_id: str, peer, src_block_ids: Sequence[int],
             layers: tuple[int, int] | None = None,
             dst_block_ids: Sequence[int] | None = None) -> TransferHandle:
        routes = self._routes(peer)
        if routes is None:
            return self.local.send(request_id, peer, src_block_ids, layers, dst_block_ids)
        src = list(src_block_ids)
        dst = None if dst_block_ids is None else list(dst_block_ids)
        by_rank = self._by_rank(peer, routes)
        handle = TransferHandle(request_id)
        local = by_rank.pop(0, [])
        parts = _Parts(len(local) + len(by_rank))
        with self._lock:
            self._sends[request_id] = (handle, parts, set(by_rank))
        for rank, mine in by_rank.items():
            try:
                self.links.post(rank, "send", request_id, mine, src, dst)
            except LinkBroken as e:
                self._part_done(request_id, e.for_request(request_id), 0, rank)
        for endpoint, heads in local:
            h = self.local.send(request_id, endpoint, src, layers, dst, heads=heads)
            h.add_done_callback(lambda h: self._part_done(
                request_id, h.error, 0 if h.error else h.result().nbytes, None))
        return handle

    def _part_done(self, request_id: str, error: TransferError | None, nbytes: int,
                   rank: int | None) -> None:
        with self._lock:
            entry = self._sends.get(request_id)
            if entry is None:
                return
            handle, parts, remote = entry
            if rank is not None:
                if rank not in remote:
                    return  # that rank already reported (or its link broke)
                remote.discard(rank)
            parts.left -= 1
            parts.nbytes += nbytes
            parts.error = parts.error or error
            if parts.left:
                return
            del self._sends[request_id]
        if parts.error is not None:
            handle.fail(parts.error)
        else:
            handle.succeed(TransferStats(parts.nbytes, 0.0))

    def _on_event(self, rank: int, kind: str, request_id: str, error, nbytes: int) -> None:
        if kind == "sent":
            self._part_done(request_id, error, nbytes, rank)

    def _on_broken(self, rank: int) -> None:
        with self._lock:
            waiting = [rid for rid, (_, _, remote) in self._sends.items() if rank in remote]
        for rid in waiting:
            self._part_done(rid, LinkBroken(rid, f"{self.name} rank {rank}",
                                            "the tensor-parallel rank is gone"), 0, rank)

    def deferred_writes(self) -> contextlib.AbstractContextManager[None]:
        return self.local.deferred_writes()

    def abort(self, request_id: str) -> bool:
        dropped = self.local.abort(request_id)
        if self.links is not None:
            for rank in range(1, len(self.heads)):
                with contextlib.suppress(LinkBroken):  # gone: nothing of it to abort
                    self.links.post(rank, "abort_send", request_id)
        return dropped

    def close(self) -> None:
        self.local.close()
        if self.links is not None:
            self.links.close()
        with self._lock:
            pending, self._sends = list(self._sends.items()), {}
        for rid, (handle, _, _) in pending:
            handle.fail(LinkBroken(rid, self.name, "the sender closed"))


class GroupReceiver(_RankGroup, KVReceiver):
    def __init__(self, config: TransferConfig, kv_cache: Any, name: str,
                 heads: Sequence[Heads], num_kv_heads: int,
                 call_ranks: Callable[..., None] | None = None,
                 kv_scales: tuple[float, float] = (1.0, 1.0), **kwargs: Any) -> None:
        self._expected: dict[str, tuple[_Parts, OnDone | None, set[int]]] = {}
        self._completions: deque[tuple[str, TransferError | None]] = deque()
        self._endpoint = None
        super().__init__("receiver", make_receiver, config, kv_cache, name, heads,
                         num_kv_heads, call_ranks, kv_scales, kwargs)

    def endpoint(self):
        if self.links is None:
            return self.local.endpoint()
        if self._endpoint is None:
            ranks = [self.local.endpoint()] + [self.links.call(rank, "endpoint")
                                               for rank in range(1, len(self.heads))]
            self._endpoint = GroupEndpoint(self.name, tuple(ranks), self.heads)
        return self._endpoint

    def expect(self, request_id: str, dst_block_ids: Sequence[int],
               on_done: OnDone | None = None,
               source_heads: Sequence[Heads] | None = None) -> None:
        """``source_heads``: the sending worker's head range per rank (None: one rank with
        every head, a TP=1 prefill worker)."""
        source = tuple(map(tuple, source_heads or ((0, self.num_kv_heads),)))
        if self.whole and source == ((0, self.num_kv_heads),):
            self.local.expect(request_id, dst_block_ids, on_done)
            return
        routes = plan_routes(source, self.heads)
        dst = list(dst_block_ids)
        remote = set(range(1, len(self.heads)))
        with self._lock:
            self._expected[request_id] = (_Parts(len(self.heads)), on_done, set(remote))
        for rank in sorted(remote):
            # Answered, not posted: the caller hands the blocks to the prefill side when
            # this returns, and a payload that reaches a rank before its expect would be
            # drained as unknown (the request then waits out the transfer deadline).
            try:
                self.links.call(rank, "expect", request_id, dst, parts_for(routes, rank))
            except LinkBroken as e:
                self._part_done(request_id, e.for_request(request_id), rank)
            except Exception as e:  # the rank refused it (its log says why)
                self._part_done(request_id, TransferError(
                    request_id, f"{self.name} rank {rank}", f"could not expect it ({e})"),
                    rank)
        self.local.expect(request_id, dst, on_done=lambda rid, err: self._part_done(
            rid, err, None), parts=parts_for(routes, 0))

    def _part_done(self, request_id: str, error: TransferError | None,
                   rank: int | None) -> None:
        with self._lock:
            entry = self._expected.get(request_id)
            if entry is None:
                return  # aborted, or already failed
            parts, on_done, remote = entry
            if rank is not None:
                if rank not in remote:
                    return
                remote.discard(rank)
            parts.left -= 1
            if error is None and parts.left:
                return
            del self._expected[request_id]
        if error is not None and parts.left:
            # The other ranks' parts are no longer wanted, and the caller frees the blocks
            # on this report: abort them first (answered calls), off this thread, which
            # may be a link's reader and would wait for its own answer.
            threading.Thread(target=self._fail, args=(request_id, error, on_done, remote),
                             name=f"kv-fail {request_id}", daemon=True).start()
            return
        self._report(request_id, error, on_done)

    def _fail(self, request_id: str, error: TransferError, on_done, ranks) -> None:
        self._abort_parts(request_id, ranks, local=True)
        self._report(request_id, error, on_done)

    def _report(self, request_id: str, error, on_done) -> None:
        if on_done is not None:
            on_done(request_id, error)
        else:
            with self._lock:
                self._completions.append((request_id, error))

    def _abort_parts(self, request_id: str, ranks, local: bool) -> None:
        if local:
            self.local.abort(request_id)
        for rank in sorted(ranks):
            try:
                self.links.call(rank, "abort_recv", request_id)
            except Exception as e:  # gone: it writes nothing any more
                log.debug("%s: abort of %s on rank %d: %s", self.name, request_id, rank, e)

    def _on_event(self, rank: int, kind: str, request_id: str, error, nbytes: int) -> None:
        if kind == "landed":
            self._part_done(request_id, error, rank)

    def _on_broken(self, rank: int) -> None:
        with self._lock:
            waiting = [rid for rid, (_, _, remote) in self._expected.items() if rank in remote]
        for rid in waiting:
            self._part_done(rid, LinkBroken(rid, f"{self.name} rank {rank}",
                                            "the tensor-parallel rank is gone"), rank)

    def abort(self, request_id: str) -> bool:
        """Returns once no rank writes into the request's blocks any more."""
        with self._lock:
            entry = self._expected.pop(request_id, None)
        aborted = self.local.abort(request_id)
        if self.links is not None:
            self._abort_parts(request_id, range(1, len(self.heads)), local=False)
        return entry is not None or aborted

    def poll(self) -> list[tuple[str, TransferError | None]]:
        out = self.local.poll()
        with self._lock:
            out += list(self._completions)
            self._completions.clear()
        return out

    def deliver(self, header: bytes, payload) -> bool:
        """Ray backend delivery to rank 0's receiver."""
        return self.local.deliver(header, payload)

    def close(self) -> None:
        self.local.close()
        if self.links is not None:
            self.links.close()
        with self._lock:
            pending, self._expected = list(self._expected.items()), {}
        for rid, (_, on_done, _) in pending:
            error = LinkBroken(rid, self.name, "the receiver closed")
            if on_done is not None:
                on_done(rid, error)
