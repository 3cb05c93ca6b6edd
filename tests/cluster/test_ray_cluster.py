"""The whole request path on a real local Ray cluster: router (gRPC + OpenAI HTTP), prefill
and decode actors, KV over torch.distributed (gloo) and over the Ray object store.

Ray and the workers start once per module (slow on 2 cores); tests share them.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from cluster.config import ClusterConfig
from engine import Engine, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENGINE = {"block_size": 4, "max_num_batched_tokens": 128, "max_num_seqs": 32,
          "max_model_len": 512, "num_threads": 1}
MAX_TOKENS = 8


def _config(model_dir, backend: str, **extra) -> ClusterConfig:
    data = {"model": {"path": str(model_dir), "device": "cpu", "name": "tiny"},
            "prefill": {"num_cpus": 0.5, "engine": ENGINE},
            "decode": {"num_cpus": 0.5, "engine": ENGINE},
            "transfer": {"backend": backend, "timeout_s": 20},
            "scheduler": {"block_size": 4},
            "router": {"grpc_port": 0, "http_port": 0},
            "autoscaler": {"enabled": False},
            "ray": {"num_cpus": 4}}
    data.update(extra)
    return ClusterConfig.model_validate(data)


class ServerThread:
    """A RunningServer on its own event loop thread, so sync clients can call it."""

    def __init__(self, config: ClusterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._start(config))

    async def _start(self, config):
        from app.server import start_server

        return await start_server(config)

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def free_blocks(self) -> dict[str, int]:
        backend = self.server.cluster.backend
        async def collect():
            return {wid: await h.call("free_blocks") for wid, h in backend.workers.items()}
        return self.run(collect())

    def total_blocks(self) -> dict[str, int]:
        return {wid: s.total_blocks
                for wid, s in self.server.cluster.backend.last_stats.items()}

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


@pytest.fixture(scope="module")
def expected(model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 400) for _ in range(rng.randint(2, 40))] for _ in range(8)]
    engine = Engine.from_pretrained(model_dir, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    return prompts, [o.token_ids for o in outs], [o.text for o in outs]


@pytest.fixture(scope="module")
def torch_dist_server(model_dir):
    import ray

    server = ServerThread(_config(model_dir, "torch_dist"))
    yield server
    server.stop()
    ray.shutdown()


def _concurrently(fn, items) -> list:
    """``[fn(x) for x in items]``, all calls in flight at once (a mixed concurrent batch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items, timeout=180))


def _grpc_outputs(server: ServerThread, prompts) -> list[list[int]]:
    from router.client import SplitServeClient

    with SplitServeClient(server.server.endpoints()["grpc"], timeout=120) as client:
        return _concurrently(lambda p: client.generate(
            p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids, prompts)


def _http_texts(server: ServerThread, prompts) -> list[str]:
    """Completions over the OpenAI HTTP API, concurrently, with the official client."""
    import openai

    client = openai.OpenAI(base_url=server.server.endpoints()["http"], api_key="x",
                           timeout=120)
    return _concurrently(lambda p: client.completions.create(
        model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True}).choices[0].text, prompts)


def test_grpc_mixed_batch_matches_engine_1p1d(torch_dist_server, expected):
    prompts, tokens, _ = expected
    assert _grpc_outputs(torch_dist_server, prompts) == tokens


