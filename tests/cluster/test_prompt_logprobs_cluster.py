"""Prompt logprobs through the in-process cluster (loopback KV transfer, no Ray): computed
on the prefill worker (or the colocated worker's local path), they come with the first
``BackendOutput`` only, equal to ``Engine.generate``'s."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.backend import BackendRequest
from cluster.runtime import Cluster
from engine import Engine, SamplingParams
from tests.cluster.test_cluster_local import _config, _prompts

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


async def _outputs(backend, rid, prompt):
    return [out async for out in backend.submit(BackendRequest(rid, prompt, PARAMS,
                                                               time.time()))]


@pytest.mark.parametrize("colocated", [False, True])
def test_first_output_carries_the_prompt_logprobs(model_dir, colocated):
    prompts = _prompts(2, seed=3)
    want = Engine.from_pretrained(model_dir, load_tokenizer=False,
                                  block_size=4).generate(prompts, PARAMS)

    async def main():
        cluster = Cluster(_config(model_dir, colocated=colocated), mode="local")
        await cluster.start()
        try:
            return await asyncio.gather(*(_outputs(cluster.backend, f"p{i}", p)
                                          for i, p in enumerate(prompts)))
        finally:
            await cluster.shutdown()

    for outs, expected, prompt in zip(asyncio.run(main()), want, prompts, strict=True):
        first = outs[0].prompt_logprobs
        assert first is not None and len(first) == len(prompt) and first[0] is None
        for got, ref in zip(first[1:], expected.prompt_logprobs[1:], strict=True):
            assert got.logprob == pytest.approx(ref.logprob, abs=1e-5)
            assert got.rank == ref.rank
            assert [t for t, _ in got.top] == [t for t, _ in ref.top]
        assert all(o.prompt_logprobs is None for o in outs[1:])
        assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
