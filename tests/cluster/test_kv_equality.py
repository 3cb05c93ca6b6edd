"""A transferred request's KV on the decode side equals what the prefill side computed,
compared on the cache tensors, for the in-process loopback and for torch.distributed (gloo)
between two workers."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from decode_worker import DecodeWorker
from engine.sampling_params import SamplingParams
from kv_transfer.base import TransferConfig
from prefill_worker import PrefillWorker

OPTIONS = {"block_size": 4, "max_num_batched_tokens": 16, "load_tokenizer": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "qwen3", "qwen3", "tiny", seed=0,
                      progress=False)


@pytest.mark.parametrize("backend", ["loopback", "torch_dist"])
def test_decode_side_kv_equals_prefill_side(model_dir, backend):
    config = TransferConfig(backend=backend, timeout_s=20, host="127.0.0.1")
    extra = {}
    if backend == "loopback":
        from kv_transfer.loopback import LoopbackHub

        extra["hub"] = LoopbackHub()
    p = PrefillWorker("p0", str(model_dir), OPTIONS, config, **extra)
    d = DecodeWorker("d0", str(model_dir), OPTIONS, config, **extra)
    sent: dict[str, list[int]] = {}
    original_send = p.sender.send

    def recording_send(request_id, peer, src_block_ids, layers=None, **hints):
        sent[request_id] = list(src_block_ids)
        return original_send(request_id, peer, src_block_ids, layers, **hints)

    p.sender.send = recording_send
    announced: list[bool] = []
    original_announce = p.sender.announce
    p.sender.announce = lambda *args: announced.append(original_announce(*args)) or announced[-1]
    landed = threading.Event()
    original_done = d._kv_done

    def on_done(request_id, error):
        original_done(request_id, error)
        landed.set()

    d._kv_done = on_done  # reserve() registers this hook with the receiver
    try:
        prompt = list(range(7, 7 + 37))  # 10 blocks of 4, the last one partial
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        dst = d.reserve("r1", prompt, params)
        result = p.prefill("r1", prompt, params, d.endpoint(), dst, timeout_s=30)
        assert landed.wait(30), "KV never landed"
        src = sent["r1"]
        assert len(src) == len(dst) == 10
        # torch_dist: announced when the prefill started (the receives were posted early)
        assert announced == [backend == "torch_dist"]
        # [n, L, 2, bs, kvh, D] -> [L, 2, n * bs, kvh, D]: positions in prompt order.
        by_position = lambda kv, ids: kv[ids].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
        # Only the prompt's 37 positions are meaningful: compare those exactly.
        flat_p = by_position(p.host.engine.runner.kv_cache, src)[:, :, :37]
        flat_d = by_position(d.host.engine.runner.kv_cache, dst)[:, :, :37]
        assert torch.equal(flat_p, flat_d)
        assert flat_p.abs().sum() > 0
        assert d.start("r1", result.first_token)
        outs = []
        while not outs or outs[-1].finish_reason is None:
            outs.extend(d.get_outputs(5.0))
        assert outs[-1].finish_reason == "length"
        assert sum(len(o.new_token_ids) for o in outs) == 3  # the first came from prefill
    finally:
        p.shutdown()
        d.shutdown()


def test_first_token_is_answered_before_the_engine_loop_writes_the_kv(model_dir, monkeypatch):
    """On a warm channel an announced payload is written by the engine loop itself (no
    hand-off, see kv_transfer.torch_dist.send_channel.SenderChannel), but only after the
    step's first tokens are answered: TTFT does not wait for the write."""
    from kv_transfer.torch_dist import PairGroup
    from kv_transfer.torch_dist import sender as sender_module

    config = TransferConfig(backend="torch_dist", timeout_s=20, host="127.0.0.1")
    p = PrefillWorker("p0", str(model_dir), OPTIONS, config)
    d = DecodeWorker("d0", str(model_dir), OPTIONS, config)
    events: list[tuple[str, str]] = []  # (what, thread)
    original_complete = p._complete

    def recording_complete(out, *rest):
        original_complete(out, *rest)
        events.append(("answered", threading.current_thread().name))

    p._complete = recording_complete
    original_send = PairGroup.send

    def recording_send(self, tensor, tag):
        events.append(("data", threading.current_thread().name))
        return original_send(self, tensor, tag)

    monkeypatch.setattr(PairGroup, "send", recording_send)
    landed = threading.Event()
    original_done = d._kv_done

    def on_done(request_id, error):
        original_done(request_id, error)
        landed.set()

    d._kv_done = on_done  # reserve() registers this hook with the receiver
    original_announce = p.host.engine.on_last_chunk_scheduled
    header_sent = threading.Event()
    original_control_done = sender_module._log_control_failure

    def control_done(handle):  # a control job (here: the ANNOUNCE) completed
        original_control_done(handle)
        header_sent.set()

    monkeypatch.setattr(sender_module, "_log_control_failure", control_done)

    def announce_then_let_the_header_go(request):
        # The premise of a warm channel: the step's forward pass outlasts posting the
        # announcement's header (a real prefill is orders of magnitude longer). This test's
        # prefill is 23 tokens, so on a loaded host the channel thread could still be on the
        # header when the payload is submitted: it would then post it, by design. The
        # channel frees itself before it completes the job, so it is idle once this is set.
        header_sent.clear()
        original_announce(request)
        assert header_sent.wait(10), "the announcement never left"

    p.host.engine.on_last_chunk_scheduled = announce_then_let_the_header_go
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for n, rid in enumerate(["cold", "warm"]):
            prompt = list(range(11 + n, 11 + n + 23))
            dst = d.reserve(rid, prompt, params)
            landed.clear()
            events.clear()
            p.prefill(rid, prompt, params, d.endpoint(), dst, timeout_s=30)
            assert landed.wait(30), f"{rid}: KV never landed"
            assert d.abort(rid)
            # The receiver can land the KV before the sender's channel thread has completed
            # the job: "warm" means the channel is idle again (else it posts the next job).
            deadline = time.monotonic() + 10
            while not all(c.idle() for c in p.sender.local._lru.channels()):
                assert time.monotonic() < deadline, "the sender's channel never went idle"
                time.sleep(0.001)
        engine_thread = events[0][1]
        assert events[0][0] == "answered"
        data_threads = {thread for what, thread in events if what == "data"}
        assert data_threads == {engine_thread}, events  # the warm channel: no hand-off
    finally:
        p.shutdown()
        d.shutdown()


