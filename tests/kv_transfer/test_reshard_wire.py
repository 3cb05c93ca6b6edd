"""How resharded payloads move on the torch_dist (gloo) wire: a rank announces each of a
request's routes (a 1 -> 2 sender has two per request), a payload the sender gathers moves
a window of blocks per gather, and a STAGED payload lands whole in staging and is
scattered by one copy; aborts and withdrawn announcements leave every block unclaimed."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from kv_transfer import TransferConfig, blocks, make_receiver, make_sender
from kv_transfer.receiving import StagedTarget
from kv_transfer.reshard import parts_for
from kv_transfer.torch_dist import recv_channel
from kv_transfer.torch_dist import sender as torch_dist_sender

from .helpers import Completions
from .reshard_cases import DST_IDS, SRC_IDS, Setup, case_id

# connect_timeout_s well above 5 s: see kv_transfer.torch_dist.tcp_store
CONFIG = TransferConfig(host="127.0.0.1", timeout_s=10.0, connect_timeout_s=20.0)


@pytest.fixture
def build():
    """(senders, receivers) of a Setup over torch_dist; all closed at the end."""
    opened: list = []

    def make(setup: Setup, config: TransferConfig = CONFIG):
        senders = [make_sender(config, cache, name=f"p{r}", heads=heads)
                   for r, (cache, heads) in enumerate(zip(setup.src_caches, setup.src_heads,
                                                          strict=True))]
        receivers = [make_receiver(config, cache, name=f"d{r}", heads=heads)
                     for r, (cache, heads) in enumerate(zip(setup.dst_caches, setup.dst_heads,
                                                            strict=True))]
        opened.append((senders, receivers))
        return senders, receivers

    yield make
    for senders, receivers in opened:  # senders first: their CLOSE ends the receivers'
        for obj in [*senders, *receivers]:
            obj.close()


# Notified at every claim and release of a receiver's blocks and every announcement a
# receive channel handles (counted in ``announcements``): what the tests below wait for.
CHANGED = threading.Condition()
announcements: list[str] = []


@pytest.fixture(autouse=True)
def notify_changes(monkeypatch):
    from kv_transfer.receiving import ExpectTable
    from kv_transfer.torch_dist.recv_channel import ReceiverChannel

    def notifying(method, record=None):
        def wrapped(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            finally:
                with CHANGED:
                    if record is not None:
                        record(*args)
                    CHANGED.notify_all()
        return wrapped

    announcements.clear()
    monkeypatch.setattr(ExpectTable, "claim", notifying(ExpectTable.claim))
    monkeypatch.setattr(ExpectTable, "release", notifying(ExpectTable.release))
    monkeypatch.setattr(ReceiverChannel, "_announce", notifying(
        ReceiverChannel._announce, lambda group, h: announcements.append(h.request_id)))


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds: checked at each claim, release and announcement."""
    with CHANGED:
        assert CHANGED.wait_for(predicate, timeout), "condition not reached in time"


def expect_all(setup, receivers, rid, done, dst=DST_IDS):
    for rank, receiver in enumerate(receivers):
        receiver.expect(rid, dst, lambda r, e, rank=rank: done(f"{rank}/{r}", e),
                        parts=parts_for(setup.routes, rank))


def announce_all(setup, sender, receivers, rid) -> None:
    """The one sender announces every route of ``rid``; each receiver posts its receives
    (they claim all its reserved blocks)."""
    for route in setup.routes:
        assert sender.announce(rid, receivers[route.dst_rank].endpoint(), SRC_IDS, DST_IDS,
                               heads=route.heads), route
    for receiver in receivers:
        wait_until(lambda receiver=receiver: receiver.table.claimed_blocks(rid) == len(DST_IDS))


def one_to_two(build, seed: int, rid: str):
    """A 1 -> 2 setup (one prefill rank, two decode ranks) expecting ``rid``: (setup,
    sender, receivers, their endpoints, completions)."""
    setup = Setup((8, 8, 1, 2), seed=seed)
    (sender,), receivers = build(setup)
    done = Completions()
    expect_all(setup, receivers, rid, done)
    return setup, sender, receivers, [r.endpoint() for r in receivers], done


