"""The loopback backend and the receiver bookkeeping every backend shares."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import (
    LayoutMismatch,
    PeerClosed,
    TransferAborted,
    TransferConfig,
    TransferTimeout,
    blocks,
    make_receiver,
    make_sender,
)
from kv_transfer.header import DATA, TransferHeader
from kv_transfer.loopback import Fault, LoopbackHub
from kv_transfer.receiving import ExpectTable

from .helpers import LAYERS, Completions, make_cache

CONFIG = TransferConfig(backend="loopback", timeout_s=0.3)


@pytest.fixture
def pair():
    """(hub, sender, receiver, src cache, dst cache) on a fresh hub."""
    faults = {"slow": Fault("delay", 0.3), "lost": Fault("drop"), "broken": Fault("fail")}
    hub = LoopbackHub(faults)
    src, dst = make_cache(1), make_cache(None)
    sender = make_sender(CONFIG, src, hub=hub, name="p0")
    receiver = make_receiver(CONFIG, dst, hub=hub, name="d0")
    yield hub, sender, receiver, src, dst
    sender.close()
    receiver.close()
    hub.close()


def test_received_equals_sent_on_dst_blocks(pair):
    _, sender, receiver, src, dst = pair
    done = Completions()
    receiver.expect("r1", [9, 3, 14], done)
    stats = sender.send("r1", receiver.endpoint(), [0, 5, 2]).result(timeout=5)
    done.wait_for("r1")
    assert done.errors["r1"] is None
    assert torch.equal(blocks.gather(dst, [9, 3, 14]), blocks.gather(src, [0, 5, 2]))
    assert stats.nbytes == blocks.gather(src, [0, 5, 2]).numel() * 4
    assert dst.count_nonzero() == blocks.gather(dst, [9, 3, 14]).count_nonzero()  # nothing else


def test_layer_ranges_complete_the_request_when_all_arrived(pair):
    _, sender, receiver, src, dst = pair
    receiver.expect("r1", [1, 2])  # poll mode
    sender.send("r1", receiver.endpoint(), [7, 8], layers=(0, 1)).result(timeout=5)
    assert receiver.poll() == []  # layers 1.. still missing
    sender.send("r1", receiver.endpoint(), [7, 8], layers=(1, LAYERS)).result(timeout=5)
    assert receiver.poll() == [("r1", None)]
    assert torch.equal(blocks.gather(dst, [1, 2]), blocks.gather(src, [7, 8]))


def test_abort_before_arrival_discards_the_payload(pair):
    _, sender, receiver, _, dst = pair
    done = Completions()
    receiver.expect("slow", [4, 5], done)  # delivered after 0.3 s
    handle = sender.send("slow", receiver.endpoint(), [0, 1])
    assert receiver.abort("slow") is True
    handle.wait(timeout=5)
    assert dst.count_nonzero() == 0 and done.order == [] and receiver.poll() == []
    assert receiver.abort("slow") is False


def test_abort_after_arrival_is_a_no_op(pair):
    _, sender, receiver, src, dst = pair
    receiver.expect("r1", [4])
    sender.send("r1", receiver.endpoint(), [0]).result(timeout=5)
    assert receiver.abort("r1") is False
    assert receiver.poll() == [("r1", None)]
    assert torch.equal(dst[4], src[0])


def test_dropped_payload_fails_the_sender_after_the_timeout(pair):
    _, sender, receiver, _, dst = pair
    done = Completions()
    receiver.expect("lost", [4], done)
    handle = sender.send("lost", receiver.endpoint(), [0])
    with pytest.raises(TransferTimeout, match=r"request lost: .*d0.*timed out after 0.3 s"):
        handle.result(timeout=5)
    assert done.order == [] and dst.count_nonzero() == 0  # the receiver's owner must abort
    assert receiver.abort("lost") is True


def test_failed_link_fails_both_sides(pair):
    _, sender, receiver, _, dst = pair
    done = Completions()
    receiver.expect("broken", [4], done)
    handle = sender.send("broken", receiver.endpoint(), [0])
    with pytest.raises(PeerClosed, match="injected failure"):
        handle.result(timeout=5)
    done.wait_for("broken")
    assert isinstance(done.errors["broken"], PeerClosed) and dst.count_nonzero() == 0


def test_sender_abort_drops_a_queued_send(pair):
    _, sender, receiver, _, _ = pair
    receiver.expect("slow", [1])
    receiver.expect("r2", [2])
    first = sender.send("slow", receiver.endpoint(), [0])  # holds the link for 0.3 s
    second = sender.send("r2", receiver.endpoint(), [3])
    assert sender.abort("r2") is True
    with pytest.raises(TransferAborted):
        second.result(timeout=5)
    first.result(timeout=5)
    assert receiver.poll() == [("slow", None)]


def test_layout_mismatch_and_unknown_peer_fail_at_once(pair):
    hub, sender, receiver, _, _ = pair
    other = make_receiver(CONFIG, make_cache(None, torch.bfloat16), hub=hub, name="d-bf16")
    with pytest.raises(LayoutMismatch, match="float32 != receiver cache"):
        sender.send("r1", other.endpoint(), [0]).result(timeout=1)
    other.close()
    gone = make_receiver(CONFIG, make_cache(None), hub=hub, name="d-gone")
    gone.close()
    with pytest.raises(PeerClosed, match="no such receiver"):
        sender.send("r1", gone.endpoint(), [0]).result(timeout=5)


def test_receiver_close_fails_expected_requests(pair):
    _, _, receiver, _, _ = pair
    done = Completions()
    receiver.expect("r1", [1], done)
    receiver.close()
    assert isinstance(done.errors["r1"], PeerClosed)
    receiver.expect("r2", [2], done)  # refused at once with the same error
    assert "receiver closed" in str(done.errors["r2"])


def test_expect_table_abort_between_arrival_and_scatter_wins():
    kv = make_cache(None)
    table = ExpectTable(kv)
    table.add("r1", [3, 4], None)
    header = TransferHeader(DATA, "r1", 2, 0, LAYERS, kv.dtype, tuple(kv.shape[3:]))
    entry = table.begin(header, "peer")
    assert entry is not None
    assert table.abort("r1") is True  # e.g. the client cancelled while bytes were in flight
    assert table.write(entry, (0, LAYERS), torch.ones(2, LAYERS, *kv.shape[2:])) is False
    table.finish(entry, (0, LAYERS))
    assert kv.count_nonzero() == 0 and table.poll() == []


def test_expect_table_rejects_a_payload_that_does_not_match_the_reservation():
    kv = make_cache(None)
    table = ExpectTable(kv)
    table.add("r1", [3, 4], None)
    header = TransferHeader(DATA, "r1", 3, 0, LAYERS, kv.dtype, tuple(kv.shape[3:]))
    assert table.begin(header, "p0 (pair 1)") is None  # drained by the caller
    [(rid, error)] = table.poll()
    assert rid == "r1" and isinstance(error, LayoutMismatch)
    assert "3 blocks sent, 2 reserved" in str(error) and "p0 (pair 1)" in str(error)
    with pytest.raises(ValueError, match="already expected"):
        table.add("r2", [1], None) or table.add("r2", [1], None)
