"""The disaggregated request path in one process (loopback KV transfer, no Ray): outputs
equal Engine.generate, KV lands intact, aborts free every block on both sides."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


def _config(model_dir, **over) -> ClusterConfig:
    base = {"model": {"path": str(model_dir), "device": "cpu"},
            "prefill": {"engine": ENGINE}, "decode": {"engine": ENGINE},
            "transfer": {"backend": "loopback", "timeout_s": 5},
            "scheduler": {"block_size": 4}}
    base.update(over)
    return ClusterConfig.model_validate(base)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 400) for _ in range(rng.randint(3, 60))] for _ in range(n)]


async def _collect(backend, rid, prompt, params):
    tokens, final = [], None
    req = BackendRequest(rid, prompt, params, time.time())
    async for out in backend.submit(req):
        tokens.extend(out.new_token_ids)
        final = out
    return tokens, final


def test_disaggregated_outputs_equal_engine_generate(model_dir):
    prompts = _prompts(8)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in Engine.from_pretrained(
        model_dir, load_tokenizer=False, block_size=4).generate(prompts, params)]

    async def main():
        cluster = Cluster(_config(model_dir), mode="local")
        await cluster.start()
        try:
            results = await asyncio.gather(*(_collect(cluster.backend, f"r{i}", p, params)
                                             for i, p in enumerate(prompts)))
            for w in cluster.factory._objects.values():
                w.check_integrity()
            free = {wid: w.free_blocks() for wid, w in cluster.factory._objects.items()}
            totals = {wid: w.host.engine.pool.num_blocks
                      for wid, w in cluster.factory._objects.items()}
            return results, free, totals
        finally:
            await cluster.shutdown()

    results, free, totals = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(final.finish_reason == "length" for _, final in results)
    timing = results[0][1].timing
    assert {"prefill_compute", "kv_transfer", "decode"} <= set(timing)
    assert free == totals  # every block back on both sides


def test_random_cancellations_free_every_block(model_dir):
    prompts = _prompts(30, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def one(backend, i, prompt):
        task = asyncio.create_task(_collect(backend, f"c{i}", prompt, params))
        await asyncio.sleep(random.Random(i).uniform(0.0, 0.3))
        if i % 2:
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass  # cancelled on purpose: the client went away

    async def main():
        cluster = Cluster(_config(model_dir), mode="local")
        await cluster.start()
        try:
            objs = cluster.factory._objects
            start = {wid: w.free_blocks() for wid, w in objs.items()}
            await asyncio.gather(*(one(cluster.backend, i, p) for i, p in enumerate(prompts)))
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                now = {wid: w.free_blocks() for wid, w in objs.items()}
                if now == start:
                    break
                await asyncio.sleep(0.05)
            for w in objs.values():
                w.check_integrity()
            return start, now
        finally:
            await cluster.shutdown()

    start, end = asyncio.run(main())
    assert end == start


def test_colocated_mode_streams_from_the_first_token(model_dir):
    prompts = _prompts(3, seed=5)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in Engine.from_pretrained(
        model_dir, load_tokenizer=False, block_size=4).generate(prompts, params)]

    async def main():
        cluster = Cluster(_config(model_dir, colocated=True), mode="local")
        await cluster.start()
        try:
            assert set(h.role for h in cluster.backend.workers.values()) == {"colocated"}
            return await asyncio.gather(*(_collect(cluster.backend, f"k{i}", p, params)
                                          for i, p in enumerate(prompts)))
        finally:
            await cluster.shutdown()

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected


def test_a_dead_worker_is_replaced_and_serving_goes_on(model_dir):
    """A worker whose calls report it gone (a dead Ray actor) is dropped from placement, its
    requests fail instead of hanging, and the cluster starts a replacement in its pool."""
    from cluster.handles import WorkerGone

    prompt = _prompts(1, seed=7)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = Engine.from_pretrained(model_dir, load_tokenizer=False,
                                      block_size=4).generate([prompt], params)[0].token_ids

    async def main():
        cluster = Cluster(_config(model_dir), mode="local")
        await cluster.start()
        try:
            dead = dict(cluster.backend.workers)  # worker id -> handle, one per pool
            readiness: list[bool] = []  # what a health Watch is told, change by change
            cluster.backend.watch_readiness(
                lambda: readiness.append(cluster.backend.is_ready()))

            async def gone(method, *args, _wid=None):
                raise WorkerGone(f"worker {_wid} died (injected)")

            for wid, handle in dead.items():
                handle.call = lambda method, *a, _wid=wid: gone(method, *a, _wid=_wid)
            for handle in dead.values():  # what the stats loop does next (or the pump did)
                with pytest.raises(WorkerGone):
                    await cluster.backend._report(handle)
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 60)
            replaced = {h.role for h in cluster.backend.workers.values()}
            tokens, final = await _collect(cluster.backend, "after", prompt, params)
            return set(dead), set(cluster.backend.workers), replaced, tokens, final, readiness
        finally:
            await cluster.shutdown()

    dead, alive, roles, tokens, final, readiness = asyncio.run(main())
    assert not dead & alive and roles == {"prefill", "decode"}
    assert False in readiness and readiness[-1] is True  # lost, then ready again
    assert tokens == expected and final.finish_reason == "length"