def test_openai_client_completions_and_chat(torch_dist_server, expected):
    import openai

    prompts, tokens, texts = expected
    http = torch_dist_server.server.endpoints()["http"]
    client = openai.OpenAI(base_url=http, api_key="unused", timeout=120)
    out = client.completions.create(model="tiny", prompt=prompts[3], max_tokens=MAX_TOKENS,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == texts[3]
    assert out.usage.completion_tokens == MAX_TOKENS
    stream = client.completions.create(model="tiny", prompt=prompts[5], max_tokens=MAX_TOKENS,
                                       temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == texts[5]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        temperature=0.0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)


def test_bad_input_gets_clear_grpc_errors(torch_dist_server):
    from engine.errors import InvalidRequestError, NotFoundError
    from router.client import SplitServeClient

    with SplitServeClient(torch_dist_server.server.endpoints()["grpc"], timeout=30) as client:
        with pytest.raises(InvalidRequestError):
            client.generate([], max_tokens=4)
        with pytest.raises(InvalidRequestError):
            client.generate([5] * 600, max_tokens=4)  # over the 512-token context
        with pytest.raises(InvalidRequestError):
            client.generate([5, 6], max_tokens=4, temperature=-1.0)
        client_bad = SplitServeClient(torch_dist_server.server.endpoints()["grpc"],
                                      model="nope", timeout=30)
        with pytest.raises(NotFoundError):
            client_bad.generate([5, 6], max_tokens=4)
        client_bad.close()


def test_cancellations_free_every_block_within_a_second(torch_dist_server):
    from router.client import AsyncSplitServeClient

    start = torch_dist_server.free_blocks()
    address = torch_dist_server.server.endpoints()["grpc"]

    async def burst():
        client = AsyncSplitServeClient(address, timeout=120)
        rng = random.Random(7)

        async def one(i):
            prompt = [rng.randrange(5, 400) for _ in range(rng.randint(2, 60))]
            gen = client.stream(prompt, max_tokens=40, temperature=0.0, ignore_eos=True)
            cancel_after = rng.choice([0, 1, 3, None])
            n = 0
            async for _ in gen:
                n += 1
                if cancel_after is not None and n > cancel_after:
                    await gen.aclose()  # the client goes away mid-stream
                    break

        await asyncio.gather(*(one(i) for i in range(50)))
        await client.close()

    asyncio.run(burst())
    deadline = time.monotonic() + 1.0
    while torch_dist_server.free_blocks() != start and time.monotonic() < deadline:
        time.sleep(0.05)
    assert torch_dist_server.free_blocks() == start
    assert start == torch_dist_server.total_blocks()


def test_scaled_to_2p2d_still_matches(torch_dist_server, expected):
    prompts, tokens, texts = expected
    cluster = torch_dist_server.server.cluster
    torch_dist_server.run(cluster.scale("prefill", 1))
    torch_dist_server.run(cluster.scale("decode", 1))
    assert cluster.replicas("prefill") == 2 and cluster.replicas("decode") == 2
    assert _grpc_outputs(torch_dist_server, prompts * 2) == tokens * 2
    assert _http_texts(torch_dist_server, prompts) == texts
    used = [s for s in cluster.backend.last_stats.values()]
    assert len(used) == 4


def test_ray_object_store_backend_matches(model_dir, expected, torch_dist_server):
    prompts, tokens, texts = expected
    server = ServerThread(_config(model_dir, "ray", ray={"num_cpus": 4, "namespace": "rayb"}))
    try:
        assert _grpc_outputs(server, prompts) == tokens
        assert _http_texts(server, prompts) == texts
        assert server.free_blocks() == server.total_blocks()
    finally:
        server.run(server.server.stop())
        server.loop.call_soon_threadsafe(server.loop.stop)


def test_load_spike_grows_prefill_pool_and_idleness_shrinks_it(model_dir, torch_dist_server):
    from router.client import AsyncSplitServeClient

    autoscaler = {"enabled": True, "interval_s": 0.5, "window_s": 4.0, "cooldown_s": 3.0,
                  "scale_up_cooldown_s": 1.0, "scale_down_stable_s": 2.0,
                  "allow_role_change": False}
    config = _config(model_dir, "torch_dist", autoscaler=autoscaler,
                     slo={"ttft_s": 0.05, "itl_s": 5.0},
                     prefill={"num_cpus": 0.5, "min_replicas": 1, "replicas": 1,
                              "max_replicas": 2, "engine": ENGINE},
                     decode={"num_cpus": 0.5, "min_replicas": 1, "replicas": 1,
                             "max_replicas": 1, "engine": ENGINE},
                     ray={"num_cpus": 4, "namespace": "autoscale"})
    server = ServerThread(config)
    cluster = server.server.cluster
    address = server.server.endpoints()["grpc"]
    try:
        assert cluster.replicas("prefill") == 1

        async def spike():
            client = AsyncSplitServeClient(address, timeout=180)
            rng = random.Random(11)
            # Long enough to span several autoscaler ticks (0.5 s) even on a fast, idle host:
            # a spike that ends between two ticks leaves no queue for them to see.
            prompts = [[rng.randrange(5, 400) for _ in range(300)] for _ in range(160)]
            results = await asyncio.gather(*(client.generate(p, max_tokens=4, temperature=0.0,
                                                             ignore_eos=True) for p in prompts))
            await client.close()
            return results

        results = server.run(spike(), timeout=240)
        assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in results)
        deadline = time.monotonic() + 10  # the window still holds the spike's TTFTs
        while not any(d.pool == "prefill" and d.delta > 0
                      for _, d in server.server.autoscaling.history):
            assert time.monotonic() < deadline, "the TTFT spike did not grow the prefill pool"
            time.sleep(0.1)
        deadline = time.monotonic() + 90
        seen = set()
        while time.monotonic() < deadline:  # the new worker starts, then idleness removes it
            seen.add(cluster.replicas("prefill"))
            if 2 in seen and cluster.replicas("prefill") == 1:
                break
            time.sleep(0.2)
        assert 2 in seen, "the scale-up never brought a second prefill worker up"
        assert cluster.replicas("prefill") == 1, "idleness did not shrink the prefill pool"
        shrank = [d for _, d in server.server.autoscaling.history
                  if d.pool == "prefill" and d.delta < 0]
        assert shrank and max(d.current for d in shrank) == 2, server.server.autoscaling.history
    finally:
        server.run(server.server.stop())
        server.loop.call_soon_threadsafe(server.loop.stop)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schemas_hold_through_ray_with_the_openai_client(torch_dist_server, stream):
    """Structured outputs across the real disaggregated path: the prefill actor masks the
    first token, the decode actor's grammar state is advanced by it and masks the rest. A
    random model's free text is never JSON; every one of these 12 schemas must validate."""
    import json

    import jsonschema
    import openai

    from tests.engine.test_structured import SCHEMAS

    http = torch_dist_server.server.endpoints()["http"]
    client = openai.OpenAI(base_url=http, api_key="unused", timeout=120, max_retries=0)
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema",
               "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me."}],
                  "response_format": fmt, "max_tokens": 200, "seed": i, "temperature": 1.0}
        if stream:
            text = "".join(e.choices[0].delta.content or ""
                           for e in client.chat.completions.create(stream=True, **kwargs))
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
