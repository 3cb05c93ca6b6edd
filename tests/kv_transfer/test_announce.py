"""torch_dist announced payloads: receives posted before the KV exists, settled exactly once
by the payload or a retraction (see kv_transfer.torch_dist.send_channel)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from kv_transfer import TransferConfig, blocks
from kv_transfer.header import DATA_TAG
from kv_transfer.torch_dist import PairGroup, TorchDistReceiver, TorchDistSender

from .helpers import Completions, make_cache

CONFIG = TransferConfig(host="127.0.0.1", timeout_s=10.0, connect_timeout_s=20.0)


@pytest.fixture
def make():
    opened: list = []

    def factory(kind: str, config: TransferConfig = CONFIG, seed: int | None = None):
        cls = TorchDistSender if kind == "sender" else TorchDistReceiver
        cache = make_cache(seed if kind == "sender" else None)
        obj = cls(config, cache, name=f"{kind}{len(opened)}")
        opened.append(obj)
        return obj

    yield factory
    for obj in opened:
        if isinstance(obj, TorchDistSender):
            obj.close()
    for obj in opened:
        if isinstance(obj, TorchDistReceiver):
            obj.close()


@pytest.fixture
def wire(monkeypatch):
    """Every data message posted by a sender: (tag, bytes)."""
    sent: list[tuple[int, int]] = []
    send = PairGroup.send

    def recording_send(self, tensor, tag):
        sent.append((tag, tensor.numel()))
        return send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", recording_send)
    return sent


def handled_in_order(sender, receiver, done: Completions, name: str, src: int, dst: int) -> None:
    """Send a plain one-block request and wait for it: the receiver handles a channel's
    headers in order, so everything the sender put on the channel before it was handled."""
    receiver.expect(name, [dst], done)
    sender.send(name, receiver.endpoint(), [src]).result(timeout=10)
    done.wait_for(name)
    assert done.errors[name] is None


def test_announced_payloads_land_on_their_own_tags(make, wire):
    sender, receiver = make("sender", seed=3), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    block_bytes = sender.kv_cache[0].numel() * sender.kv_cache.element_size()
    requests = {"run": ([2, 3, 4, 5], [10, 11, 12, 13]), "scattered": ([20, 7, 1], [4, 17, 0])}
    for rid, (src, dst) in requests.items():
        receiver.expect(rid, dst, done)
        assert sender.announce(rid, ep, src, dst)
    handled_in_order(sender, receiver, done, "sync", 23, 23)  # the receives are posted now
    assert receiver.table.claimed_blocks("run") == 4
    assert receiver.table.claimed_blocks("scattered") == 3
    wire.clear()
    for rid, (src, dst) in requests.items():
        sender.send(rid, ep, src, dst_block_ids=dst).result(timeout=10)
    done.wait_for(*requests)
    for rid, (src, dst) in requests.items():
        assert done.errors[rid] is None
        assert torch.equal(blocks.gather(receiver.kv_cache, dst),
                           blocks.gather(sender.kv_cache, src))
        assert receiver.table.claimed_blocks(rid) == 0
    tags = [tag for tag, _ in wire]
    assert [n // block_bytes for _, n in wire] == [4, 1, 1, 1]  # the run as one message
    assert DATA_TAG not in tags and len(set(tags[:1])) == 1 and len(set(tags[1:])) == 1
    assert tags[0] != tags[1]


@pytest.mark.parametrize("cap_blocks, by_caller", [(None, True), (2, False), (0, False)])
def test_an_idle_channel_lets_the_caller_post_an_announced_payload_up_to_the_cap(
    make, monkeypatch, cap_blocks, by_caller
):
    """No hand-off to the channel thread before the first byte (see SenderChannel), for a
    payload up to ``inline_send_bytes``; over it (or with 0) the channel thread posts."""
    block_bytes = make_cache()[0].numel() * make_cache().element_size()
    config = CONFIG if cap_blocks is None else dataclasses.replace(
        CONFIG, inline_send_bytes=cap_blocks * block_bytes)
    sender, receiver = make("sender", config, seed=4), make("receiver")
    posters: list[str] = []
    send = PairGroup.send

    def recording_send(self, tensor, tag):
        posters.append(threading.current_thread().name)
        return send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", recording_send)
    done, ep = Completions(), receiver.endpoint()
    src, dst = [3, 8, 15], [0, 5, 9]
    receiver.expect("r", dst, done)
    assert sender.announce("r", ep, src, dst)
    handled_in_order(sender, receiver, done, "sync", 20, 20)  # posted; the channel idles
    posters.clear()
    sender.send("r", ep, src, dst_block_ids=dst).result(timeout=10)
    done.wait_for("r")
    assert done.errors["r"] is None
    assert torch.equal(blocks.gather(receiver.kv_cache, dst), blocks.gather(sender.kv_cache, src))
    assert len(posters) == 3
    if by_caller:
        assert set(posters) == {threading.current_thread().name}
    else:
        assert all(name.startswith("kv-send") for name in posters), posters


def test_deferred_writes_hold_the_payload_until_the_outermost_context_ends(make, wire):
    sender, receiver = make("sender", seed=6), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("r", [1, 2], done)
    assert sender.announce("r", ep, [4, 9], [1, 2])
    handled_in_order(sender, receiver, done, "sync", 20, 20)  # posted; the channel idles
    wire.clear()
    with sender.deferred_writes():
        with sender.deferred_writes():  # nested: only the outermost one writes
            handle = sender.send("r", ep, [4, 9], dst_block_ids=[1, 2])
        # Left to this thread: the channel thread does not take it meanwhile.
        assert not handle.wait(0.3)
        assert wire == []
    handle.result(timeout=10)
    done.wait_for("r")
    assert done.errors["r"] is None and len(wire) == 2
    assert torch.equal(blocks.gather(receiver.kv_cache, [1, 2]),
                       blocks.gather(sender.kv_cache, [4, 9]))


def test_an_announced_payloads_messages_are_made_when_it_is_announced(make, monkeypatch):
    """A view into the cache per message costs microseconds on the transfer's critical path:
    an announced payload's are made a forward pass ahead, at ``announce``, and its ``send``
    makes none. A send of other blocks than announced makes its own."""
    sender, receiver = make("sender", seed=8), make("receiver")
    made: list[int] = []
    view = blocks.BlockViews.__call__

    def counting(self, block_id, *args, **kwargs):
        if self._bytes.data_ptr() == sender.kv_cache.data_ptr():  # not the receiver's
            made.append(block_id)
        return view(self, block_id, *args, **kwargs)

    monkeypatch.setattr(blocks.BlockViews, "__call__", counting)
    done, ep = Completions(), receiver.endpoint()
    src, dst = [4, 9, 10, 17], [1, 2, 3, 8]  # messages: [4], [9, 10] (a run), [17]
    receiver.expect("r", dst, done)
    assert sender.announce("r", ep, src, dst)
    assert made == [4, 9, 17]
    made.clear()
    sender.send("r", ep, src, dst_block_ids=dst).result(timeout=10)
    done.wait_for("r")
    assert done.errors["r"] is None and made == []
    assert torch.equal(blocks.gather(receiver.kv_cache, dst), blocks.gather(sender.kv_cache, src))
    other = [20, 3, 5, 11]  # announced as src, sent from other blocks: retracted, sent plain
    receiver.expect("s", dst, done)
    assert sender.announce("s", ep, src, dst)
    made.clear()
    sender.send("s", ep, other, dst_block_ids=dst).result(timeout=10)
    done.wait_for("s")
    assert done.errors["s"] is None and sorted(made) == sorted(other)
    assert torch.equal(blocks.gather(receiver.kv_cache, dst),
                       blocks.gather(sender.kv_cache, other))


def test_receiver_abort_waits_for_the_retraction_then_the_blocks_are_reusable(make, wire):
    sender, receiver = make("sender", seed=5), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("gone", [6, 7, 8], done)
    assert sender.announce("gone", ep, [1, 2, 3], [6, 7, 8])
    handled_in_order(sender, receiver, done, "sync", 0, 0)
    assert receiver.table.claimed_blocks("gone") == 3
    returned = threading.Event()
    aborter = threading.Thread(target=lambda: (receiver.abort("gone"), returned.set()))
    aborter.start()
    # The receives still write into blocks 6-8 until the sender settles the announcement.
    assert not returned.wait(0.3)
    sender.abort("gone")  # its RETRACT: a 1-byte message completes the run's receive
    assert returned.wait(5), "the receiver's abort did not return after the retraction"
    aborter.join()
    assert "gone" not in done.errors  # aborted: no completion is reported
    assert [n for tag, n in wire if tag != DATA_TAG] == [1]
    # The blocks can be reserved again: announced and plain payloads land in them.
    receiver.expect("again", [6, 7, 8], done)
    assert sender.announce("again", ep, [9, 10, 11], [6, 7, 8])
    sender.send("again", ep, [9, 10, 11], dst_block_ids=[6, 7, 8]).result(timeout=10)
    done.wait_for("again")
    assert done.errors["again"] is None
    assert torch.equal(receiver.kv_cache[6:9], sender.kv_cache[9:12])


def test_a_send_of_other_blocks_than_announced_is_retracted_and_sent_plain(make, wire):
    sender, receiver = make("sender", seed=7), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    dst, src = [12, 13, 14, 15], [0, 5, 2, 23]  # one announced run, other sources sent
    receiver.expect("r", dst, done)
    assert sender.announce("r", ep, [1, 2, 3, 4], dst)
    sender.send("r", ep, src, dst_block_ids=dst).result(timeout=10)
    done.wait_for("r")
    assert done.errors["r"] is None
    assert torch.equal(blocks.gather(receiver.kv_cache, dst), blocks.gather(sender.kv_cache, src))
    retracted = [n for tag, n in wire if tag != DATA_TAG]
    assert retracted == [1]  # one fill for the one announced message
    assert len([n for tag, n in wire if tag == DATA_TAG]) == 4


def test_announcements_nobody_expects_are_drained_and_the_channel_goes_on(make):
    sender, receiver = make("sender", seed=9), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    assert sender.announce("ghost", ep, [3, 4], [1, 2])  # never expected: nothing posted
    sender.send("ghost", ep, [3, 4], dst_block_ids=[1, 2]).result(timeout=10)
    assert sender.announce("ghost2", ep, [6], [5])
    sender.abort("ghost2")
    receiver.expect("late", [1, 2], done)  # expected after its announcement went by
    assert sender.announce("late", ep, [7, 8], [1, 2]) is True
    sender.send("late", ep, [7, 8], dst_block_ids=[1, 2]).result(timeout=10)
    handled_in_order(sender, receiver, done, "after", 9, 9)
    done.wait_for("late")
    assert done.errors["late"] is None and torch.equal(receiver.kv_cache[1:3],
                                                       sender.kv_cache[7:9])
    assert receiver.kv_cache[[0, 3, 4, 5]].count_nonzero() == 0  # nothing else landed


def test_an_announcement_keeps_its_channel_open_under_the_lru_cap(make, wire):
    config = dataclasses.replace(CONFIG, max_channels=1)
    sender = make("sender", config, seed=11)
    receiver, other = make("receiver"), make("receiver")
    done = Completions()
    receiver.expect("r", [3, 4], done)
    assert sender.announce("r", receiver.endpoint(), [5, 6], [3, 4])
    handled_in_order(sender, other, done, "elsewhere", 1, 1)  # over the cap: not closed
    assert len(sender.open_peers()) == 2
    wire.clear()
    sender.send("r", receiver.endpoint(), [5, 6], dst_block_ids=[3, 4]).result(timeout=10)
    done.wait_for("r")
    assert done.errors["r"] is None and torch.equal(receiver.kv_cache[3:5], sender.kv_cache[5:7])
    assert len(wire) == 1 and wire[0][0] != DATA_TAG  # as announced
    handled_in_order(sender, other, done, "elsewhere2", 2, 2)  # now the idle one closes
    assert sender.open_peers() == [other.endpoint().describe()]


def test_a_channel_that_ends_drops_its_announced_receives_and_a_new_one_sends_plain(
        make, wire):
    config = dataclasses.replace(CONFIG, idle_timeout_s=0.5)
    sender, receiver = make("sender", config, seed=11), make("receiver", config)
    done = Completions()
    receiver.expect("r", [3, 4], done)
    assert sender.announce("r", receiver.endpoint(), [5, 6], [3, 4])
    handled_in_order(sender, receiver, done, "sync", 0, 0)
    assert receiver.table.claimed_blocks("r") == 2
    (channel,) = sender._lru.channels()
    channel.thread.join(timeout=10)  # idle: it sends CLOSE and ends
    assert not channel.thread.is_alive()
    returned = threading.Event()
    threading.Thread(target=lambda: (receiver.abort("r"), returned.set())).start()
    assert returned.wait(5), "the ended channel did not release its posted receives"
    receiver.expect("r2", [3, 4], done)
    wire.clear()
    sender.send("r2", receiver.endpoint(), [5, 6], dst_block_ids=[3, 4]).result(timeout=10)
    done.wait_for("r2")
    assert done.errors["r2"] is None
    assert torch.equal(receiver.kv_cache[3:5], sender.kv_cache[5:7])
    assert [tag for tag, _ in wire] == [DATA_TAG]  # unannounced, on a new channel


def test_no_announcement_over_nccl_or_for_a_bad_layout(make):
    sender, receiver = make("sender", seed=1), make("receiver")
    ep = receiver.endpoint()
    assert not sender.announce("bad", dataclasses.replace(ep, dtype="float16"), [1], [1])
    assert not sender.announce("bad", ep, [1, 2], [1])  # not as many blocks on both sides
    assert not sender.announce("bad", ep, [1, 1], [1, 2])  # a block twice
    nccl = make("sender", dataclasses.replace(CONFIG, wire="nccl"), seed=1)
    assert not nccl.announce("r", ep, [1], [1])


def test_random_mix_of_announced_plain_retracted_and_aborted_requests(make):
    """A seeded mix on one channel: every request that is neither aborted nor retracted
    lands exactly; every receiver abort returns; no block stays claimed."""
    import random

    rng = random.Random(0)
    sender, receiver = make("sender", seed=21), make("receiver")
    done, ep = Completions(), receiver.endpoint()
    num_blocks = sender.kv_cache.shape[0]
    landed: dict[str, tuple[list[int], list[int]]] = {}
    for i in range(60):
        rid, n = f"r{i}", rng.randint(1, 4)
        src = rng.sample(range(num_blocks), n)
        dst = sorted(rng.sample(range(num_blocks), n)) if rng.random() < 0.5 else \
            rng.sample(range(num_blocks), n)
        receiver.expect(rid, dst, done)  # each request is settled before the next reserves
        announced = rng.random() < 0.7 and sender.announce(rid, ep, src, dst)
        fate = rng.choice(["send", "send", "sender-abort", "receiver-abort"])
        if fate == "send":
            sender.send(rid, ep, src, dst_block_ids=dst).result(timeout=10)
            done.wait_for(rid)
            assert done.errors[rid] is None, (rid, announced, done.errors[rid])
            landed[rid] = (src, dst)
            assert torch.equal(blocks.gather(receiver.kv_cache, dst),
                               blocks.gather(sender.kv_cache, src))
        elif fate == "sender-abort":
            sender.abort(rid)  # retracts an announcement; the receiver still expects rid
            assert receiver.abort(rid) is True
        else:
            aborter = threading.Thread(target=receiver.abort, args=(rid,))
            aborter.start()
            sender.abort(rid)  # settles the announcement the receiver's abort waits for
            aborter.join(timeout=5)
            assert not aborter.is_alive(), f"receiver abort of {rid} did not return"
        assert receiver.table.claimed_blocks(rid) == 0
    assert len(landed) > 10