def test_a_request_without_a_transfer_withdraws_its_announcement(model_dir):
    """A first token that ends the request: no KV is sent, so the prefill worker retracts
    the announcement, and the decode side's abort (the router's next call) returns at once
    with every reserved block free."""
    config = TransferConfig(backend="torch_dist", timeout_s=20, host="127.0.0.1")
    p = PrefillWorker("p0", str(model_dir), OPTIONS, config)
    d = DecodeWorker("d0", str(model_dir), OPTIONS, config)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        free = d.free_blocks()
        prompt = list(range(7, 7 + 21))
        dst = d.reserve("r1", prompt, params)
        result = p.prefill("r1", prompt, params, d.endpoint(), dst, timeout_s=30)
        assert result.finish_reason == "length"
        aborted = threading.Thread(target=d.abort, args=("r1",))
        aborted.start()
        aborted.join(timeout=5)
        assert not aborted.is_alive(), "the decode abort waited for a transfer that never comes"
        assert d.free_blocks() == free
        assert d.receiver.local.table.claimed_blocks("r1") == 0
    finally:
        p.shutdown()
        d.shutdown()


def test_a_send_that_raises_fails_the_prefill_and_frees_its_blocks(model_dir):
    """A bug below the prefill worker's shipping step must end the request with an error
    (the router then aborts it on the decode side), not leave its caller waiting."""
    from kv_transfer.loopback import LoopbackHub
    from prefill_worker.worker import PrefillFailed

    config = TransferConfig(backend="loopback", timeout_s=20)
    hub = LoopbackHub()
    p = PrefillWorker("p0", str(model_dir), OPTIONS, config, hub=hub)
    d = DecodeWorker("d0", str(model_dir), OPTIONS, config, hub=hub)

    def broken_send(*args, **kwargs):
        raise RuntimeError("injected fault in send")

    p.sender.send = broken_send
    try:
        free_before = p.free_blocks()
        prompt = list(range(7, 7 + 21))
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        dst = d.reserve("r1", prompt, params)
        with pytest.raises(PrefillFailed, match="injected fault"):
            p.prefill("r1", prompt, params, d.endpoint(), dst, timeout_s=10)
        assert p.free_blocks() == free_before
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.gpu
def test_cuda_prefill_and_decode_workers_generate_like_the_engine(model_dir):
    """Both workers on CUDA, KV over torch_dist (the gloo wire stages CUDA caches through
    pinned host memory; NCCL needs one GPU per rank): same tokens as Engine.generate."""
    from engine import Engine

    options = {**OPTIONS, "device": "cuda", "kv_cache_memory_bytes": 64 << 20}
    config = TransferConfig(backend="torch_dist", wire="gloo", timeout_s=30, host="127.0.0.1")
    prompt = list(range(7, 7 + 45))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = Engine.from_pretrained(model_dir, **options).generate([prompt], params)[0]
    p = PrefillWorker("p0", str(model_dir), options, config)
    d = DecodeWorker("d0", str(model_dir), options, config)
    try:
        assert d.host.engine.runner.kv_cache.is_cuda
        dst = d.reserve("r1", prompt, params)
        first = p.prefill("r1", prompt, params, d.endpoint(), dst, timeout_s=60)
        assert d.start("r1", first.first_token)
        tokens = [first.first_token]
        outs = []
        while not outs or outs[-1].finish_reason is None:
            outs.extend(d.get_outputs(10.0))
        tokens += [t for o in outs for t in o.new_token_ids]
        assert outs[-1].finish_reason == "length"
        assert tokens == expected.token_ids
    finally:
        p.shutdown()
        d.shutdown()


