"""Different tensor-parallel sizes per pool on a real local Ray cluster: a prefill worker of
TP=p ranks ships its KV to a decode worker of TP=d ranks, each rank sending its own heads to
the decode ranks that hold them (gloo pair channels between the ranks' actors).

For (p, d) in {(2, 1), (1, 2), (2, 2)}: greedy tokens over gRPC and texts over the official
``openai`` client equal a TP=1 ``Engine``'s, and every block is free on both workers after
the requests end (ranks >= 1 hold no block pool: they mirror rank 0's block ids).
One cluster per (p, d), started and stopped in turn (three TP groups do not fit 2 cores).
"""

from __future__ import annotations

import time

import pytest
from test_ray_cluster import ENGINE, MAX_TOKENS, ServerThread, _config, _grpc_outputs, _http_texts

from engine import Engine, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = [[(17 * i + 5 * j) % 390 + 5 for j in range(3 + 9 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = Engine.from_pretrained(model_dir, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    return [o.token_ids for o in outs], [o.text for o in outs]


@pytest.fixture(scope="module", params=[(2, 1), (1, 2), (2, 2)], ids=lambda pd: f"P{pd[0]}D{pd[1]}")
def server(request, model_dir):
    import ray

    p_tp, d_tp = request.param
    config = _config(model_dir, "torch_dist",
                     prefill={"num_cpus": 0.5,
                              "engine": {**ENGINE, "tensor_parallel_size": p_tp}},
                     decode={"num_cpus": 0.5,
                             "engine": {**ENGINE, "tensor_parallel_size": d_tp}})
    server = ServerThread(config)
    yield server
    server.stop()
    ray.shutdown()


@pytest.mark.timeout(300)
def test_grpc_and_openai_give_engine_tokens_and_free_every_block(server, expected):
    tokens, texts = expected
    assert _grpc_outputs(server, PROMPTS) == tokens
    assert _http_texts(server, PROMPTS) == texts
    deadline = time.monotonic() + 20
    while True:  # the prefill side releases its blocks once each send is done
        free, total = server.free_blocks(), server.total_blocks()
        if free == total:
            break
        assert time.monotonic() < deadline, f"blocks not freed: {free} of {total}"
        time.sleep(0.1)
    assert server.server.cluster.backend.migrations == {"prefill": 0, "decode": 0,
                                                        "transfer": 0}