def test_a_rank_announces_each_of_its_routes_and_every_receiver_posts_ahead(build):
    """1 -> 2: the one prefill rank sends each request to two decode ranks. Both routes
    are announced (the second was refused while announcements were keyed by request
    alone), both receivers post every receive before the KV is sent, and it lands."""
    setup, sender, receivers, endpoints, done = one_to_two(build, 11, "r")
    announce_all(setup, sender, receivers, "r")
    handles = [sender.send("r", endpoints[r.dst_rank], SRC_IDS, dst_block_ids=DST_IDS,
                           heads=r.heads) for r in setup.routes]
    for handle in handles:
        handle.result(timeout=20)
    done.wait_for("0/r", "1/r")
    assert done.errors == {"0/r": None, "1/r": None}
    setup.check_landed()


def test_an_abort_withdraws_every_announced_route_of_the_request(build):
    setup, sender, receivers, endpoints, done = one_to_two(build, 12, "gone")
    announce_all(setup, sender, receivers, "gone")
    sender.abort("gone")
    for receiver in receivers:  # each RETRACT completed that receiver's posted receives
        wait_until(lambda receiver=receiver: receiver.table.claimed_blocks("gone") == 0)
        assert receiver.abort("gone")  # returns at once: nothing writes into the blocks
    # The channels are sound: the next request lands on both ranks.
    expect_all(setup, receivers, "next", done)
    for r in setup.routes:
        sender.send("next", endpoints[r.dst_rank], SRC_IDS, dst_block_ids=DST_IDS,
                    heads=r.heads).result(timeout=20)
    done.wait_for("0/next", "1/next")
    assert "0/gone" not in done.errors and "1/gone" not in done.errors
    setup.check_landed()


def test_a_send_on_a_route_never_announced_withdraws_the_requests_announcements(build):
    """The plan changed between announce and send (here: announced to rank 0, sent to rank
    1 only): rank 0's posted receives are completed by a RETRACT at once, instead of
    holding its blocks (and its abort) until the request's abort."""
    setup, sender, receivers, endpoints, done = one_to_two(build, 13, "r")
    first, second = setup.routes
    assert sender.announce("r", endpoints[first.dst_rank], SRC_IDS, DST_IDS, heads=first.heads)
    wait_until(lambda: receivers[first.dst_rank].table.claimed_blocks("r") == 8)
    sender.send("r", endpoints[second.dst_rank], SRC_IDS, dst_block_ids=DST_IDS,
                heads=second.heads).result(timeout=20)
    wait_until(lambda: receivers[first.dst_rank].table.claimed_blocks("r") == 0)
    done.wait_for(f"{second.dst_rank}/r")
    # Rank 0 still expects the request: a plain send lands it.
    sender.send("r", endpoints[first.dst_rank], SRC_IDS, dst_block_ids=DST_IDS,
                heads=first.heads).result(timeout=20)
    done.wait_for(f"{first.dst_rank}/r")
    assert set(done.errors.values()) == {None}
    setup.check_landed()


