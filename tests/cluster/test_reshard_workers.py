"""Prefill and decode workers of different tensor-parallel sizes: each rank ships its own KV
heads to the decode ranks that hold them (``kv_transfer.group``), over torch.distributed
(gloo) pair channels between the ranks' processes.

For P TP=p -> D TP=d in {2->1, 1->2, 2->2}: the decode worker's greedy tokens equal a TP=1
engine's; every decode rank's blocks hold exactly the prefill ranks' KV of its heads (read
out of each rank's process), and to float32 rounding what a colocated engine of d ranks
computes; every block is free on every worker afterwards. A rank that
dies mid-transfer fails its requests with a clear error, and nothing hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from decode_worker import DecodeWorker
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from kv_transfer.base import TransferConfig
from prefill_worker import PrefillWorker

OPTIONS = {"block_size": 4, "max_num_batched_tokens": 16, "load_tokenizer": False,
           "warmup": False}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(7, 7 + n)) for n in (5, 23, 37)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """llama tiny: 4 query heads, 2 KV heads — TP=2 splits the KV heads one per rank."""
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = Engine.from_pretrained(model_dir, block_size=4, load_tokenizer=False)
    return [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]


def _dump_blocks(runner, comm, block_ids, path_pattern):
    """On a rank's process: save its cache's ``block_ids`` (test-only OP_CALL), written
    aside and renamed, so the file exists only once it is whole."""
    path = path_pattern.format(rank=comm.rank)
    torch.save(runner.kv_cache[block_ids].clone(), path + ".part")
    os.replace(path + ".part", path)


def _shards(worker, block_ids, tmp_path, tag) -> list[torch.Tensor]:
    """Every rank's KV of ``block_ids`` (rank 0's read here, the others' from their
    processes), rank by rank, of a worker's engine (on its engine thread)."""
    return _rank_shards(worker.host.call, worker.host.call_ranks,
                        worker.host.engine.tensor_parallel_size, block_ids, tmp_path, tag)


def _rank_shards(on_engine, call_ranks, tp, block_ids, tmp_path, tag) -> list[torch.Tensor]:
    pattern = str(tmp_path / f"{tag}-{{rank}}.pt")
    if tp > 1:
        call_ranks(_dump_blocks, list(block_ids), pattern)
        deadline = time.monotonic() + 30
        while not all(os.path.exists(pattern.format(rank=r)) for r in range(1, tp)):
            assert time.monotonic() < deadline, "a rank never dumped its blocks"
            time.sleep(0.05)
    own = on_engine(lambda e: e.runner.kv_cache[list(block_ids)].clone())
    return [own] + [torch.load(pattern.format(rank=r)) for r in range(1, tp)]


def _colocated_shards(model_dir, tp: int, prompt, tmp_path) -> list[torch.Tensor]:
    """What a colocated engine of ``tp`` ranks computes for ``prompt``: each rank's KV of
    the prompt's blocks, read once the prompt is prefilled (its first token sampled)."""
    options = {k: v for k, v in OPTIONS.items() if k != "warmup"}  # a worker's option
    engine = Engine.from_pretrained(model_dir, tensor_parallel_size=tp, **options)
    try:
        engine.add_request("same-tp", prompt, GREEDY)
        request = engine.scheduler.requests["same-tp"]
        while not request.output_token_ids:
            engine.step()
        ids = engine.prompt_block_ids(request)
        return _rank_shards(lambda fn: fn(engine), engine.call_ranks, tp, ids, tmp_path,
                            f"colocated-tp{tp}")
    finally:
        engine.close()


def _by_head(shards, heads) -> dict[int, torch.Tensor]:
    """head -> its KV [n, L, 2, bs, D] from the first rank holding it."""
    out = {}
    for shard, (lo, hi) in zip(shards, heads, strict=True):
        for h in range(lo, hi):
            out.setdefault(h, shard[:, :, :, :, h - lo])
    return out


def _decode(d: DecodeWorker, rid: str, first: int) -> list[int]:
    assert d.start(rid, first)
    tokens, deadline = [first], time.monotonic() + 60
    while True:
        for delta in d.get_outputs(1.0):
            assert delta.request_id == rid
            tokens.extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                assert delta.finish_reason == "length", delta.error
                return tokens
        assert time.monotonic() < deadline, "decode never finished"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 2)])
