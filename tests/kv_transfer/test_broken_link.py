"""A pair channel whose TCP link really breaks (its sockets shut down under it): the requests
on it fail at once on both sides, and the next transfer to the same receiver lands on a new
channel (nothing waits for a deadline)."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
import torch

from kv_transfer import TransferConfig
from kv_transfer.torch_dist import TorchDistReceiver, TorchDistSender

from .helpers import Completions, make_cache

CONFIG = TransferConfig(host="127.0.0.1", timeout_s=20.0, connect_timeout_s=20.0)


@pytest.fixture
def pair():
    sender = TorchDistSender(CONFIG, make_cache(1), name="sender")
    receiver = TorchDistReceiver(CONFIG, make_cache(None), name="receiver")
    yield sender, receiver
    sender.close()
    receiver.close()


def _break_links(store_port: int) -> int:
    """Shut down this process's TCP connections on loopback except the TCPStore's: the
    gloo pair sockets of the open channels."""
    broken = 0
    for conn in psutil.Process().net_connections("tcp"):
        if (conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.fd >= 0
                and store_port not in (conn.laddr.port, conn.raddr.port)):
            try:
                sock = socket.socket(fileno=os.dup(conn.fd))
            except OSError:  # closed since it was listed (a short-lived store connection)
                continue
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            broken += 1
    return broken


@pytest.mark.parametrize("announced", [False, True], ids=["plain", "announced"])
def test_after_a_broken_link_the_next_request_lands_on_a_new_channel(pair, announced):
    sender, receiver = pair
    ep = receiver.endpoint()
    done = Completions()
    receiver.expect("warm", [1, 2], done)
    sender.send("warm", ep, [3, 4], dst_block_ids=[1, 2]).result(timeout=10)
    done.wait_for("warm")
    assert _break_links(ep.port) >= 1

    start = time.monotonic()
    receiver.expect("next", [5, 6], done)
    if announced:
        sender.announce("next", ep, [7, 8], [5, 6])
    handle = sender.send("next", ep, [7, 8], dst_block_ids=[5, 6])
    try:
        handle.result(timeout=15)
    except Exception as exc:  # a failure is acceptable only if the receiver hears of it too
        done.wait_for("next", timeout=5)
        pytest.fail(f"the next transfer failed instead of using a new channel: {exc!r}; "
                    f"receiver: {done.errors.get('next')!r}")
    done.wait_for("next", timeout=10)
    assert done.errors["next"] is None
    assert torch.equal(receiver.kv_cache[5:7], sender.kv_cache[7:9])
    assert time.monotonic() - start < 5.0  # no deadline was waited for