def test_a_late_kv_deadline_waiting_on_its_abort_does_not_hold_up_the_others(model_dir):
    """The receiver's abort of an announced transfer waits until the sender settles it; a
    KV deadline that ends in such an abort must not delay the other requests' deadlines."""
    from kv_transfer.loopback import LoopbackHub

    config = TransferConfig(backend="loopback", timeout_s=0.3)
    d = DecodeWorker("d0", str(model_dir), OPTIONS, config, hub=LoopbackHub())
    released = threading.Event()
    original_abort = d.receiver.abort

    def abort(request_id):
        if request_id == "stuck":
            assert released.wait(30)
        return original_abort(request_id)

    d.receiver.abort = abort
    try:
        free = d.free_blocks()
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for rid in ("stuck", "late"):
            d.reserve(rid, list(range(7, 7 + 9)), params)
            assert d.start(rid, 5)  # no KV will come: both deadlines fire after 0.3 s
        finished: dict[str, str] = {}

        def collect(rid: str, within_s: float) -> None:
            deadline = time.monotonic() + within_s
            while rid not in finished and time.monotonic() < deadline:
                for out in d.get_outputs(deadline - time.monotonic()):
                    finished[out.request_id] = out.finish_reason

        collect("late", 5.0)
        assert finished == {"late": "error"}  # while "stuck" still waits on its abort
        released.set()
        collect("stuck", 5.0)
        assert finished["stuck"] == "error" and d.free_blocks() == free
    finally:
        released.set()
        d.shutdown()