def test_a_gathered_payload_moves_in_windows_over_scattered_blocks(build, monkeypatch):
    """1 -> 2 with 2-block windows (inflight_messages=4) over ids that are contiguous
    nowhere: every window is one gather into its half of the staging, a half is reused
    only once its earlier window was taken, and every block lands where it belongs."""
    setup = Setup((8, 8, 1, 2), seed=14)
    config = dataclasses.replace(CONFIG, inflight_messages=4)
    (sender,), receivers = build(setup, config)
    gathers: list[int] = []
    original = blocks.gather

    def counted(kv, ids, *args, **kw):
        gathers.append(len(ids))
        return original(kv, ids, *args, **kw)

    monkeypatch.setattr(blocks, "gather", counted)
    endpoints = [r.endpoint() for r in receivers]
    src, dst = [20, 3, 11, 7, 0, 15, 9], [1, 12, 5, 22, 8, 17, 3]
    done = Completions()
    expect_all(setup, receivers, "w", done, dst)
    for announce in (True, False):
        rid = f"w{announce}"
        expect_all(setup, receivers, rid, done, dst)
        if announce:
            for r in setup.routes:
                assert sender.announce(rid, endpoints[r.dst_rank], src, dst, heads=r.heads)
        gathers.clear()
        for r in setup.routes:
            sender.send(rid, endpoints[r.dst_rank], src, dst_block_ids=dst,
                        heads=r.heads).result(timeout=20)
        assert gathers == [2, 2, 2, 1] * 2  # per route: 7 blocks in windows of 2
        done.wait_for(f"0/{rid}", f"1/{rid}")
        setup.check_landed(src, dst)
        for cache in setup.dst_caches:
            cache.zero_()


def test_an_announced_gathered_payload_nobody_expects_any_more_is_drained(build):
    """A gathered payload's header goes ahead of its messages even when announced: a
    receiver that posted nothing (the request was aborted there first) drains it as it
    comes, so the sender, whose staging halves wait for the receiver, completes, and the
    next request on the channel lands."""
    setup = Setup((8, 8, 1, 2), seed=15)
    config = dataclasses.replace(CONFIG, inflight_messages=2)  # 8 windows of one block
    (sender,), receivers = build(setup, config)
    endpoints = [r.endpoint() for r in receivers]
    route = setup.routes[0]
    receiver, ep = receivers[route.dst_rank], endpoints[route.dst_rank]
    done = Completions()
    receiver.expect("late", DST_IDS, done, parts=[route.heads])
    assert receiver.abort("late")
    assert sender.announce("late", ep, SRC_IDS, DST_IDS, heads=route.heads)
    t0 = time.monotonic()
    sender.send("late", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=route.heads).result(
        timeout=CONFIG.timeout_s)
    assert time.monotonic() - t0 < CONFIG.timeout_s / 2
    receiver.expect("next", DST_IDS, done, parts=[route.heads])
    sender.send("next", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=route.heads).result(timeout=20)
    done.wait_for("next")
    assert done.errors == {"next": None}
    setup.check_landed(ranks=[route.dst_rank])


def land_on_one(setup, senders, receiver, rid: str, done) -> None:
    """2 -> 1: the one receiver expects ``rid``, every part is sent; wait for its outcome."""
    receiver.expect(rid, DST_IDS, done, parts=parts_for(setup.routes, 0))
    for r in setup.routes:
        senders[r.src_rank].send(rid, receiver.endpoint(), SRC_IDS, dst_block_ids=DST_IDS,
                                 heads=r.heads).result(timeout=20)
    done.wait_for(rid)


@pytest.mark.parametrize("whole", [True, False])
def test_a_staged_payload_is_scattered_once_it_is_all_in(build, monkeypatch, whole):
    """2 -> 1: each part is a slice of the receiver's heads. Up to WHOLE_STAGED_BYTES it
    lands whole in staging and takes one scatter per part; above, one per message."""
    setup = Setup((8, 8, 2, 1), seed=16)
    monkeypatch.setattr(torch_dist_sender, "STAGED_MESSAGE_BYTES", 1)  # a message a block
    if not whole:
        monkeypatch.setattr(recv_channel, "WHOLE_STAGED_BYTES", 0)
    senders, (receiver,) = build(setup)
    scatters: list[int] = []
    original = StagedTarget.copy_

    def counted(self, landing):
        scatters.append(len(self.block_ids))
        original(self, landing)

    monkeypatch.setattr(StagedTarget, "copy_", counted)
    done = Completions()
    land_on_one(setup, senders, receiver, "s", done)
    assert done.errors == {"s": None}
    assert scatters == ([8, 8] if whole else [1] * 16)
    setup.check_landed()