def test_resharded_kv_gives_tp1_tokens_and_exact_heads(model_dir, expected, tmp_path, p_tp,
                                                         d_tp):
    config = TransferConfig(backend="torch_dist", timeout_s=30, host="127.0.0.1")
    p = PrefillWorker("p0", model_dir, {**OPTIONS, "tensor_parallel_size": p_tp}, config)
    d = DecodeWorker("d0", model_dir, {**OPTIONS, "tensor_parallel_size": d_tp}, config)
    sent: dict[str, list[int]] = {}
    original_send = p.sender.send

    def recording_send(request_id, peer, src_block_ids, layers=None, **hints):
        sent[request_id] = list(src_block_ids)
        return original_send(request_id, peer, src_block_ids, layers, **hints)

    p.sender.send = recording_send
    landed: dict[str, object] = {}
    landing = threading.Condition()
    original_done = d._kv_done

    def on_done(request_id, error):
        with landing:
            landed[request_id] = error
            landing.notify_all()
        original_done(request_id, error)

    d._kv_done = on_done
    try:
        heads_p = p.kv_heads()
        heads_d = d.host.engine.kv_heads_of_ranks()
        assert len(heads_p) == p_tp and len(heads_d) == d_tp
        for i, (prompt, want) in enumerate(zip(PROMPTS, expected, strict=True)):
            rid = f"r{i}"
            dst = d.reserve(rid, prompt, GREEDY, source_heads=heads_p)
            result = p.prefill(rid, prompt, GREEDY, d.endpoint(), dst, timeout_s=60)
            with landing:
                assert landing.wait_for(lambda r=rid: r in landed, 30), f"{rid}: KV never landed"
            assert landed[rid] is None, landed[rid]
            if i == len(PROMPTS) - 1:  # the longest prompt: compare every head, exactly
                # Before decoding: the decode step would write the next token's KV.
                src = _by_head(_shards(p, sent[rid], tmp_path, f"p{i}"), heads_p)
                got = _shards(d, dst, tmp_path, f"d{i}")
                n = len(prompt)
                for shard, (lo, hi) in zip(got, heads_d, strict=True):
                    for h in range(lo, hi):
                        a = src[h].permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :n]
                        b = shard[:, :, :, :, h - lo].permute(1, 2, 0, 3, 4).flatten(2, 3)
                        assert torch.equal(a, b[:, :, :n]), f"head {h} differs"
                        assert a.abs().sum() > 0
                # ... and, to float32 rounding, what a colocated engine of the decode's TP
                # size computes (its ranks split the matmuls and reduce partial sums in
                # another order and over other thread counts: ~1e-5 apart, not bit for bit)
                same = _colocated_shards(model_dir, d_tp, prompt, tmp_path)
                for mine, theirs in zip(got, same, strict=True):
                    a = mine.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :n]
                    b = theirs.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :n]
                    print(f"{p_tp}->{d_tp}: max |KV - same-TP engine's KV| = "
                          f"{(a - b).abs().max().item():.2e} (|KV| up to "
                          f"{b.abs().max().item():.1f})")
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert _decode(d, rid, result.first_token) == want
        # every block back on both sides (the prefill side's are released once sent)
        deadline = time.monotonic() + 10
        while p.free_blocks() != p.host.engine.num_blocks:
            assert time.monotonic() < deadline, "prefill blocks not released"
            time.sleep(0.02)
        assert d.free_blocks() == d.host.engine.num_blocks
        d.check_integrity()
        p.check_integrity()
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_prefill_tp2_to_decode_tp1_gives_tp1_tokens(tmp_path, arch):
    """Mixture-of-experts: each prefill rank holds half the experts and half the KV heads;
    the decode worker (all experts, all heads) continues with TP=1 Engine's tokens."""
    from engine.make_model import make_model

    path = str(make_model(tmp_path / arch, arch, "tiny", seed=0, progress=False))
    engine = Engine.from_pretrained(path, block_size=4, load_tokenizer=False)
    want = [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]
    config = TransferConfig(backend="torch_dist", timeout_s=30, host="127.0.0.1")
    p = PrefillWorker("p0", path, {**OPTIONS, "tensor_parallel_size": 2}, config)
    d = DecodeWorker("d0", path, OPTIONS, config)
    try:
        for i, prompt in enumerate(PROMPTS):
            dst = d.reserve(f"m{i}", prompt, GREEDY, source_heads=p.kv_heads())
            result = p.prefill(f"m{i}", prompt, GREEDY, d.endpoint(), dst, timeout_s=60)
            assert _decode(d, f"m{i}", result.first_token) == want[i]
        assert d.free_blocks() == d.host.engine.num_blocks
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.timeout(180)
def test_a_decode_rank_killed_fails_its_incoming_requests_clearly(model_dir):
    """kill -9 of the decode worker's rank 1 while a request waits for its KV: the request
    fails (it does not wait for the transfer deadline), and the error says which rank."""
    config = TransferConfig(backend="torch_dist", timeout_s=60, host="127.0.0.1")
    p = PrefillWorker("p0", model_dir, {**OPTIONS, "tensor_parallel_size": 1}, config)
    d = DecodeWorker("d0", model_dir, {**OPTIONS, "tensor_parallel_size": 2}, config)
    failed = threading.Event()
    errors = {}
    original_done = d._kv_done

    def on_done(request_id, error):
        errors[request_id] = error
        failed.set()
        original_done(request_id, error)

    d._kv_done = on_done
    try:
        rank1 = d.host.engine.runner.handles[0]
        dst = d.reserve("doomed", PROMPTS[1], GREEDY, source_heads=p.kv_heads())
        os.kill(rank1.pid, signal.SIGKILL)
        assert failed.wait(30), "the request waited on a dead rank"
        assert "rank 1" in str(errors["doomed"]) and "gone" in str(errors["doomed"])
        assert dst  # reserved before the kill
    finally:
        p.shutdown()
        d.shutdown()


