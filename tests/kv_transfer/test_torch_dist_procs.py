"""torch_dist over gloo between two processes: data, order, and a sender dying mid-stream."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from kv_transfer import PeerClosed, TransferConfig, blocks
from kv_transfer.torch_dist import TorchDistReceiver, TorchDistSender

from .helpers import Completions, make_cache
from .procs import dying_sender_main, sender_main

# timeout_s is long: a death must be seen from the closed socket, well before it.
CONFIG = TransferConfig(host="127.0.0.1", timeout_s=30.0, connect_timeout_s=20.0)
CTX = mp.get_context("spawn")


@pytest.fixture
def receiver():
    rx = TorchDistReceiver(CONFIG, make_cache(None), name="decode-main")
    yield rx
    rx.close()


def test_two_processes_round_trip_in_order(receiver):
    done = Completions()
    sends = [("big", list(range(4, 24))), ("small", [0])]
    receiver.expect("big", list(range(20)), done)
    receiver.expect("small", [22], done)
    results = CTX.Queue()
    child = CTX.Process(target=sender_main, args=(receiver.endpoint(), CONFIG, 11, sends, results))
    child.start()
    try:
        outcomes = results.get(timeout=60)
    finally:
        child.join(timeout=30)
    assert outcomes == [("big", True, None), ("small", True, None)]
    done.wait_for("big", "small")
    assert done.order == ["big", "small"] and done.errors == {"big": None, "small": None}
    src = make_cache(11)  # the child's cache, rebuilt from its seed
    dst = receiver.kv_cache
    assert torch.equal(blocks.gather(dst, range(20)), blocks.gather(src, range(4, 24)))
    assert torch.equal(dst[22], src[0])


def test_sender_dying_mid_stream_fails_its_request_and_others_still_land(receiver):
    done = Completions()
    receiver.expect("doomed", [0, 1], done)
    child = CTX.Process(target=dying_sender_main, args=(receiver.endpoint(), CONFIG, "doomed", 2))
    t0 = time.monotonic()
    child.start()
    done.wait_for("doomed", timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 3
    error = done.errors["doomed"]
    assert isinstance(error, PeerClosed) and "request doomed" in str(error)
    assert "dying-prefill" in str(error) and "peer closed or died" in str(error)
    assert time.monotonic() - t0 < CONFIG.timeout_s  # includes the child's start-up
    sender = TorchDistSender(CONFIG, make_cache(12), name="healthy-prefill")
    try:
        receiver.expect("fine", [5], done)
        sender.send("fine", receiver.endpoint(), [7]).result(timeout=20)
        done.wait_for("fine")
    finally:
        sender.close()
    assert done.errors["fine"] is None
    assert torch.equal(receiver.kv_cache[5], sender.kv_cache[7])
