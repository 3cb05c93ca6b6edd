"""n > 1 through the disaggregated path (in-process workers, loopback KV): the prompt is
prefilled once and its KV shipped once; the decode worker forks the samples from the same
blocks; sample i equals the request run alone with seed + i — also when the first token ends
sample 0, and when the decode worker dies mid-stream (each sample then goes on alone)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_migration_local import _kill, _make_killable, _until, local_cluster, worker_object

from cluster.backend import BackendRequest, sample_params
from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from engine import Engine, SamplingParams

ENGINE = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 16,
          "max_model_len": 512}
N = 4
PROMPT = [(13 * j) % 390 + 5 for j in range(40)]  # 10 blocks of 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=50, seed=500,
                          ignore_eos=True)


def _alone(model_dir, params: SamplingParams) -> list[list[int]]:
    engine = Engine.from_pretrained(model_dir, load_tokenizer=False, block_size=4)
    return [engine.generate([PROMPT], sample_params(params, i))[0].token_ids
            for i in range(N)]


def _config(model_dir, decode: int = 1) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(model_dir), "device": "cpu"},
        "prefill": {"engine": ENGINE}, "decode": {"replicas": decode, "engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 5},
        "scheduler": {"block_size": 4}, "autoscaler": {"enabled": False}})


async def _collect(backend, rid, params, samples: dict[int, list[int]] | None = None):
    samples = {} if samples is None else samples
    finals = {}
    async for out in backend.submit(BackendRequest(rid, PROMPT, params, time.time(), n=N)):
        samples.setdefault(out.index, []).extend(out.new_token_ids)
        if out.finish_reason is not None:
            assert out.index not in finals, "two finals for one sample"
            finals[out.index] = out
    return [samples[i] for i in range(N)], finals


@pytest.mark.parametrize("max_tokens", [24, 1])
def test_n_samples_share_one_prefill_and_equal_their_seeds_alone(model_dir, max_tokens):
    params = _params(max_tokens)

    async def main():
        cluster = Cluster(_config(model_dir), mode="local")
        await cluster.start()
        try:
            decode = next(w for wid, w in cluster.factory._objects.items()
                          if wid.startswith("decode"))
            engine = decode.host.engine
            pool, step = engine.pool, engine.step
            peak, shared = [], []

            def measuring_step():
                """After the first step in which every sample has a token (on the engine
                thread: a client-side look can come many steps later on a busy host), the
                blocks held and how many samples hold each of the prompt's full blocks."""
                outputs = step()
                running = [r for rid, r in engine.scheduler.requests.items()
                           if rid.startswith("n#")]  # the request and its forked samples
                if not peak and len(running) == N and all(r.output_token_ids for r in running):
                    peak.append(pool.num_used)
                    shared.extend(pool.ref_count(b) for b in running[0].block_ids[:9])
                return outputs

            if max_tokens > 1:  # while every sample decodes: how many blocks are held
                engine.step = measuring_step
            result = await asyncio.wait_for(
                _collect(cluster.backend, "n", params), 60)
            await _until(lambda: pool.num_free == pool.num_blocks, 5)
            return result, peak, shared
        finally:
            await cluster.shutdown()

    (tokens, finals), peak, shared = asyncio.run(main())
    assert tokens == _alone(model_dir, params)
    assert sorted(finals) == list(range(N))
    assert all(f.finish_reason == "length" for f in finals.values())
    if max_tokens > 1:  # the prompt's 10 blocks are held once (N separate requests would
        # hold N * 11): shared 10, a copy of the last prompt block per forked sample (it
        # recomputes that token), and each sample's own block of generated tokens
        assert shared == [N] * 9
        assert peak[0] <= 10 + (N - 1) + N < N * 11, peak


def test_n_samples_survive_their_decode_workers_death(model_dir):
    params = _params(64)

    async def main():
        cluster = Cluster(_config(model_dir, decode=2), mode="local")
        await cluster.start()
        _make_killable(cluster)
        try:
            samples: dict[int, list[int]] = {}
            task = asyncio.create_task(_collect(cluster.backend, "m", params, samples))
            await _until(lambda: len(samples) == N and all(len(s) >= 3 for s in
                                                             samples.values()))
            _kill(cluster, cluster.backend._flights["m"].attempt.decode_id)
            result = await asyncio.wait_for(task, 60)
            return result, dict(cluster.backend.migrations)
        finally:
            await cluster.shutdown()

    (tokens, finals), migrations = asyncio.run(main())
    assert tokens == _alone(model_dir, params)
    assert all(f.finish_reason == "length" for f in finals.values())
    assert migrations["decode"] >= 1


@pytest.mark.parametrize("index", [0, 2])
def test_one_sample_ended_alone_stops_decoding_and_the_others_go_on(model_dir, index):
    """What the router does when a stop string ends one sample (``abort_sample``): that
    sample's final output is "abort" at once and its decode stops (it no longer holds a
    running slot or its own blocks); the other samples finish as they would have — sample
    0 included, whose blocks its forked siblings share copy-on-write."""
    params = _params(120)

    async def main():
        async with local_cluster(_config(model_dir)) as cluster:
            decode = worker_object(cluster, "decode")
            engine = decode.host.engine
            samples: dict[int, list[int]] = {}
            task = asyncio.create_task(_collect(cluster.backend, "s", params, samples))
            await _until(lambda: len(samples) == N and all(len(s) >= 3 for s in
                                                             samples.values()))
            await cluster.backend.abort_sample("s", index)
            running = decode.host.call(lambda e: len(e.scheduler.running))
            tokens, finals = await asyncio.wait_for(task, 60)
            pool = engine.pool
            await _until(lambda: pool.num_free == pool.num_blocks, 5)
            return tokens, finals, running

    tokens, finals, running = asyncio.run(main())
    alone = _alone(model_dir, params)
    assert running == N - 1  # the ended sample left the batch at once
    assert finals[index].finish_reason == "abort"
    assert len(tokens[index]) < params.max_tokens
    assert tokens[index] == alone[index][:len(tokens[index])]
    for i in set(range(N)) - {index}:
        assert finals[i].finish_reason == "length"
        assert tokens[i] == alone[i]
