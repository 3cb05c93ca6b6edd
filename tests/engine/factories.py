"""Factories for pure scheduler / block-pool tests (no torch, no model)."""

from __future__ import annotations

from engine.batch import ModelRunnerOutput, SchedulerOutput
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

EOS = 2


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4, first_token: int = 10,
                 **params) -> Request:
    prompt = [first_token + (i % 50) for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params), (EOS,))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 32,
                   max_num_seqs: int = 8, prefix_caching: bool = True) -> Scheduler:
    pool = BlockPool(num_blocks, prefix_caching)
    kv = KVCacheManager(pool, block_size)
    config = SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len=4096)
    return Scheduler(config, kv)


def fake_runner_output(batch: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """A runner that samples ``token`` for every request that needs a sample."""
    return ModelRunnerOutput([token] * batch.num_samples)


def run_to_completion(scheduler: Scheduler, token: int = 7, max_steps: int = 10_000) -> int:
    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        scheduler.update(batch, fake_runner_output(batch, token))
        scheduler.kv.pool.check_integrity()
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def ship_kv(prefill, decode, request_id: str, dst: list[int]) -> None:
    """Disaggregation in one process: copy a prefill-only request's KV blocks into the
    blocks the decode engine reserved for it (what the KV transfer does), then release the
    prefill side's blocks."""
    src = prefill.prefilled_block_ids(request_id)
    assert dst is not None and len(src) == len(dst)
    decode.runner.kv_cache[dst] = prefill.runner.kv_cache[src]
    prefill.release(request_id)