def _slow_expects(runner, comm, seconds, marker):
    """On a rank's process: its agent takes ``seconds`` to register each expected request
    (a busy rank), so a payload could overtake the registration; ``marker`` is created
    once that is in place."""
    import time as _time
    from pathlib import Path

    from kv_transfer.group.agent import RankAgent

    original = RankAgent._op_expect

    def slow(self, *args):
        _time.sleep(seconds)
        return original(self, *args)

    RankAgent._op_expect = slow
    Path(marker).touch()


@pytest.mark.timeout(120)
def test_reserve_returns_only_once_every_rank_expects_the_request(model_dir, tmp_path):
    """The blocks go to the prefill side when reserve returns: if a decode rank had not yet
    registered the request, its part of the KV arrived first, was drained as unknown, and
    the request waited out the transfer deadline (seen once in CI, P TP=1 -> D TP=2)."""
    config = TransferConfig(backend="torch_dist", timeout_s=10, host="127.0.0.1")
    p = PrefillWorker("p0", model_dir, OPTIONS, config)
    d = DecodeWorker("d0", model_dir, {**OPTIONS, "tensor_parallel_size": 2}, config)
    outcome = {}
    landed = threading.Event()
    original_done = d._kv_done

    def on_done(request_id, error):
        outcome[request_id] = error
        landed.set()
        original_done(request_id, error)

    d._kv_done = on_done
    try:
        for rid in ("warm", "race"):  # the first opens the pair channels (slow) ...
            if rid == "race":  # ... then a rank is slow to register the next request
                marker = tmp_path / "slow"
                d.host.call_ranks(_slow_expects, 1.0, str(marker))
                deadline = time.monotonic() + 10
                while not marker.exists():
                    assert time.monotonic() < deadline, "rank 1 never slowed down"
                    time.sleep(0.01)
            landed.clear()
            dst = d.reserve(rid, PROMPTS[2], GREEDY, source_heads=p.kv_heads())
            p.prefill(rid, PROMPTS[2], GREEDY, d.endpoint(), dst, timeout_s=30)
            assert landed.wait(8), f"{rid}: the KV never landed (drained as unknown)"
            assert outcome[rid] is None, outcome[rid]
            d.abort(rid)
    finally:
        p.shutdown()
        d.shutdown()
