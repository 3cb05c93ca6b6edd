"""The OpenAI-compatible HTTP edge, driven by the official ``openai`` client and httpx."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from tests.router.conftest import MAX_MODEL_LEN, REPLY_TEXT


@pytest.fixture(scope="module")
def oai(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=10)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        yield client


def test_completion_non_streaming(oai):
    resp = oai.completions.create(model="fake-model", prompt="Say something", max_tokens=200,
                                  temperature=0)
    assert resp.choices[0].text == REPLY_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    timing = resp.model_extra["splitserve"]["timing"]
    assert timing["prefill_compute"] == pytest.approx(0.002) and timing["e2e"] > 0


def test_completion_defaults_to_16_tokens_like_openai(oai):
    resp = oai.completions.create(model="fake-model", prompt="hi", extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_completion_streaming_with_usage(oai):
    stream = oai.completions.create(model="fake-model", prompt="hi", max_tokens=200, stream=True,
                                    stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == REPLY_TEXT
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "stop"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens > 0


def test_chat_non_streaming_with_vllm_extras(stack, oai):
    resp = oai.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hello!"}],
        max_completion_tokens=5, extra_body={"top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1,
                                             "ignore_eos": True, "request_id": "chat-1"})
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 5
    p = stack.backend.last_request("chat-1").params
    assert (p.top_k, p.min_p, p.ignore_eos, p.max_tokens) == (3, 0.1, True, 5)


def test_chat_streaming(oai):
    stream = oai.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hello!"}], stream=True,
        stop=["lazy"])
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert text == REPLY_TEXT[: REPLY_TEXT.index("lazy")]
    assert events[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(oai):
    resp = oai.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_completion_logprobs(oai):
    resp = oai.completions.create(model="fake-model", prompt="hi", max_tokens=3, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == [-0.5, -0.5, -0.5] and len(lp.tokens) == 3
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert all(top[token] == -0.5 for token, top in zip(lp.tokens, lp.top_logprobs, strict=True))


def test_completion_logprobs_always_hold_the_chosen_token():
    """OpenAI's legacy format (and vLLM): up to logprobs + 1 entries, the sampled token
    first even when it is not among the likeliest (a sampled, unlikely token)."""
    from router.openai_format import completion_logprobs
    from router.types import LogprobEntry, TopToken

    sampled = LogprobEntry(7, -9.0, "x", [TopToken(1, -0.1, "a"), TopToken(2, -2.0, "b")])
    likeliest = LogprobEntry(1, -0.1, "a", [TopToken(1, -0.1, "a"), TopToken(2, -2.0, "b")])
    alone = LogprobEntry(5, -1.0, "c")  # logprobs=0: the chosen token only
    first = LogprobEntry(0, None, "<s>")  # echo: a prompt's first token has none
    out = completion_logprobs([sampled, likeliest, alone], prompt=[first])
    assert out["top_logprobs"] == [None, {"x": -9.0, "a": -0.1, "b": -2.0},
                                   {"a": -0.1, "b": -2.0}, {"c": -1.0}]
    assert list(out["top_logprobs"][1]) == ["x", "a", "b"]
    assert out["token_logprobs"] == [None, -9.0, -0.1, -1.0]


def _running_offsets(tokens: list[str], start: int = 0) -> list[int]:
    out = []
    for token in tokens:
        out.append(start)
        start += len(token)
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("echo", [False, True], ids=["plain", "echo"])
def test_completion_text_offset_has_one_offset_per_token(oai, stream, echo):
    """As OpenAI and vLLM: each token's character offset in the choice's text (its prompt's
    first, with echo), running on across a stream's events."""
    kw = dict(model="fake-model", prompt="hi there", max_tokens=7, logprobs=1, echo=echo)
    if stream:
        events = list(oai.completions.create(stream=True, **kw))
        tokens = [t for e in events if e.choices and e.choices[0].logprobs
                  for t in e.choices[0].logprobs.tokens]
        offsets = [o for e in events if e.choices and e.choices[0].logprobs
                   for o in e.choices[0].logprobs.text_offset]
    else:
        lp = oai.completions.create(**kw).choices[0].logprobs
        tokens, offsets = lp.tokens, lp.text_offset
    # this fake backend gives no prompt logprobs: an echoed prompt is text only
    assert len(tokens) == 7 and offsets == _running_offsets(tokens, len(kw["prompt"]) * echo)


