"""Mixture-of-experts models through the disaggregated path in one process (loopback KV
transfer, no Ray): a prefill worker and a decode worker serving a ``make-model`` Mixtral or
Qwen3-MoE checkpoint give Engine.generate's greedy tokens, and every block comes back."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from cluster.backend import BackendRequest
from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from engine import Engine, SamplingParams

ENGINE = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 16,
          "max_model_len": 512}
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    from engine.make_model import make_model

    built = {}

    def get(arch: str):
        if arch not in built:
            out = tmp_path_factory.mktemp(f"moe-{arch}") / "ckpt"
            built[arch] = make_model(out, arch, "tiny", seed=0, progress=False)
        return built[arch]

    return get


def _config(model_dir) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(model_dir), "device": "cpu"},
        "prefill": {"engine": ENGINE}, "decode": {"engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 5},
        "scheduler": {"block_size": 4},
    })


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(3, 60))] for _ in range(n)]


async def _collect(backend, rid, prompt):
    tokens, final = [], None
    async for out in backend.submit(BackendRequest(rid, prompt, PARAMS, time.time())):
        tokens.extend(out.new_token_ids)
        final = out
    return tokens, final


async def _serve(model_dir, prompts):
    """(results, worker id -> model class name, free blocks, total blocks) after serving."""
    cluster = Cluster(_config(model_dir), mode="local")
    await cluster.start()
    try:
        results = await asyncio.gather(*(_collect(cluster.backend, f"r{i}", p)
                                         for i, p in enumerate(prompts)))
        workers = cluster.factory._objects
        for worker in workers.values():
            worker.check_integrity()
        models = {wid: type(w.host.engine.model).__name__ for wid, w in workers.items()}
        free = {wid: w.free_blocks() for wid, w in workers.items()}
        totals = {wid: w.host.engine.pool.num_blocks for wid, w in workers.items()}
        return results, models, free, totals
    finally:
        await cluster.shutdown()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_model_serves_disaggregated_like_engine_generate(moe_dirs, arch):
    model_dir, prompts = moe_dirs(arch), _prompts(6)
    expected = [o.token_ids for o in Engine.from_pretrained(
        model_dir, load_tokenizer=False, block_size=4).generate(prompts, PARAMS)]
    results, models, free, totals = asyncio.run(_serve(model_dir, prompts))
    assert [tokens for tokens, _ in results] == expected
    assert all(final.finish_reason == "length" for _, final in results)
    assert {"prefill_compute", "kv_transfer", "decode"} <= set(results[0][1].timing)
    assert len(models) == 2 and set(models.values()) == {"MoeForCausalLM"}
    assert free == totals  # every block back on both sides
