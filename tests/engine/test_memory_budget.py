"""The GPU KV budget (engine.memory_budget): its arithmetic, the engine's flow from a
profile to a block count and its log line (a fake profiler on CPU), the profile's two runs
on CPU tensors, and on a GPU the measured profile and the start-up line."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import Engine
from engine.cuda_graphs import capture_sizes
from engine.memory_budget import (
    GIB,
    CudaMemoryProfiler,
    MemoryProfile,
    kv_budget_bytes,
    kv_cache_log_line,
    profile_batch,
)
from engine.model_runner import ModelRunner

MIB = 1 << 20


def test_budget_is_the_share_less_weights_activations_and_graphs():
    # 80 GiB card at 0.9: 72 GiB share - 16 weights - 2 peak - 1 graphs = 53 GiB
    assert kv_budget_bytes(80 * GIB, 0.9, 16 * GIB, 2 * GIB, 1 * GIB, free=63 * GIB) == int(
        80 * GIB * 0.9) - 19 * GIB


def test_budget_never_exceeds_what_is_free_after_activations_and_graphs():
    # another process holds 30 GiB: free 34 GiB (weights already out of it) - 3 = 31 GiB
    assert kv_budget_bytes(80 * GIB, 0.9, 16 * GIB, 2 * GIB, 1 * GIB, free=34 * GIB) == 31 * GIB


def test_budget_is_zero_when_nothing_is_left():
    assert kv_budget_bytes(16 * GIB, 0.5, 8 * GIB, 1 * GIB, 0, free=8 * GIB) == 0
    assert kv_budget_bytes(16 * GIB, 0.9, 8 * GIB, 1 * GIB, 0, free=512 * MIB) == 0


class FakeProfiler:
    def __init__(self, profile: MemoryProfile) -> None:
        self.result, self.calls = profile, 0

    def profile(self) -> MemoryProfile:
        self.calls += 1
        return self.result


@pytest.fixture
def cpu_engine(tiny_model_dir):
    # max_model_len * max_num_seqs caps the blocks: large enough not to here
    return Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                  max_model_len=2048, max_num_seqs=64,
                                  gpu_memory_utilization=0.5)


def test_engine_sizes_the_cache_from_a_profile_and_logs_it(cpu_engine, caplog):
    bpb = cpu_engine.bytes_per_block
    profile = MemoryProfile(total=1000 * bpb, free=900 * bpb, weights=100 * bpb,
                            activation_peak=50 * bpb, graphs=30 * bpb)
    profiler = FakeProfiler(profile)
    with caplog.at_level(logging.INFO, logger="engine.llm_engine"):
        blocks = cpu_engine._num_kv_blocks(profiler)
    assert profiler.calls == 1
    assert blocks == 500 - 100 - 50 - 30
    expected = kv_cache_log_line(320, 16, bpb, profile, 0.5)
    assert expected in caplog.text
    assert expected.startswith(f"KV cache: 320 blocks = {320 * 16} tokens (")
    assert "gpu_memory_utilization 0.5" in expected and "activations peak" in expected


def test_an_explicit_budget_or_block_count_skips_the_profile(tiny_model_dir):
    profiler = FakeProfiler(MemoryProfile(GIB, GIB, 0, 0, 0))
    fixed = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False, num_blocks=7)
    assert fixed._num_kv_blocks(profiler) == 7
    explicit = Engine.from_pretrained(tiny_model_dir("llama"), load_tokenizer=False,
                                      max_model_len=2048, kv_cache_memory_bytes=10 * MIB)
    assert explicit._num_kv_blocks(profiler) == 10 * MIB // explicit.bytes_per_block
    assert profiler.calls == 0


def test_cpu_budget_is_unchanged(cpu_engine):
    """No profile on CPU: the default CPU budget, capped by what max_num_seqs need."""
    cc = cpu_engine.cache_config
    want = min(cc.cpu_kv_cache_bytes_default // cpu_engine.bytes_per_block, 64 * 2048 // 16)
    assert cpu_engine.num_blocks == cpu_engine._num_kv_blocks() == want


def test_a_profile_with_no_room_says_what_took_the_memory(cpu_engine):
    profile = MemoryProfile(total=16 * GIB, free=7 * GIB, weights=8 * GIB,
                            activation_peak=GIB, graphs=0)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0\.5.*weights 8\.00 GiB.*"
                                         r"raise gpu_memory_utilization"):
        cpu_engine._num_kv_blocks(FakeProfiler(profile))


def _rank_spec(device: str):
    from engine.parallel.worker import RankSpec

    return RankSpec("unused", "bfloat16", device, "torch", 16, 1, 2, "127.0.0.1", 0, 10.0,
                    10.0, None, gpu_memory_utilization=0.5)


def _fake_cuda(monkeypatch, free: int, total: int, allocated: int) -> None:
    """The three CUDA memory calls a rank's budget makes, with fixed answers (no GPU here)."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_a_tp_rank_on_cuda_sizes_its_kv_cache_from_its_own_device(monkeypatch):
    """Each rank >= 1 reports what its own device holds (the group takes the least), not
    rank 0's count: an 80 GiB card at 0.5 with 30 GiB of weights leaves 10 GiB, but only
    9 GiB is free (another process), so 0.95 of 9 GiB."""
    from engine.parallel.worker import own_kv_blocks

    _fake_cuda(monkeypatch, free=9 * GIB, total=80 * GIB, allocated=30 * GIB)
    assert own_kv_blocks(_rank_spec("cuda:1"), 2 * MIB) == int(9 * GIB * 0.95) // (2 * MIB)
    _fake_cuda(monkeypatch, free=60 * GIB, total=80 * GIB, allocated=30 * GIB)
    assert own_kv_blocks(_rank_spec("cuda:1"), 2 * MIB) == 10 * GIB // (2 * MIB)


