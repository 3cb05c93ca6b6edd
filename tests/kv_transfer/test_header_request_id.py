"""A request id too long for the transfer header fails that request alone, at once.

Before: ``TransferHeader.encode`` raised ``ValueError`` on the channel's sending thread, which
broke the pair channel, so every other request on it failed (issue 12, item 2: a ~600-byte
``request_id`` made unrelated requests fail after the KV deadline)."""

from __future__ import annotations

import pytest
import torch

from kv_transfer import TransferConfig, TransferError, blocks
from kv_transfer.header import MAX_REQUEST_ID_BYTES, RequestIdTooLong, TransferHeader
from kv_transfer.torch_dist import TorchDistReceiver, TorchDistSender

from .helpers import Completions, make_cache

CONFIG = TransferConfig(host="127.0.0.1", timeout_s=5.0, connect_timeout_s=20.0)


def test_header_refuses_a_request_id_that_does_not_fit():
    cache = make_cache(0)
    ok = "r" * MAX_REQUEST_ID_BYTES
    assert TransferHeader.decode(TransferHeader.for_blocks(ok, cache, 1, None, "peer").encode())
    with pytest.raises(RequestIdTooLong, match="request id of 600 bytes") as err:
        TransferHeader.for_blocks("x" * 600, cache, 1, None, "peer")
    assert isinstance(err.value, TransferError)
    assert "xxx" not in str(err.value)[60:]  # the id is not echoed in full


@pytest.mark.timeout(60)
def test_a_600_byte_request_id_fails_alone_and_other_requests_flow():
    sender = TorchDistSender(CONFIG, make_cache(3), name="sender")
    receiver = TorchDistReceiver(CONFIG, make_cache(None), name="receiver")
    try:
        done, ep = Completions(), receiver.endpoint()
        receiver.expect("before", [1, 2], done)
        assert sender.send("before", ep, [4, 5]).result(timeout=10) is not None
        long_id = "x" * 600
        handle = sender.send(long_id, ep, [6, 7])
        with pytest.raises(RequestIdTooLong):
            handle.result(timeout=1)  # failed at once, not on the channel thread
        for i in range(3):  # the channel is intact: later requests land
            rid = f"after{i}"
            receiver.expect(rid, [10 + i], done)
            sender.send(rid, ep, [8 + i]).result(timeout=10)
        done.wait_for("before", "after0", "after1", "after2")
        assert all(done.errors[r] is None for r in ("before", "after0", "after1", "after2"))
        assert torch.equal(blocks.gather(receiver.kv_cache, [12]),
                           blocks.gather(sender.kv_cache, [10]))
    finally:
        sender.close()
        receiver.close()


@pytest.mark.timeout(60)
def test_requests_queued_beside_a_600_byte_id_all_land():
    """The issue's case: sends queued on the same channel before and after the bad one.
    Before, the requests behind it never reached the receiver (they timed out)."""
    sender = TorchDistSender(CONFIG, make_cache(3), name="sender")
    receiver = TorchDistReceiver(CONFIG, make_cache(None), name="receiver")
    try:
        done, ep = Completions(), receiver.endpoint()
        receiver.expect("warm", [0], done)
        sender.send("warm", ep, [0]).result(timeout=10)  # the channel is open
        rids = [f"n{i}" for i in range(6)]
        for i, rid in enumerate(rids):
            receiver.expect(rid, [2 + i], done)
        handles = []
        for i, rid in enumerate(rids):  # queued without waiting, the bad one in the middle
            handles.append(sender.send(rid, ep, [2 + i]))
            if i == 2:
                bad = sender.send("x" * 600, ep, [20])
        with pytest.raises(RequestIdTooLong):
            bad.result(timeout=1)
        for handle in handles:
            handle.result(timeout=10)
        done.wait_for(*rids, timeout=15)
        assert all(done.errors[r] is None for r in rids)
    finally:
        sender.close()
        receiver.close()
