"""Router-side entries end on every client disconnect (issue 12, item 5: with streaming
clients that went away, /health's backend ``in_flight`` stayed at 20 with nothing in flight,
and a scale-down drain waits on that table). Sockets are really closed mid-stream against a
loopback server; the fake backend forgets a request only after an await, as the cluster
backend does (its abort calls to the workers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time

import httpx
import pytest

from router.config import RouterConfig
from router.service import GenerationService
from router.types import GenerateInput
from tests.router.conftest import Stack, make_backend


@pytest.fixture(scope="module")
def leaky(tokenizer):
    config = RouterConfig(model_name="leaky", max_model_len=128)
    s = Stack(make_backend(tokenizer, slow_step_s=0.05, cleanup_s=0.02), tokenizer, config)
    yield s
    s.close()


def _open_stream(port: int, path: str, body: dict) -> socket.socket:
    """A raw HTTP/1.1 streaming request; returns once the first SSE event has arrived."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    received = b""
    while b"data: {" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the first event: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    return sock


def _health(stack) -> dict:
    return httpx.get(f"{stack.base_url}/health", timeout=5).json()


def _wait_for_no_entries(stack, timeout: float = 3.0) -> dict:
    end = time.monotonic() + timeout
    health = _health(stack)
    while time.monotonic() < end:
        health = _health(stack)
        if health["requests_in_flight"] == 0 and health["backend"]["running"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"entries left after every client went away: {health}")


def test_closed_sockets_mid_stream_end_every_entry(leaky):
    socks = []
    for i in range(12):
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        body = {"model": "leaky", "stream": True, "max_tokens": 100, "ignore_eos": True}
        if i % 2:
            body["messages"] = [{"role": "user", "content": "slow"}]
        else:
            body["prompt"] = "slow"
        socks.append(_open_stream(leaky.http.port, path, body))
    assert _health(leaky)["backend"]["running"] == 12
    for i, sock in enumerate(socks):
        if i % 3 == 0:  # an abortive close (RST), as a killed client's kernel sends
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif i % 3 == 1:
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    _wait_for_no_entries(leaky)
    assert leaky.service.num_cleanups == 0
    # each counted once as an abort, as vLLM counts a disconnect (Grafana's finish panel)
    metrics = httpx.get(f"{leaky.base_url}/metrics", timeout=5).text
    assert 'splitserve_request_finish_total{reason="abort"} 12.0' in metrics
    assert 'splitserve_requests_total{code="CANCELLED"} 12.0' in metrics
    # and the server goes on serving
    resp = httpx.post(f"{leaky.base_url}/v1/completions", timeout=10,
                      json={"model": "leaky", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200


def test_cleanup_survives_repeated_cancellation(tokenizer):
    """What anyio does to a disconnected SSE task: cancel it again at every await. The
    backend's clean-up must still run to the end."""
    backend = make_backend(tokenizer, slow_step_s=0.05, cleanup_s=0.02)
    service = GenerationService(backend, tokenizer, RouterConfig(max_model_len=64))

    async def scenario() -> None:
        async def consume() -> None:
            prep = await service.prepare(GenerateInput(prompt="slow", request_id="r1",
                                                       sampling={"max_tokens": 50}))
            async with contextlib.aclosing(service.stream(prep)) as chunks:
                async for _ in chunks:
                    pass

        task = asyncio.ensure_future(consume())
        while backend.stats()["running"] == 0:
            await asyncio.sleep(0.01)
        for _ in range(50):  # keep cancelling, as a cancelled anyio scope does
            task.cancel()
            await asyncio.sleep(0.001)
            if task.done():
                break
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):
            if backend.stats()["running"] == 0 and service.num_cleanups == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert backend.stats()["running"] == 0
    assert service.num_inflight == 0
    assert backend.aborted == ["r1"]


def test_a_cancelled_requests_id_stays_taken_until_its_backend_clean_up_ends(tokenizer):
    """A client goes away; the backend's clean-up (the abort on the workers, which know the
    request by its id) takes a while. A new request with that id meanwhile (a retry, or
    another client's) is refused as a duplicate, not admitted, where the old request's
    abort would have hit it; once the clean-up is over the id is free again."""
    from router.errors import InvalidParamError

    backend = make_backend(tokenizer, slow_step_s=0.05)
    service = GenerationService(backend, tokenizer, RouterConfig(max_model_len=64))
    aborting, aborted, abort = asyncio.Event(), asyncio.Event(), backend.abort

    async def slow_abort(request_id: str) -> None:  # the workers' abort calls, held
        aborting.set()
        await aborted.wait()
        await abort(request_id)

    backend.abort = slow_abort

    async def run(request_id: str, max_tokens: int, streaming: asyncio.Event | None = None
                  ) -> list:
        prep = await service.prepare(GenerateInput(prompt="slow", request_id=request_id,
                                                   sampling={"max_tokens": max_tokens}))
        out = []
        async with contextlib.aclosing(service.stream(prep)) as chunks:
            async for chunk in chunks:
                out.append(chunk)
                if streaming is not None:
                    streaming.set()
        return out

    async def scenario() -> None:
        streaming = asyncio.Event()
        task = asyncio.ensure_future(run("same", 50, streaming))
        await asyncio.wait_for(streaming.wait(), 5)
        task.cancel()
        await asyncio.wait_for(aborting.wait(), 5)
        with pytest.raises(InvalidParamError, match="already in flight") as err:
            await run("same", 2)
        assert err.value.param == "request_id"
        aborted.set()  # the workers have forgotten it now
        with contextlib.suppress(asyncio.CancelledError):
            await task  # its clean-up ran to the end (shielded)
        assert service.num_cleanups == 0
        chunks = await run("same", 2)  # free again
        assert chunks[-1].finish_reason == "length"
        assert backend.aborted == ["same"]

    asyncio.run(scenario())
