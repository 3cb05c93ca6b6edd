"""Graceful shutdown (``GenerationService.drain``): on SIGTERM the router stops taking
requests and reports not ready, lets those in flight finish, and ends any left after the
drain time with a final "abort" chunk, all while the servers still answer. Before, the
servers were stopped first, so a rolling update cut every stream in the middle: no
finish_reason, no [DONE] (curl: "transfer closed"; openai: APIConnectionError)."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.config import RouterConfig
from tests.router.conftest import Stack, make_backend


@pytest.fixture
def stack(tokenizer):
    s = Stack(make_backend(tokenizer, slow_step_s=0.05), tokenizer,
              RouterConfig(model_name="drain", max_model_len=512))
    yield s
    s.close()


class _Stream(threading.Thread):
    """A streaming completion read to its end: its events, and whether [DONE] came."""

    def __init__(self, stack, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = f"{stack.base_url}/v1/completions", max_tokens
        self.events: list[dict] = []
        self.done = False
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": "drain", "prompt": "slow", "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url, json=body, timeout=30) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        self.started.set()
        except BaseException as exc:  # the test reads it
            self.error = exc
        finally:
            self.started.set()

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1]["choices"][0]["finish_reason"] if self.events else None


def _streams(stack, n: int, max_tokens: int) -> list[_Stream]:
    streams = [_Stream(stack, max_tokens) for _ in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(10) and s.error is None
    assert stack.service.num_inflight == n
    return streams


def _grpc_health(stack) -> int:
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_requests_in_flight_finish_while_new_ones_are_refused(stack):
    streams = _streams(stack, 2, max_tokens=40)  # 20 steps of 50 ms: about a second
    assert _grpc_health(stack) == health_pb2.HealthCheckResponse.SERVING
    drain = asyncio.run_coroutine_threadsafe(stack.service.drain(30), stack.loop)
    # while it drains: not ready on both health checks, new requests refused with 503
    health = httpx.get(f"{stack.base_url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert _grpc_health(stack) == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = httpx.post(f"{stack.base_url}/v1/completions", timeout=5,
                         json={"model": "drain", "prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert not drain.done()  # the streams are still running
    assert drain.result(20) == 0  # none left to abort
    for s in streams:
        s.join(10)
        assert s.error is None and s.done and s.finish_reason == "length"
        assert sum(bool(e["choices"][0]["text"]) for e in s.events) >= 10  # all its steps


def test_requests_left_after_the_drain_time_end_with_abort_not_a_cut_stream(stack):
    streams = _streams(stack, 2, max_tokens=400)  # ten seconds: longer than the drain
    assert stack.call(stack.service.drain(0.3)) == 2
    for s in streams:
        s.join(10)
        assert s.error is None and s.done and s.finish_reason == "abort"
    assert stack.service.num_inflight == 0


def test_a_second_signal_ends_the_drain_at_once(stack):
    streams = _streams(stack, 1, max_tokens=400)
    give_up = asyncio.Event()
    drain = asyncio.run_coroutine_threadsafe(stack.service.drain(60, give_up), stack.loop)
    stack.loop.call_soon_threadsafe(give_up.set)
    assert drain.result(10) == 1  # well before the 60 s
    streams[0].join(10)
    assert streams[0].done and streams[0].finish_reason == "abort"


def test_a_request_prepared_before_the_drain_but_admitted_after_it_is_a_clean_503(tokenizer):
    """A request whose prompt was still being tokenized when the drain began (nothing in
    flight: the drain ends at once) ran after it, under servers about to stop; it is now
    refused at admission, before its response starts (a 503 the client retries)."""
    from engine.errors import UnavailableError
    from router.service import GenerationService
    from router.types import GenerateInput

    async def main():
        service = GenerationService(make_backend(tokenizer), tokenizer,
                                    RouterConfig(model_name="m", max_model_len=256))
        await service.start()
        late = await service.prepare(GenerateInput(prompt="hi", sampling={"max_tokens": 2}))
        assert await asyncio.wait_for(service.drain(30), 5) == 0
        with pytest.raises(UnavailableError, match="shutting down"):
            [c async for c in service.stream(late)]
        assert service.num_inflight == 0
        await service.shutdown()

    asyncio.run(main())
