"""KV resharding between TP sizes (p prefill ranks -> d decode ranks) on the loopback and
torch_dist (gloo) backends: each decode rank receives exactly its heads, from the prefill
ranks the plan names; a payload of the wrong heads, dtype or scales fails its request alone;
an abort mid-transfer leaves nothing written after it returns."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from kv_transfer import LayoutMismatch, TransferConfig, blocks, make_receiver, make_sender
from kv_transfer.loopback import LoopbackHub
from kv_transfer.receiving import StagedTarget
from kv_transfer.reshard import parts_for
from kv_transfer.torch_dist import recv_channel
from kv_transfer.torch_dist import sender as torch_dist_sender

from .helpers import Completions
from .reshard_cases import CASES, DST_IDS, LAYOUTS, SRC_IDS, Setup, case_id

LOOPBACK = TransferConfig(backend="loopback", timeout_s=10.0)
# connect_timeout_s well above 5 s: see kv_transfer.torch_dist.tcp_store
TORCH_DIST = TransferConfig(host="127.0.0.1", timeout_s=10.0, connect_timeout_s=20.0)


@pytest.fixture(params=["loopback", "torch_dist"])
def backend(request):
    """A factory of (senders, receivers) for a Setup on one backend; all closed at the end."""
    hub = LoopbackHub() if request.param == "loopback" else None
    config = LOOPBACK if hub is not None else TORCH_DIST
    opened: list = []

    def build(setup: Setup, config: TransferConfig = config, **kw):
        extra = {"hub": hub} if hub is not None else {}
        senders = [make_sender(config, cache, name=f"p{r}", heads=heads, **extra, **kw)
                   for r, (cache, heads) in enumerate(zip(setup.src_caches, setup.src_heads,
                                                          strict=True))]
        receivers = [make_receiver(config, cache, name=f"d{r}", heads=heads, **extra, **kw)
                     for r, (cache, heads) in enumerate(zip(setup.dst_caches, setup.dst_heads,
                                                            strict=True))]
        opened.extend([*senders, *receivers])
        return senders, receivers

    build.name, build.extra, build.opened = request.param, (
        {"hub": hub} if hub is not None else {}), opened
    yield build
    for obj in opened:  # senders first: their CLOSE ends the receivers' channel threads
        if not hasattr(obj, "expect"):
            obj.close()
    for obj in opened:
        if hasattr(obj, "expect"):
            obj.close()
    if hub is not None:
        hub.close()


class RankCompletions(Completions):
    """Completions of several receivers: one entry per (rank, request)."""

    def for_rank(self, rank: int):
        return lambda rid, error: self(f"{rank}/{rid}", error)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_decode_rank_gets_exactly_its_heads(backend, case, layout):
    setup = Setup(case, seed=sum(case), layout=layout)
    senders, receivers = backend(setup)
    for announce in (False, True):  # announced: as the prefill worker does
        done = RankCompletions()
        endpoints = [r.endpoint() for r in receivers]
        rid = f"r-{announce}"
        for rank, receiver in enumerate(receivers):
            receiver.expect(rid, DST_IDS, done.for_rank(rank),
                            parts=parts_for(setup.routes, rank))
        if announce:
            for route in setup.routes:
                senders[route.src_rank].announce(rid, endpoints[route.dst_rank], SRC_IDS,
                                                 DST_IDS, heads=route.heads)
        handles = [senders[r.src_rank].send(rid, endpoints[r.dst_rank], SRC_IDS,
                                            dst_block_ids=DST_IDS, heads=r.heads)
                   for r in setup.routes]
        sent = sum(h.result(timeout=20).nbytes for h in handles)
        done.wait_for(*[f"{rank}/{rid}" for rank in range(len(receivers))])
        assert all(e is None for e in done.errors.values()), done.errors
        setup.check_landed()
        # Every destination head once: the bytes sent are the destination caches' share.
        per_head = blocks.gather(setup.full, SRC_IDS)[..., :1, :].numel() * 4
        assert sent == per_head * sum(hi - lo for lo, hi in setup.dst_heads)
        for cache in setup.dst_caches:
            cache.zero_()


def test_layer_ranges_of_a_part_complete_with_the_other_parts(backend):
    """Layer-by-layer sends of each route (overlap with compute): the request lands when
    every layer of every part is in, not before."""
    setup = Setup((8, 8, 2, 1), seed=3)
    senders, (receiver,) = backend(setup)
    done, ep = Completions(), receiver.endpoint()
    receiver.expect("r", DST_IDS, done, parts=parts_for(setup.routes, 0))
    first, second = setup.routes
    senders[0].send("r", ep, SRC_IDS, layers=(0, 3), heads=first.heads).result(timeout=20)
    senders[1].send("r", ep, SRC_IDS, layers=(0, 1), heads=second.heads).result(timeout=20)
    assert "r" not in done.errors
    senders[1].send("r", ep, SRC_IDS, layers=(1, 3), heads=second.heads).result(timeout=20)
    done.wait_for("r")
    assert done.errors["r"] is None
    setup.check_landed()


def test_a_payload_of_unexpected_heads_fails_that_request_and_the_next_lands(backend):
    setup = Setup((8, 8, 1, 2), seed=4)
    (sender,), receivers = backend(setup)
    done, ep = Completions(), receivers[0].endpoint()
    receivers[0].expect("bad", DST_IDS, done, parts=[(0, 2), (2, 4)])
    handle = sender.send("bad", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=(0, 4))
    done.wait_for("bad")
    error = done.errors["bad"]
    assert isinstance(error, LayoutMismatch)
    assert "payload KV heads [0, 4) are not a part this receiver expects" in str(error)
    assert "parts [(0, 2), (2, 4)] of its heads [0, 4)" in str(error)
    handle.result(timeout=20)  # delivered (and discarded): the sender's side is done
    assert setup.dst_caches[0].count_nonzero() == 0
    receivers[0].expect("next", DST_IDS, done, parts=[(0, 4)])
    sender.send("next", ep, SRC_IDS, dst_block_ids=DST_IDS, heads=(0, 4)).result(timeout=20)
    done.wait_for("next")
    assert done.errors["next"] is None
    setup.check_landed(ranks=[0])


def test_heads_outside_either_cache_are_refused_at_send(backend):
    setup = Setup((8, 8, 2, 2), seed=5)
    senders, receivers = backend(setup)
    ep = receivers[1].endpoint()  # holds [4, 8); sender 0 holds [0, 4)
    with pytest.raises(LayoutMismatch, match=r"sender holds \[0, 4\), receiver \[4, 8\)"):
        senders[0].send("r", ep, SRC_IDS, heads=(2, 6)).result(timeout=20)
    with pytest.raises(LayoutMismatch, match="not held by both"):
        senders[0].send("r", ep, SRC_IDS).result(timeout=20)  # no heads in common
    with pytest.raises(ValueError, match="parts .* do not tile"):
        receivers[1].expect("r", DST_IDS, parts=[(4, 6)])


def test_dtype_and_scale_mismatches_fail_with_what_to_change(backend):
    """Refused at send against the receiver's advertised cache; a payload that gets
    through anyway (a forged endpoint) is refused by the receiver: that request fails, the
    next one lands."""
    setup = Setup((8, 8, 1, 1), seed=6)
    (sender,), (receiver,) = backend(setup)
    done, ep = Completions(), receiver.endpoint()
    fp8_ep = dataclasses.replace(ep, dtype="float8_e4m3fn")
    with pytest.raises(LayoutMismatch, match=r"sender cache dtype float32 != receiver cache "
                       r"dtype float8_e4m3fn: prefill and decode pools must use the same "
                       "kv_cache_dtype"):
        sender.send("r", fp8_ep, SRC_IDS).result(timeout=20)
    with pytest.raises(LayoutMismatch, match="must use the same k_scale and v_scale"):
        sender.send("r", dataclasses.replace(ep, kv_scales=(0.5, 1.0)), SRC_IDS).result(20)
    receiver.expect("scaled", DST_IDS, done)
    forged = dataclasses.replace(ep, kv_scales=(2.0, 1.0))
    scaled = make_sender(sender.config, setup.src_caches[0], name="scaled",
                         kv_scales=(2.0, 1.0), **({"hub": sender.hub}
                                                  if hasattr(sender, "hub") else {}))
    try:
        scaled.send("scaled", forged, SRC_IDS).result(timeout=20)
        done.wait_for("scaled")
    finally:
        scaled.close()
    assert isinstance(done.errors["scaled"], LayoutMismatch)
    assert "payload kv scales (k, v) (2.0, 1.0) != receiver's (1.0, 1.0)" in str(
        done.errors["scaled"])
    receiver.expect("next", DST_IDS, done)
    sender.send("next", ep, SRC_IDS, dst_block_ids=DST_IDS).result(timeout=20)
    done.wait_for("next")
    assert done.errors["next"] is None
    setup.check_landed()


def test_a_refused_send_fails_the_request_on_the_receiver_too(backend):
    """A prefill pool with an fp8 cache and a decode pool with a float32 one: the send is
    refused at once, and the receiver fails that request at once with what to change (no
    wait for KV that never comes); the sender's other requests are unaffected."""
    setup = Setup((8, 8, 1, 1), seed=8)
    (sender,), (receiver,) = backend(setup)
    fp8_cache = torch.zeros_like(setup.dst_caches[0], dtype=torch.float8_e4m3fn)
    fp8 = make_receiver(sender.config, fp8_cache, name="d-fp8", **backend.extra)
    backend.opened.append(fp8)
    done = Completions()
    fp8.expect("mixed", DST_IDS, done)
    handle = sender.send("mixed", fp8.endpoint(), SRC_IDS, dst_block_ids=DST_IDS)
    with pytest.raises(LayoutMismatch, match="sender cache dtype float32 != receiver cache "
                       "dtype float8_e4m3fn"):
        handle.result(timeout=1)
    done.wait_for("mixed")
    assert isinstance(done.errors["mixed"], LayoutMismatch)
    assert ("payload dtype float32 != receiver cache dtype float8_e4m3fn: prefill and "
            "decode pools must use the same kv_cache_dtype") in str(done.errors["mixed"])
    assert fp8_cache.view(torch.uint8).count_nonzero() == 0
    receiver.expect("fine", DST_IDS, done)
    sender.send("fine", receiver.endpoint(), SRC_IDS, dst_block_ids=DST_IDS).result(20)
    done.wait_for("fine")
    assert done.errors["fine"] is None
    setup.check_landed()


