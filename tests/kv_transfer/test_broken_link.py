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

from .helpers import LAYERS, Completions, make_cache

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


def test_a_send_mid_write_when_the_link_breaks_holds_up_nothing():
    """gloo never fails a send whose bytes are being written when its socket breaks (its
    wait lasts the whole timeout). The sender's link watch notices the break at once: the
    send behind it lands on a new channel in seconds, not after the 20 s timeout, and the
    send that was on the wire ends on both sides at once. The receiver is another process,
    stopped (SIGSTOP) while an announced payload is being written to it, larger than the
    kernel's socket buffers of both ends can hold (``_head_dim_beyond_socket_buffers``),
    so that the write is surely mid-way when the sender's sockets are shut down."""
    import multiprocessing
    import signal

    from .procs import receiver_main

    # 4 blocks (the payload on the wire) of float32 [LAYERS, 2, 16, 2, head_dim]
    shape = (8, LAYERS, 2, 16, 2, _head_dim_beyond_socket_buffers(4 * LAYERS * 2 * 16 * 2 * 4))
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=receiver_main, args=(CONFIG, shape, theirs), daemon=True)
    child.start()
    sender = TorchDistSender(CONFIG, torch.randn(shape), name="sender")
    try:
        _, ep, pid = ours.recv()
        outcomes: dict[str, str | None] = {}

        def expect(request_id: str, ids: list[int]) -> None:
            ours.send(("expect", request_id, ids))
            assert ours.recv() == ("expected", request_id)

        def outcome(request_id: str, timeout: float) -> str | None:
            deadline = time.monotonic() + timeout
            while request_id not in outcomes:
                assert ours.poll(max(0.0, deadline - time.monotonic())), \
                    f"no outcome for {request_id} within {timeout} s"
                _, rid, error = ours.recv()
                outcomes[rid] = error
            return outcomes[request_id]

        expect("big", [0, 1, 2, 3])
        assert sender.announce("big", ep, [4, 5, 6, 7], [0, 1, 2, 3])
        expect("sync", [7])  # behind the announcement: once in, the receives are posted
        sender.send("sync", ep, [0], dst_block_ids=[7]).result(timeout=10)
        assert outcome("sync", 10) is None

        os.kill(pid, signal.SIGSTOP)
        try:
            big = sender.send("big", ep, [4, 5, 6, 7], dst_block_ids=[0, 1, 2, 3])
            _wait_for_unsent_bytes(pid)  # the write is under way, and cannot finish
            assert not big.done()
            assert _break_links_to(pid, ep.port) >= 1
        finally:
            os.kill(pid, signal.SIGCONT)

        start = time.monotonic()
        expect("next", [5, 6])
        handle = sender.send("next", ep, [0, 1], dst_block_ids=[5, 6])
        handle.result(timeout=10)
        assert outcome("next", 10) is None
        assert time.monotonic() - start < 5.0  # not the 20 s timeout of the send on the wire
        # The send on the wire ends at once too: sent again on the new channel, it either
        # lands (whole) or finds the request failed by the broken channel's end.
        assert big.wait(timeout=5.0)
        landed = outcome("big", 5.0) is None
        ours.send(("blocks", [0, 1, 2, 3, 5, 6]))
        _, got = ours.recv()
        assert torch.equal(got[4:], sender.kv_cache[[0, 1]])
        assert torch.equal(got[:4], sender.kv_cache[[4, 5, 6, 7]]) or not landed
    finally:
        sender.close()
        child.kill()
        child.join(10)


def _head_dim_beyond_socket_buffers(bytes_per_dim: int) -> int:
    """A head_dim at which ``bytes_per_dim * head_dim`` bytes exceed twice what the kernel
    may buffer in a TCP connection's two ends (tcp_rmem and tcp_wmem maxima: autotuned, up
    to 32 MiB on a receiver here, where a 12 MiB payload was once wholly buffered and its
    send complete before the receiver, stopped, had read a byte)."""
    limits = 0
    for table in ("/proc/sys/net/ipv4/tcp_rmem", "/proc/sys/net/ipv4/tcp_wmem"):
        with open(table) as f:
            limits += int(f.read().split()[2])
    return max(4096, -(-2 * limits // bytes_per_dim // 1024) * 1024)


def _wait_for_unsent_bytes(pid: int, timeout: float = 10.0) -> None:
    """Until the kernel holds bytes this process wrote to process ``pid`` and that it has
    not taken (``tx_queue`` of the connection in /proc/net/tcp): a write under way. Polled:
    no event tells another process's socket state."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")}
    ours = {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port in ports}
    deadline = time.monotonic() + timeout
    while True:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for row in f.read().splitlines()[1:]:
                    local, queues = row.split()[1], row.split()[4]
                    if int(local.rsplit(":", 1)[1], 16) in ours and int(queues[:8], 16):
                        return
        assert time.monotonic() < deadline, "the payload never queued up in the socket"
        time.sleep(0.01)


def _break_links_to(pid: int, store_port: int) -> int:
    """Shut down this process's TCP connections to process ``pid``, except the TCPStore's:
    only the sender's end breaks, as when a link fails between two hosts."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
             if c.status == psutil.CONN_ESTABLISHED}
    broken = 0
    for conn in psutil.Process().net_connections("tcp"):
        if conn.raddr and conn.raddr.port in ports and conn.raddr.port != store_port:
            sock = socket.socket(fileno=os.dup(conn.fd))
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            broken += 1
    return broken


def test_a_cleanly_closed_channel_ends_its_link_watch(pair, monkeypatch):
    """The receiver acknowledges a CLOSE on the link watch's tag, and the sender's close
    returns once it did: no thread is left waiting on a link nobody uses any more (a
    process that exited with one blocked in gloo died in C++ teardown: "terminate called
    without an active exception", seen at the end of every 2-sender benchmark run). The
    acknowledgement is held until the sender waits for it, so a close that did not wait
    would return first."""
    import threading

    from kv_transfer.torch_dist.wire import PairGroup

    ack, end_watch = PairGroup.ack_close, PairGroup.end_watch
    sender_waits = threading.Event()

    def waiting_sender(self, timeout_s):
        sender_waits.set()
        return end_watch(self, timeout_s)

    def late_ack(self, timeout_s):
        sender_waits.wait(10)
        ack(self, timeout_s)

    monkeypatch.setattr(PairGroup, "end_watch", waiting_sender)
    monkeypatch.setattr(PairGroup, "ack_close", late_ack)
    sender, receiver = pair
    done = Completions()
    receiver.expect("one", [1], done)
    sender.send("one", receiver.endpoint(), [2], dst_block_ids=[1]).result(timeout=10)
    done.wait_for("one")

    ours = f"kv-link {receiver.endpoint().describe()}"  # not another test's, still ending

    (watch,) = [t for t in threading.enumerate() if t.name == ours]
    sender.close()
    assert not watch.is_alive()


def test_a_gloo_error_is_told_in_its_first_sentence():
    """gloo's text starts with its source file and goes on with advice: the error keeps
    what happened (the address in it is scrubbed for clients by router.errors)."""
    from kv_transfer.errors import PeerClosed
    from kv_transfer.torch_dist.wire import _classify

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
        "closed by peer [127.0.0.1]:2995. This is typically caused by a remote worker "
        "crashing. Check the logs of the remote worker before reporting an error. GLHF!")
    error = _classify(gloo, None, "decode-1", "watching the link")
    assert isinstance(error, PeerClosed)
    assert error.what == ("peer closed or died while watching the link (Connection closed "
                          "by peer [127.0.0.1]:2995)")