def test_an_abort_during_a_whole_payloads_scatter_waits_for_it(build, monkeypatch):
    """The abort of a request whose part is being scattered from staging returns once the
    scatter is over; the request never completes, and the receiver takes the next one."""
    setup = Setup((8, 8, 2, 1), seed=17)
    senders, (receiver,) = build(setup)
    writing, resume = threading.Event(), threading.Event()
    original = StagedTarget.copy_
    first, second = setup.routes

    def held(self, landing):
        if self.heads == slice(*second.heads) and not writing.is_set():
            writing.set()
            assert resume.wait(20)
        original(self, landing)

    monkeypatch.setattr(StagedTarget, "copy_", held)
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("r", DST_IDS, done, parts=parts_for(setup.routes, 0))
    senders[0].send("r", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=first.heads).result(20)
    handle = senders[1].send("r", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=second.heads)
    assert writing.wait(10)
    aborter = threading.Thread(target=receiver.abort, args=("r",))
    aborter.start()
    aborter.join(0.3)
    assert aborter.is_alive()  # the whole part is being written into the blocks
    resume.set()
    aborter.join(10)
    assert not aborter.is_alive()
    handle.result(timeout=20)
    assert receiver.table.claimed_blocks("r") == 0
    assert "r" not in done.errors
    land_on_one(setup, senders, receiver, "next", done)
    assert done.errors == {"next": None}
    setup.check_landed()


@pytest.mark.parametrize("fits", [True, False])
def test_an_announced_staged_payload_is_received_ahead_into_a_buffer_of_its_own(
        build, monkeypatch, fits):
    """2 -> 1, both parts of two requests announced at once: the receiver posts each
    part's receives into a staging buffer of its own (its claims show them posted before
    any KV is sent) and scatters it when its DATA comes, in whatever order they come. A
    part over WHOLE_STAGED_BYTES is not posted ahead; its trailing DATA header still
    brings it in."""
    setup = Setup((8, 8, 2, 1), seed=18)
    if not fits:
        monkeypatch.setattr(recv_channel, "WHOLE_STAGED_BYTES", 0)
    senders, (receiver,) = build(setup)
    done, ep = Completions(), receiver.endpoint()
    ids = {"a": (SRC_IDS, DST_IDS), "b": ([22, 23, 6, 8, 10, 11, 15, 16],
                                          [6, 8, 10, 11, 15, 16, 18, 19])}
    for rid, (src, dst) in ids.items():
        receiver.expect(rid, dst, done, parts=parts_for(setup.routes, 0))
        for r in setup.routes:
            assert senders[r.src_rank].announce(rid, ep, src, dst, heads=r.heads)
    claimed = lambda: [receiver.table.claimed_blocks(rid) for rid in ids]
    if fits:
        wait_until(lambda: claimed() == [16, 16])
    else:
        wait_until(lambda: len(announcements) == 4)  # handled (and ignored)
        assert claimed() == [0, 0]
    for rid, routes in (("b", setup.routes[::-1]), ("a", setup.routes)):
        src, dst = ids[rid]
        for r in routes:
            senders[r.src_rank].send(rid, ep, src, dst_block_ids=dst,
                                     heads=r.heads).result(timeout=20)
    done.wait_for("a", "b")
    assert done.errors == {"a": None, "b": None}
    cache = setup.dst_caches[0]
    for src, dst in ids.values():
        assert torch.equal(cache[dst], setup.full[src])
    assert claimed() == [0, 0]


def test_a_retracted_staged_announcement_writes_nothing(build):
    setup = Setup((8, 8, 2, 1), seed=19)
    senders, (receiver,) = build(setup)
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("r", DST_IDS, done, parts=parts_for(setup.routes, 0))
    for r in setup.routes:
        assert senders[r.src_rank].announce("r", ep, SRC_IDS, DST_IDS, heads=r.heads)
    wait_until(lambda: receiver.table.claimed_blocks("r") == 16)
    for sender in senders:
        sender.abort("r")
    wait_until(lambda: receiver.table.claimed_blocks("r") == 0)
    assert setup.dst_caches[0].count_nonzero() == 0  # the fills were not scattered
    assert receiver.abort("r")
    assert "r" not in done.errors