def test_abort_of_a_part_mid_transfer_leaves_nothing_written_after_it(backend, monkeypatch):
    """2 -> 1: the first part lands; the second part's scatter is held up mid-payload; an
    abort waits for that scatter, then no later message of it is written, and the request
    never completes."""
    setup = Setup((8, 8, 2, 1), seed=7)
    config = LOOPBACK if backend.name == "loopback" else dataclasses.replace(
        TORCH_DIST, inflight_messages=1)
    senders, (receiver,) = backend(setup, config)
    done, ep = Completions(), receiver.endpoint()
    src, dst = [0, 2, 4], [5, 9, 1]  # one message per block (nothing contiguous)
    receiver.expect("r", dst, done, parts=parts_for(setup.routes, 0))
    first, second = setup.routes
    senders[0].send("r", ep, src, heads=first.heads).result(timeout=20)
    writing, resume = threading.Event(), threading.Event()
    table = receiver.table
    if backend.name == "loopback":  # one scatter of the whole payload
        original = table.write

        def held_write(entry, h, buffer):
            if h.heads == second.heads:
                writing.set()
                assert resume.wait(20)
            return original(entry, h, buffer)

        monkeypatch.setattr(table, "write", held_write)
    else:  # one scatter per staged message (one block each, from the cache): hold the first
        monkeypatch.setattr(torch_dist_sender, "STAGED_MESSAGE_BYTES", 1)
        monkeypatch.setattr(recv_channel, "WHOLE_STAGED_BYTES", 0)  # not all in one scatter
        original_copy = StagedTarget.copy_

        def held_copy(self, landing):  # the first part's last scatter may still be going
            if self.heads == slice(*second.heads) and not writing.is_set():
                writing.set()
                assert resume.wait(20)
            original_copy(self, landing)

        monkeypatch.setattr(StagedTarget, "copy_", held_copy)
    handle = senders[1].send("r", ep, src, heads=second.heads)
    assert writing.wait(10)
    aborter = threading.Thread(target=receiver.abort, args=("r",))
    aborter.start()
    aborter.join(0.3)
    if backend.name == "torch_dist":
        assert aborter.is_alive()  # the held message is being written into block 5
    resume.set()
    aborter.join(10)
    assert not aborter.is_alive()
    handle.result(timeout=20)
    cache = setup.dst_caches[0]
    lo, hi = second.heads
    want = setup.full[:, :, :, :, lo:hi]
    if backend.name == "torch_dist":
        assert torch.equal(cache[5, :, :, :, lo:hi], want[0])  # written before abort returned
    assert cache[[9, 1], :, :, :, lo:hi].count_nonzero() == 0  # never after it
    assert torch.equal(cache[dst][:, :, :, :, :lo], setup.full[src][:, :, :, :, :lo])  # part 1
    assert "r" not in done.errors