@pytest.mark.parametrize("body, param", [
    ({"temperature": -2}, "temperature"),
    ({"n": 0}, "n"),
    ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"top_p": "high"}, "top_p"),
])
def test_bad_completion_requests_are_400_openai_errors(http, body, param):
    payload = {"model": "fake-model", "prompt": "hi", **body}
    resp = http.post("/v1/completions", json=payload)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_openai_client_raises_its_own_errors(oai, stack):
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                    max_completion_tokens=0)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="hi")
    stack.backend.ready = False
    try:
        with pytest.raises(openai.InternalServerError) as err:
            oai.completions.create(model="fake-model", prompt="hi")
        assert err.value.status_code == 503
    finally:
        stack.backend.ready = True


def test_backend_failure_mid_stream_is_reported_in_band(http):
    payload = {"model": "fake-model", "prompt": "will fail", "stream": True, "max_tokens": 50}
    with http.stream("POST", "/v1/completions", json=payload) as resp:
        assert resp.status_code == 200
        data = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "unavailable"


def test_streaming_disconnect_aborts_backend(stack, http):
    payload = {"model": "fake-model", "prompt": "slow", "stream": True, "max_tokens": 100,
               "request_id": "http-cancel-1"}
    with http.stream("POST", "/v1/completions", json=payload) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one event received; leaving closes the connection
    assert stack.backend.wait_aborted("http-cancel-1", 1.0)


def test_non_streaming_disconnect_aborts_backend(stack, http):
    payload = {"model": "fake-model", "prompt": "hang", "request_id": "http-cancel-2"}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=payload, timeout=0.3)
    assert stack.backend.wait_aborted("http-cancel-2", 1.0)


def test_models_health_and_metrics(stack, http, oai):
    assert [m.id for m in oai.models.list()] == ["fake-model"]
    assert http.get("/health").status_code == 200
    stack.backend.ready = False
    try:
        assert http.get("/health").status_code == 503
    finally:
        stack.backend.ready = True
    oai.completions.create(model="fake-model", prompt="hi", max_tokens=4)
    http.post("/v1/completions", json={"model": "fake-model", "prompt": ""})
    body = http.get("/metrics").text
    for name in ("splitserve_time_to_first_token_seconds_bucket",
                 "splitserve_inter_token_latency_seconds_bucket",
                 "splitserve_e2e_request_latency_seconds_count",
                 'splitserve_requests_total{code="OK"}',
                 'splitserve_requests_total{code="INVALID_ARGUMENT"}',
                 "splitserve_requests_running", "splitserve_requests_waiting",
                 "splitserve_kv_blocks_used", "splitserve_pool_replicas"):
        assert name in body, name


def test_http_listener_is_tcp_so_responses_skip_nagle_delay(stack):
    # asyncio sets TCP_NODELAY only on sockets whose proto is TCP; without it each response
    # waited ~40 ms for a delayed ACK (measured: /v1/models p50 44 ms -> 1.6 ms).
    [listener] = stack.http.server.servers[0].sockets
    assert listener.proto == socket.IPPROTO_TCP


def test_stopping_the_http_server_leaves_no_sse_task_behind(tokenizer):
    """sse-starlette starts a shutdown watcher per loop that only a signal-driven uvicorn
    shutdown ends; stopping our server from code must end it too, or the loop closes on a
    pending task."""
    import asyncio

    import sse_starlette.sse

    from router.config import RouterConfig
    from tests.router.conftest import Stack, make_backend

    stack = Stack(make_backend(tokenizer), tokenizer, RouterConfig(model_name="fake-model"))
    try:
        with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0) as client:
            chunks = list(client.completions.create(model="fake-model", prompt="hi",
                                                    max_tokens=4, stream=True))
        assert chunks
    finally:
        stack.close()
    watcher = sse_starlette.sse._shutdown_watcher.__code__
    pending = [t for t in asyncio.all_tasks(stack.loop) if t.get_coro().cr_code is watcher]
    assert not pending