def test_the_staging_pool_lends_each_buffer_once_and_keeps_the_largest():
    from kv_transfer.torch_dist.staging import StagingPool

    pool = StagingPool(torch.device("cpu"))
    lent = [pool.take(n) for n in (3072, 1024, 2048, 4096, 512, 8192)]
    assert [b.numel() for b in lent] == [3072, 1024, 2048, 4096, 512, 8192]
    for buf in lent:
        pool.give(buf)
    assert sorted(b.numel() for b in pool._free) == [2048, 3072, 4096, 8192]
    again = pool.take(1500)  # the first free one large enough, a view of its size
    assert again.numel() == 1500 and again._base.numel() >= 1500
    assert all(b.data_ptr() != again.data_ptr() for b in pool._free)


@pytest.mark.parametrize("case", [(8, 8, 2, 1), (8, 8, 1, 2), (2, 8, 1, 4)], ids=case_id)
def test_head_slices_move_between_head_major_caches_with_no_copy(build, monkeypatch, case):
    """Between head-major caches (the engine's layout), every head range of a block is
    contiguous on both sides: each route's payload is SLICED, one message per block
    straight from the sender's cache into the receiver's. Nothing is gathered, staged or
    scattered, announced or not, and every rank gets exactly its heads."""
    from kv_transfer.header import SLICED
    from kv_transfer.torch_dist.recv_channel import ReceiverChannel
    from kv_transfer.torch_dist.staging import Staging

    setup = Setup(case, seed=21, layout="head-major")
    senders, receivers = build(setup)
    copies, flags = [], []

    def counted(owner, name):
        original = getattr(owner, name)

        def copying(*args, **kwargs):
            copies.append(name)
            return original(*args, **kwargs)
        return copying

    for owner, name in ((blocks, "gather"), (blocks, "scatter"), (StagedTarget, "copy_"),
                        (Staging, "take"), (Staging, "slots")):
        monkeypatch.setattr(owner, name, counted(owner, name))
    handle = ReceiverChannel._handle

    def recording(self, group, h, current):
        flags.append(h.flags)
        return handle(self, group, h, current)

    monkeypatch.setattr(ReceiverChannel, "_handle", recording)
    endpoints = [r.endpoint() for r in receivers]
    for announce in (False, True):
        rid, done = f"r{announce}", Completions()
        expect_all(setup, receivers, rid, done)
        if announce:
            for r in setup.routes:
                assert senders[r.src_rank].announce(rid, endpoints[r.dst_rank], SRC_IDS,
                                                    DST_IDS, heads=r.heads)
        for r in setup.routes:
            senders[r.src_rank].send(rid, endpoints[r.dst_rank], SRC_IDS,
                                     dst_block_ids=DST_IDS, heads=r.heads).result(timeout=20)
        done.wait_for(*[f"{rank}/{rid}" for rank in range(len(receivers))])
        assert set(done.errors.values()) == {None}
        assert copies == []
        setup.check_landed()  # (gathers to compare)
        copies.clear()
        for cache in setup.dst_caches:
            cache.zero_()
    assert flags and all(f & SLICED for f in flags), flags


