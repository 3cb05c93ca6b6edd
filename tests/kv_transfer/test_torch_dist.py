"""torch_dist over gloo, sender and receiver in one process (threads): the wire protocol."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from kv_transfer import (
    LayoutMismatch,
    PeerClosed,
    TransferAborted,
    TransferConfig,
    TransferTimeout,
    blocks,
)
from kv_transfer.header import DATA, DATA_TAG, TransferHeader
from kv_transfer.torch_dist import PairGroup, TorchDistReceiver, TorchDistSender

from .helpers import LAYERS, Completions, make_cache

# connect_timeout_s well above 5 s: see kv_transfer.torch_dist.tcp_store
CONFIG = TransferConfig(host="127.0.0.1", timeout_s=10.0, connect_timeout_s=20.0)


@pytest.fixture
def make():
    """Factory of senders/receivers on fresh caches; everything is closed at the end."""
    opened: list = []

    def factory(kind: str, config: TransferConfig = CONFIG, seed: int | None = None, **kw):
        cls = TorchDistSender if kind == "sender" else TorchDistReceiver
        cache = make_cache(seed if kind == "sender" else None, **kw)
        obj = cls(config, cache, name=f"{kind}{len(opened)}")
        opened.append(obj)
        return obj

    yield factory
    for obj in opened:  # senders first: their CLOSE ends the receivers' channel threads
        if isinstance(obj, TorchDistSender):
            obj.close()
    for obj in opened:
        if isinstance(obj, TorchDistReceiver):
            obj.close()


@pytest.mark.parametrize("inflight", [1, 2, 3, 8])
def test_received_kv_equals_what_the_sender_gathered(make, inflight):
    config = dataclasses.replace(CONFIG, inflight_messages=inflight)
    sender, receiver = make("sender", config, seed=1), make("receiver", config)
    done = Completions()
    receiver.expect("r1", [9, 3, 14, 0], done)
    stats = sender.send("r1", receiver.endpoint(), [0, 5, 2, 23]).result(timeout=10)
    done.wait_for("r1")
    assert done.errors["r1"] is None
    sent = blocks.gather(sender.kv_cache, [0, 5, 2, 23])
    assert torch.equal(blocks.gather(receiver.kv_cache, [9, 3, 14, 0]), sent)
    assert stats.nbytes == sent.numel() * sent.element_size()
    assert receiver.kv_cache.count_nonzero() == sent.count_nonzero()  # no other block touched


def test_runs_contiguous_on_both_sides_move_as_one_message(make, monkeypatch):
    """With the reserved ids as a hint, spans contiguous in both caches go as one message
    each; a layer range, or a hint that disagrees with the reservation, still lands right
    (per block) or fails that request alone."""
    sender, receiver = make("sender", seed=13), make("receiver")
    data_messages = []
    send = PairGroup.send

    def counting_send(self, tensor, tag):
        data_messages.append(tensor.numel())
        return send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", counting_send)
    done, ep = Completions(), receiver.endpoint()
    src, dst = [3, 4, 5, 9, 10, 17], [12, 13, 14, 15, 16, 2]  # runs: 3, 2, 1
    receiver.expect("runs", dst, done)
    sender.send("runs", ep, src, dst_block_ids=dst).result(timeout=10)
    done.wait_for("runs")
    assert done.errors["runs"] is None
    block_bytes = sender.kv_cache[0].numel() * sender.kv_cache.element_size()
    assert data_messages == [3 * block_bytes, 2 * block_bytes, block_bytes]
    kv_in, kv_out = receiver.kv_cache, sender.kv_cache
    assert torch.equal(blocks.gather(kv_in, dst), blocks.gather(kv_out, src))
    # A layer range is not contiguous across blocks: one message per block.
    data_messages.clear()
    receiver.expect("layers", [20, 21], done)
    sender.send("layers", ep, [0, 1], layers=(0, 1), dst_block_ids=[20, 21])
    sender.send("layers", ep, [0, 1], layers=(1, LAYERS), dst_block_ids=[20, 21])
    done.wait_for("layers")
    assert len(data_messages) == 4 and torch.equal(kv_in[20:22], kv_out[0:2])
    # A hint that is not the reservation: the receiver refuses the runs, the next lands.
    receiver.expect("wrong-hint", [6, 8], done)
    receiver.expect("after", [7], done)
    sender.send("wrong-hint", ep, [11, 12], dst_block_ids=[6, 7]).wait(10)
    sender.send("after", ep, [22], dst_block_ids=[7]).result(timeout=10)
    done.wait_for("wrong-hint", "after")
    assert isinstance(done.errors["wrong-hint"], LayoutMismatch)
    assert "not contiguous" in str(done.errors["wrong-hint"])
    assert done.errors["after"] is None and torch.equal(kv_in[7], kv_out[22])
    assert kv_in[[6, 8]].count_nonzero() == 0


def test_runs_are_capped_in_bytes_and_drained_runs_leave_the_channel_working(
        make, monkeypatch):
    import kv_transfer.torch_dist.sender as sender_module

    sender, receiver = make("sender", seed=15), make("receiver")
    block_bytes = sender.kv_cache[0].numel() * sender.kv_cache.element_size()
    monkeypatch.setattr(sender_module, "MAX_RUN_BYTES", 2 * block_bytes)
    data_messages = []
    send = PairGroup.send

    def counting_send(self, tensor, tag):
        data_messages.append(tensor.numel() // block_bytes)
        return send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", counting_send)
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("aborted", [0, 1, 2, 3, 4], done)
    receiver.expect("capped", [10, 11, 12, 13, 14], done)
    assert receiver.abort("aborted")
    sender.send("aborted", ep, [5, 6, 7, 8, 9], dst_block_ids=[0, 1, 2, 3, 4])  # drained
    sender.send("capped", ep, [5, 6, 7, 8, 9], dst_block_ids=[10, 11, 12, 13, 14])
    done.wait_for("capped")
    assert data_messages == [2, 2, 1, 2, 2, 1] and done.errors["capped"] is None
    kv_in, kv_out = receiver.kv_cache, sender.kv_cache
    assert torch.equal(kv_in[10:15], kv_out[5:10]) and kv_in[0:5].count_nonzero() == 0


def test_a_header_with_an_oversized_run_fails_its_request_and_the_channel(make, monkeypatch):
    """Such a payload could not be drained within bounded staging: the receiver refuses it
    (only a broken sender sends one) instead of allocating its size."""
    import kv_transfer.torch_dist.recv_channel as recv_channel

    receiver = make("receiver")
    block_bytes = receiver.kv_cache[0].numel() * receiver.kv_cache.element_size()
    monkeypatch.setattr(recv_channel, "MAX_RUN_BYTES", block_bytes)
    done = Completions()
    receiver.expect("r1", [3, 4], done)
    group = PairGroup.connect(receiver.endpoint(), CONFIG, "bad", "gloo", torch.device("cpu"))
    try:
        kv = receiver.kv_cache
        header = TransferHeader(DATA, "r1", 2, 0, LAYERS, kv.dtype, tuple(kv.shape[3:]), (2,))
        group.wait(group.send_ctrl(header.encode()), 5, "header")
        done.wait_for("r1")
    finally:
        group.close()
    assert isinstance(done.errors["r1"], PeerClosed) and "bad sender" in str(done.errors["r1"])
    assert kv[3:5].count_nonzero() == 0


def test_a_raising_completion_callback_does_not_end_the_channel(make, caplog):
    sender, receiver = make("sender", seed=14), make("receiver")
    done = Completions()

    def broken(request_id, error):
        raise RuntimeError("bug in on_done")

    ep = receiver.endpoint()
    receiver.expect("first", [1], broken)
    receiver.expect("second", [2], done)
    sender.send("first", ep, [5]).result(timeout=10)
    sender.send("second", ep, [6]).result(timeout=10)
    done.wait_for("second")
    assert done.errors["second"] is None and torch.equal(receiver.kv_cache[2], sender.kv_cache[6])
    assert "on_done of request first raised" in caplog.text


def test_bfloat16_cache_and_layer_range_sends(make):
    sender = make("sender", seed=2, dtype=torch.bfloat16)
    receiver = make("receiver", dtype=torch.bfloat16)
    receiver.expect("r1", [1, 2])
    sender.send("r1", receiver.endpoint(), [7, 8], layers=(0, 1)).result(timeout=10)
    sender.send("r1", receiver.endpoint(), [7, 8], layers=(1, LAYERS)).result(timeout=10)
    done = Completions()
    receiver.expect("marker", [3], done)  # same channel, FIFO: when it is done, r1 is too
    sender.send("marker", receiver.endpoint(), [0]).result(timeout=10)
    done.wait_for("marker")
    assert receiver.poll() == [("r1", None)]
    assert torch.equal(
        blocks.gather(receiver.kv_cache, [1, 2]), blocks.gather(sender.kv_cache, [7, 8])
    )


def test_two_requests_on_one_channel_arrive_in_order(make):
    sender, receiver = make("sender", seed=3), make("receiver")
    done = Completions()
    receiver.expect("big", list(range(0, 16)), done)
    receiver.expect("small", [20], done)
    h1 = sender.send("big", receiver.endpoint(), list(range(8, 24)))
    h2 = sender.send("small", receiver.endpoint(), [1])
    done.wait_for("big", "small")
    assert done.order == ["big", "small"] and h1.wait(5) and h2.wait(5)
    assert len(sender.open_peers()) == 1 and len(receiver.open_peers()) == 1
    src, dst = sender.kv_cache, receiver.kv_cache
    assert torch.equal(blocks.gather(dst, range(16)), blocks.gather(src, range(8, 24)))
    assert torch.equal(dst[20], src[1])


def test_aborted_and_unknown_requests_are_drained_and_the_next_lands(make):
    sender, receiver = make("sender", seed=4), make("receiver")
    done = Completions()
    receiver.expect("aborted", [0, 1, 2], done)
    receiver.expect("next", [5, 6], done)
    assert receiver.abort("aborted") is True
    ep = receiver.endpoint()
    h_aborted = sender.send("aborted", ep, [10, 11, 12])
    h_ghost = sender.send("ghost", ep, [13])  # never expected
    sender.send("next", ep, [3, 4]).result(timeout=10)
    done.wait_for("next")
    assert done.order == ["next"] and done.errors["next"] is None
    assert h_aborted.result(timeout=5).nbytes > 0 and h_ghost.result(timeout=5).nbytes > 0
    dst = receiver.kv_cache
    assert torch.equal(blocks.gather(dst, [5, 6]), blocks.gather(sender.kv_cache, [3, 4]))
    assert blocks.gather(dst, [0, 1, 2]).count_nonzero() == 0  # never scattered


def test_sender_abort_drops_queued_sends_but_never_one_on_the_wire(make):
    """A send whose header is out reads its source blocks until the receiver has taken them:
    an abort then must not complete its handle (the prefill worker would free the blocks
    under the wire). A send still queued behind it is dropped."""
    sender, receiver = make("sender", seed=9), make("receiver")
    done = Completions()
    receiver.expect("warm-up", [0], done)  # opens the channel: the next send posts at once
    sender.send("warm-up", receiver.endpoint(), [1]).result(timeout=30)
    receiver.expect("on-wire", [4, 5], done)
    claim, claimed, proceed = receiver.table.claim, threading.Event(), threading.Event()

    def stalled_claim(entry, spans, layers):  # the receiver is slow to post
        claimed.set()
        assert proceed.wait(20)
        return claim(entry, spans, layers)

    receiver.table.claim = stalled_claim
    try:
        on_wire = sender.send("on-wire", receiver.endpoint(), [2, 3])
        queued = sender.send("queued", receiver.endpoint(), [6])
        assert claimed.wait(10)  # "on-wire"'s header has arrived; its payload is held up
        assert sender.abort("on-wire") is False and not on_wire.done()
        assert sender.abort("queued") is True
    finally:
        proceed.set()
    assert on_wire.result(timeout=10).nbytes > 0
    with pytest.raises(TransferAborted):
        queued.result(timeout=5)
    done.wait_for("on-wire")
    assert torch.equal(receiver.kv_cache[4:6], sender.kv_cache[2:4])


def _header_only_sender(
    endpoint, config, request_id: str, ready: threading.Event, release: threading.Event
) -> None:
    """A live peer that sends a header and then never the payload."""
    group = PairGroup.connect(endpoint, config, "silent", "gloo", torch.device("cpu"))
    kv = make_cache(None)
    header = TransferHeader(DATA, request_id, 1, 0, LAYERS, kv.dtype, tuple(kv.shape[3:]))
    group.wait(group.send_ctrl(header.encode()), 5, "header")
    ready.set()
    release.wait(30)
    group.close()


def _paused_sender(endpoint, config, blocks_to_send, first_sent, resume) -> None:
    """Sends a 3-block payload for "r1" by hand: block 0, then waits for ``resume``."""
    group = PairGroup.connect(endpoint, config, "paused", "gloo", torch.device("cpu"))
    header = TransferHeader(DATA, "r1", len(blocks_to_send), 0, LAYERS,
                            blocks_to_send[0].dtype, tuple(blocks_to_send[0].shape[2:]))
    group.wait(group.send_ctrl(header.encode()), 5, "header")
    for i, block in enumerate(blocks_to_send):
        group.wait(group.send(block.contiguous().view(torch.uint8).view(-1), DATA_TAG), 5, "b")
        if i == 0:
            first_sent.set()
            assert resume.wait(30)
    group.close()


def test_abort_waits_for_receives_into_the_cache_then_nothing_more_lands(make):
    """Blocks are received straight into the reserved blocks: abort must return only once no
    posted receive can write there, so the decode worker may free the blocks at once."""
    config = dataclasses.replace(CONFIG, inflight_messages=1)
    receiver = make("receiver", config)
    payload = make_cache(7)[[3, 4, 5]]  # three blocks of every layer, random values
    done = Completions()
    receiver.expect("r1", [10, 11, 12], done)
    claim, block_1_claimed = receiver.table.claim, threading.Event()

    def spy(entry, spans, layers):  # tells when block 1's receive goes into the cache
        views = claim(entry, spans, layers)
        if any(first <= 1 < first + count for first, count in spans) and views is not None:
            block_1_claimed.set()
        return views

    receiver.table.claim = spy
    first_sent, resume = threading.Event(), threading.Event()
    sender = threading.Thread(target=_paused_sender, args=(
        receiver.endpoint(), config, payload, first_sent, resume))
    sender.start()
    try:
        assert first_sent.wait(20) and block_1_claimed.wait(10)
        aborter = threading.Thread(target=receiver.abort, args=("r1",))
        aborter.start()
        aborter.join(0.5)
        assert aborter.is_alive()  # block 1 is still being received into block 11
        resume.set()
        aborter.join(10)
        assert not aborter.is_alive()
    finally:
        resume.set()
        sender.join(10)
    kv = receiver.kv_cache
    assert torch.equal(kv[10], payload[0]) and torch.equal(kv[11], payload[1])
    # Block 2 arrived after the abort: drained, never written into the (now free) block 12.
    for thread in threading.enumerate():  # the channel ends once the paused sender closed it
        if thread.name.startswith("kv-recv paused"):
            thread.join(5)
    assert kv[12].count_nonzero() == 0
    assert "r1" not in done.errors  # an abort is not reported as an outcome


def test_missing_payload_times_out_and_other_channels_keep_serving(make):
    config = dataclasses.replace(CONFIG, timeout_s=1.5)
    receiver, sender = make("receiver", config), make("sender", config, seed=5)
    done = Completions()
    receiver.expect("warm-up", [3], done)  # opens the healthy channel first
    sender.send("warm-up", receiver.endpoint(), [4]).result(timeout=30)
    receiver.expect("stuck", [0], done)
    receiver.expect("other", [1], done)
    ready, release = threading.Event(), threading.Event()
    silent = threading.Thread(
        target=_header_only_sender, args=(receiver.endpoint(), config, "stuck", ready, release)
    )
    silent.start()
    try:
        assert ready.wait(10)
        t0 = time.monotonic()
        sender.send("other", receiver.endpoint(), [2]).result(timeout=10)
        done.wait_for("other")
        assert "stuck" not in done.errors  # the other channel did not wait for the stuck one
        done.wait_for("stuck", timeout=10)
        waited = time.monotonic() - t0
    finally:
        release.set()
        silent.join(10)
    error = done.errors["stuck"]
    assert isinstance(error, TransferTimeout) and waited < 1.5 + 3
    assert (
        "request stuck" in str(error)
        and "silent" in str(error)
        and "timed out after 1.5 s" in str(error)
    )
    assert torch.equal(receiver.kv_cache[1], sender.kv_cache[2])


def test_lru_cap_closes_the_idle_channel(make):
    config = dataclasses.replace(CONFIG, max_channels=1)
    sender = make("sender", config, seed=6)
    r1, r2 = make("receiver", config), make("receiver", config)
    r1.expect("a", [0])
    sender.send("a", r1.endpoint(), [1]).result(timeout=10)
    [r1_channel] = r1._channels
    r2.expect("b", [0])
    sender.send("b", r2.endpoint(), [2]).result(timeout=10)
    assert sender.open_peers() == [r2.endpoint().describe()]
    r1_channel.thread.join(timeout=10)  # its CLOSE header ended the receiving thread
    assert not r1_channel.thread.is_alive() and r1.open_peers() == []
    r1.expect("c", [3])  # the next use opens a new channel
    sender.send("c", r1.endpoint(), [4]).result(timeout=10)
    assert len(sender.open_peers()) == 1


def test_idle_channel_closes_itself(make):
    config = dataclasses.replace(CONFIG, idle_timeout_s=0.3)
    sender, receiver = make("sender", config, seed=7), make("receiver", config)
    receiver.expect("a", [0])
    sender.send("a", receiver.endpoint(), [1]).result(timeout=10)
    [send_channel] = sender._lru.channels()
    [recv_channel] = receiver._channels
    send_channel.thread.join(timeout=10)
    recv_channel.thread.join(timeout=10)
    assert sender.open_peers() == [] and receiver.open_peers() == []


def test_unreachable_receiver_and_layout_mismatch_fail_clearly(make):
    config = dataclasses.replace(CONFIG, connect_timeout_s=1.0)
    sender, receiver = make("sender", config, seed=8), make("receiver", config)
    endpoint = receiver.endpoint()
    receiver.close()  # its store is gone: nothing listens on the port
    with pytest.raises(PeerClosed, match="request a: .*receiver.*cannot connect"):
        sender.send("a", endpoint, [0]).result(timeout=10)
    wrong = dataclasses.replace(endpoint, dtype="bfloat16")
    with pytest.raises(LayoutMismatch):
        sender.send("b", wrong, [0]).result(timeout=1)


def test_receiver_close_fails_expected_requests(make):
    receiver = make("receiver")
    done = Completions()
    receiver.expect("a", [0], done)
    receiver.close()
    assert isinstance(done.errors["a"], PeerClosed) and "receiver closed" in str(done.errors["a"])
