"""Overload signalling (issue 12, item 7): every refusal is a real 429 / RESOURCE_EXHAUSTED
before the response starts, streaming included, with Retry-After; a burst beyond capacity
leaves only finished requests and refusals, and bounded router state. Deadlines are counted
as DEADLINE_EXCEEDED and 401s are counted."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from router import convert
from router.config import RouterConfig
from tests.router.conftest import Stack, make_backend

KEY = "sk-overload"
LIMIT = 4


@pytest.fixture(scope="module")
def busy(tokenizer):
    config = RouterConfig(model_name="busy", max_model_len=128, max_inflight_requests=LIMIT,
                          api_key=KEY, retry_after_s=3)
    s = Stack(make_backend(tokenizer, slow_step_s=0.05), tokenizer, config)
    yield s
    s.close()


AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)


def _counter(stack, code: str) -> float:
    text = httpx.get(f"{stack.base_url}/metrics").text
    m = re.search(rf'splitserve_requests_total{{code="{code}"}} ([0-9.]+)', text)
    return float(m.group(1)) if m else 0.0


def _wait_idle(stack, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        svc = stack.service
        if (svc.num_inflight == 0 and svc.num_cleanups == 0
                and stack.backend.stats()["running"] == 0):
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {stack.service.num_inflight} in flight, "
                         f"{stack.backend.stats()}")


def test_backend_refusal_of_a_stream_is_a_429_not_a_200(busy):
    """The cluster backend refuses what no worker can take (RESOURCE_EXHAUSTED) after
    admission; a streaming request used to get 200 and an in-band error then."""
    resp = httpx.post(f"{busy.base_url}/v1/chat/completions", headers=AUTH, timeout=10, json={
        "model": "busy", "stream": True, "messages": [{"role": "user", "content": "busy"}]})
    assert resp.status_code == 429, resp.text
    assert resp.headers["retry-after"] == "3"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    with grpc.insecure_channel(busy.grpc_address) as channel:
        call = convert.GenerationStub(channel).Generate(
            convert.build_request("busy"), timeout=10, metadata=GRPC_AUTH)
        assert list(_until_error(call)) == []  # no message before the status
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "3") in tuple(call.trailing_metadata())
    _wait_idle(busy)


def _until_error(call):
    try:
        yield from call
    except grpc.RpcError:
        return


def test_admission_refusals_carry_retry_after(busy):
    with ThreadPoolExecutor(LIMIT) as pool:
        holders = [pool.submit(_http_stream, busy, "slow", 40) for _ in range(LIMIT)]
        _wait_until(lambda: busy.service.num_inflight == LIMIT)
        for stream in (False, True):
            resp = httpx.post(f"{busy.base_url}/v1/completions", headers=AUTH, timeout=10,
                              json={"model": "busy", "prompt": "hi", "stream": stream})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
        with grpc.insecure_channel(busy.grpc_address) as channel:
            call = convert.GenerationStub(channel).Generate(
                convert.build_request("hi"), timeout=10, metadata=GRPC_AUTH)
            with pytest.raises(grpc.RpcError):
                list(call)
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "3") in tuple(call.trailing_metadata())
        assert all(h.result(10) == ("length", 200) for h in holders)
    _wait_idle(busy)


def test_burst_beyond_capacity(busy):
    """3x the admission limit at once, half HTTP streams and half gRPC streams: each one
    either finishes or is refused with 429 / RESOURCE_EXHAUSTED and a retry-after, nothing
    else; the router never tracks more than the limit and ends with nothing tracked."""
    assert _http_stream(busy, "hi", 2) == ("length", 200)  # warm: per-loop helpers exist
    _wait_idle(busy)
    tasks_before = busy.call(_num_tasks())
    peak = {"inflight": 0}
    stop = threading.Event()

    async def watch() -> None:  # samples the router's tracked state on its own loop
        while not stop.is_set():
            peak["inflight"] = max(peak["inflight"], busy.service.num_inflight)
            await asyncio.sleep(0.002)

    watcher = asyncio.run_coroutine_threadsafe(watch(), busy.loop)
    n = 3 * LIMIT
    with ThreadPoolExecutor(2 * n) as pool:
        futures = [pool.submit(_http_stream, busy, "slow", 6) for _ in range(n)]
        futures += [pool.submit(_grpc_stream, busy, "slow", 6) for _ in range(n)]
        outcomes = [f.result(30) for f in futures]
    stop.set()
    watcher.result(5)
    finished = [o for o in outcomes if o[0] == "length"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert len(finished) + len(refused) == len(outcomes), outcomes
    assert finished and refused
    assert all(o[1] == "3" for o in refused)  # every refusal says when to come back
    assert peak["inflight"] <= LIMIT
    _wait_idle(busy)
    assert busy.service._preparing == 0
    assert busy.call(_num_tasks()) <= tasks_before  # no task left behind by any request


async def _num_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # not counting the caller


def test_grpc_deadline_is_counted_as_deadline_exceeded(busy):
    before = (_counter(busy, "DEADLINE_EXCEEDED"), _counter(busy, "CANCELLED"))
    for _ in range(3):
        with grpc.insecure_channel(busy.grpc_address) as channel:
            call = convert.GenerationStub(channel).Generate(
                convert.build_request("hang"), timeout=0.3, metadata=GRPC_AUTH)
            with pytest.raises(grpc.RpcError):
                list(call)
            assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(busy)
    assert _counter(busy, "DEADLINE_EXCEEDED") == before[0] + 3
    assert _counter(busy, "CANCELLED") == before[1]


def test_unauthenticated_calls_are_counted(busy):
    before = _counter(busy, "UNAUTHENTICATED")
    assert httpx.post(f"{busy.base_url}/v1/completions", json={"model": "busy", "prompt": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{busy.base_url}/v1/models").status_code == 401
    with grpc.insecure_channel(busy.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(convert.GenerationStub(channel).Generate(convert.build_request("x"), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _counter(busy, "UNAUTHENTICATED") == before + 3


# ---- helpers -------------------------------------------------------------------------------

def _wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def _http_stream(stack, prompt: str, max_tokens: int) -> tuple:
    """("length", 200) when the stream finished, ("refused", Retry-After) on a 429."""
    body = {"model": "busy", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, headers=AUTH,
                      timeout=20) as resp:
        if resp.status_code == 429:
            resp.read()
            return "refused", resp.headers.get("retry-after")
        assert resp.status_code == 200, resp.status_code
        text = "".join(resp.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    assert '"error"' not in text, text  # no in-band refusal after a 200
    return ("length", 200) if '"finish_reason": "length"' in text else ("other", text)


def _grpc_stream(stack, prompt: str, max_tokens: int) -> tuple:
    with grpc.insecure_channel(stack.grpc_address) as channel:
        call = convert.GenerationStub(channel).Generate(
            convert.build_request(prompt, sampling={"max_tokens": max_tokens,
                                                  "ignore_eos": True}), timeout=20,
            metadata=GRPC_AUTH)
        try:
            last = list(call)[-1]
        except grpc.RpcError:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.code()
            return "refused", dict(call.trailing_metadata()).get("retry-after")
    return ("length", 200) if convert.chunk_from_proto(last).finish_reason == "length" else (
        "other", last)


def test_a_cancel_at_the_deadline_counts_as_deadline_exceeded(tokenizer):
    """gRPC cancels the handler when the call's deadline passes, often a moment before the
    router's own deadline timer: that used to be counted as CANCELLED. A cancel well before
    the deadline is still a cancel."""
    from router.service import GenerationService
    from router.types import GenerateInput

    service = GenerationService(make_backend(tokenizer), tokenizer,
                                RouterConfig(max_model_len=64))

    async def cancel_at(before_deadline_s: float) -> None:
        deadline = time.time() + 0.3
        prep = await service.prepare(GenerateInput(prompt="hang", deadline=deadline))
        task = asyncio.ensure_future(_drain(service.stream(prep)))
        await asyncio.sleep(deadline - time.time() - before_deadline_s)
        task.cancel()  # what grpc.aio does to the handler at the call's deadline
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_at(0.01))
    body = service.metrics.exposition()[0].decode()
    assert 'splitserve_requests_total{code="DEADLINE_EXCEEDED"} 1.0' in body
    assert 'splitserve_requests_total{code="CANCELLED"} 0.0' in body
    asyncio.run(cancel_at(0.2))
    assert 'splitserve_requests_total{code="CANCELLED"} 1.0' in (
        service.metrics.exposition()[0].decode())


async def _drain(stream) -> None:
    async with contextlib.aclosing(stream) as chunks:
        async for _ in chunks:
            pass