def test_a_tp_rank_with_no_room_for_a_block_fails_the_group_and_says_why(monkeypatch, caplog):
    from engine.parallel.worker import own_kv_blocks

    _fake_cuda(monkeypatch, free=50 * GIB, total=80 * GIB, allocated=40 * GIB)  # share spent
    with caplog.at_level(logging.ERROR, logger="engine.parallel.worker"):
        assert own_kv_blocks(_rank_spec("cuda:1"), 2 * MIB) == 0
    assert "rank 1" in caplog.text and "gpu_memory_utilization" in caplog.text


def test_a_tp_rank_on_cpu_lets_rank_0_decide():
    from engine.parallel.worker import ANY_BLOCKS, own_kv_blocks

    assert own_kv_blocks(_rank_spec("cpu"), 2 * MIB) == ANY_BLOCKS


def test_profile_batch_is_the_largest_step():
    batch = profile_batch(num_tokens=100, seqs=8, block_size=16, vocab_size=50)
    lengths = [e.num_new_tokens for e in batch.scheduled]
    assert lengths == [1] * 7 + [93] and batch.num_batched_tokens == 100
    assert batch.num_decodes == 0 and all(e.sample for e in batch.scheduled)
    blocks = [b for e in batch.scheduled for b in e.request.block_ids]
    assert blocks == list(range(7 + 6))  # distinct, in order: a cache of 13 blocks holds it
    assert max(t for e in batch.scheduled for t in e.request.token_ids) < 50


def test_the_profile_runs_work_on_cpu_tensors(cpu_engine):
    """The two steps the CUDA profile measures, run on CPU: the largest prefill samples
    every sequence; the padded decode writes only the scratch block."""
    model, bs = cpu_engine.model, 16
    sizes = capture_sizes(8)
    profiler = CudaMemoryProfiler(model, torch.device("cpu"), cpu_engine._allocate_kv_cache, bs,
                                  num_tokens=40, num_seqs=8, max_model_len=64,
                                  graph_batch=max(sizes))
    batch = profile_batch(40, 8, bs, model.config.vocab_size)
    blocks = 7 + 3  # seven one-token prompts, then 33 tokens
    cache = cpu_engine._allocate_kv_cache(blocks + 1)
    out = ModelRunner(model, cache[:blocks], bs, torch.device("cpu")).execute(batch)
    assert len(out.sampled_token_ids) == 8
    before = cache.clone()
    profiler._padded_decode(cache, scratch=blocks)
    assert torch.equal(cache[:blocks], before[:blocks])
    assert not torch.equal(cache[blocks], before[blocks])


@pytest.mark.gpu
def test_cuda_engine_logs_its_kv_budget(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="engine.llm_engine"):
        engine = Engine.from_pretrained(tiny_model_dir("llama"), device="cuda",
                                        load_tokenizer=False, max_model_len=1 << 20,
                                        max_num_seqs=16, gpu_memory_utilization=0.3)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(
        "KV cache: "))
    assert f"KV cache: {engine.num_blocks} blocks = {engine.num_blocks * 16} tokens" in line
    assert "gpu_memory_utilization 0.3" in line
    total = torch.cuda.get_device_properties(0).total_memory
    kv_bytes = engine.num_blocks * engine.bytes_per_block
    assert 0 < kv_bytes <= 0.3 * total
    assert engine.runner.kv_cache.shape[0] == engine.num_blocks
    out = engine.generate([[5, 6, 7]], None)
    assert len(out[0].token_ids) > 0


@pytest.mark.gpu
def test_cuda_profile_measures_each_part(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir("llama"), device="cuda",
                                    load_tokenizer=False, num_blocks=8)
    profiler = CudaMemoryProfiler(engine.model, engine.device, engine._allocate_kv_cache, 16,
                                  num_tokens=512, num_seqs=64, max_model_len=2048,
                                  graph_batch=64)
    p = profiler.profile()
    assert p.total == torch.cuda.get_device_properties(0).total_memory
    assert 0 < p.weights < p.total and 0 < p.free < p.total
    assert p.activation_peak > 0
    assert p.graphs > 0