def test_a_ranks_routes_written_together_fill_their_sockets_in_parallel(build, monkeypatch):
    """1 -> 2 between head-major caches, both routes announced and sent inside
    ``deferred_writes`` (as the prefill worker sends a step's KV): the first route's
    messages are written by its channel's thread while the calling thread writes the
    last route's, instead of the second route waiting for the whole first one (this
    thread wrote both, one after the other)."""
    from kv_transfer.torch_dist import sender as sender_module
    from kv_transfer.torch_dist.wire import PairGroup

    setup = Setup((8, 8, 1, 2), seed=23, layout="head-major")
    (sender,), receivers = build(setup)
    done = Completions()
    expect_all(setup, receivers, "r", done)
    # The premise: both channels idle when the payloads are submitted (a real prefill's
    # forward pass outlasts posting the announcements). A channel frees itself just before
    # its ANNOUNCE job completes; until then it would post the payload itself, by design.
    announced = threading.Semaphore(0)
    original_control_done = sender_module._log_control_failure

    def control_done(handle):  # a control job (here: an ANNOUNCE) completed
        original_control_done(handle)
        announced.release()

    monkeypatch.setattr(sender_module, "_log_control_failure", control_done)
    announce_all(setup, sender, receivers, "r")
    for _ in setup.routes:
        assert announced.acquire(timeout=10), "an announcement never left"
    writers: dict[str, set[str]] = {}
    send = PairGroup.send

    def recording(self, tensor, tag):
        writers.setdefault(self.peer, set()).add(threading.current_thread().name)
        return send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", recording)
    endpoints = [r.endpoint() for r in receivers]
    with sender.deferred_writes():
        handles = [sender.send("r", endpoints[r.dst_rank], SRC_IDS, dst_block_ids=DST_IDS,
                               heads=r.heads) for r in setup.routes]
    for handle in handles:
        handle.result(timeout=20)
    done.wait_for("0/r", "1/r")
    assert set(done.errors.values()) == {None}
    setup.check_landed()
    here = threading.current_thread().name
    assert sorted(writers.values(), key=lambda names: here in names) == [
        {f"kv-send {endpoints[setup.routes[0].dst_rank].describe()}"}, {here}], writers


def test_a_payload_in_another_memory_order_fails_its_request_not_the_cache():
    """The receiver's own check of a header against its cache's memory layout (senders
    choose a fitting way; this guards against one that does not)."""
    from kv_transfer.header import GATHERED, HEADS_OUTER, SLICED, STAGED, TransferHeader
    from kv_transfer.torch_dist.recv_channel import _order_problem

    from .helpers import make_cache

    def header(flags):
        return TransferHeader.for_blocks("r", make_cache(None), 2, None, "p", flags=flags)

    fits = {  # flags -> the receiver layouts (head-major?) its messages fit
        0: {False}, HEADS_OUTER: {True}, GATHERED: {False}, SLICED | HEADS_OUTER: {True},
        GATHERED | HEADS_OUTER: {True}, STAGED: {False, True}, STAGED | GATHERED: {False, True},
        STAGED | HEADS_OUTER: set(), STAGED | GATHERED | HEADS_OUTER: set(),
    }
    for flags, layouts in fits.items():
        for heads_outer in (False, True):
            problem = _order_problem(header(flags), heads_outer)
            assert (problem == "") == (heads_outer in layouts), (flags, heads_outer, problem)


@pytest.mark.parametrize("flags", [0, 1])  # 1 = STAGED
def test_only_a_staged_payload_lands_whole(flags):
    """A CUDA cache over a gloo wire receives its in-place payloads through host slots,
    each copied into its own blocks; landing one whole would take a single claim of the
    blocks as one contiguous run, which reserved ids need not be. (No GPU here: the cache
    stays on the CPU, the wire's device is named CUDA; nothing is allocated on it.)"""
    from types import SimpleNamespace

    from kv_transfer.header import TransferHeader
    from kv_transfer.receiving import ExpectTable
    from kv_transfer.torch_dist.recv_channel import _BlockReceives

    from .helpers import make_cache

    table = ExpectTable(make_cache(None))
    table.add("r", [5, 1, 9], None, None)
    h = TransferHeader.for_blocks("r", table.kv_cache, 3, None, "p", flags=flags)
    entry = table.begin(h, "p")
    assert entry is not None
    group = SimpleNamespace(data_device=torch.device("cuda"))
    receives = _BlockReceives(group, table, entry, h, CONFIG, staging=None)
    assert receives.whole == bool(flags)
