"""Every client field is bounded at the edge, so that no request can hurt another (issue 12,
items 2 and 6): request ids, invalid Unicode, special-token text (the special token, as
vLLM reads it), token ids against the model's vocabulary, body size (413) and prompt length
(400), and a large prompt tokenized off the event loop."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import grpc
import httpx
import pytest

from router import convert
from router.config import RouterConfig
from router.validation import MAX_REQUEST_ID_LEN
from tests.router.conftest import MAX_MODEL_LEN, Stack, make_backend

BODY_LIMIT = 64 << 10
PROMPT_CHARS = 20_000


@pytest.fixture(scope="module")
def edge(tokenizer):
    config = RouterConfig(model_name="edge", max_model_len=MAX_MODEL_LEN,
                          max_request_body_bytes=BODY_LIMIT, max_prompt_chars=PROMPT_CHARS)
    s = Stack(make_backend(tokenizer), tokenizer, config)
    yield s
    s.close()


def _post(stack, body: dict | bytes, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.base_url}{path}", content=content,
                      headers={"content-type": "application/json"}, timeout=20, **kw)


def _grpc_generate(stack, **fields):
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = convert.GenerationStub(channel)
        return list(stub.Generate(convert.build_request(**fields), timeout=10))


@pytest.mark.parametrize("bad", ["x" * 600, "x" * (MAX_REQUEST_ID_LEN + 1), "a b",
                                 "id\nnewline", "é", "../etc"])
def test_bad_request_id_is_a_400_naming_the_field(edge, bad):
    resp = _post(edge, {"model": "edge", "prompt": "hi", "max_tokens": 2, "request_id": bad})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "request_id"
    assert "request_id must be 1 to 128 characters" in resp.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(edge, prompt="hi", request_id=bad, sampling={"max_tokens": 2})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.value.details()
    assert not any(r.request_id == bad for r in edge.backend.submitted)


def test_good_request_ids_pass_through(edge):
    rid = "Req_1.2:3@svc=a+b-" + "z" * (MAX_REQUEST_ID_LEN - 18)
    resp = _post(edge, {"model": "edge", "prompt": "hi", "max_tokens": 2, "request_id": rid})
    assert resp.status_code == 200, resp.text
    assert edge.backend.last_request(rid).request_id == rid


@pytest.mark.parametrize("field", ["prompt", "messages", "stop"])
def test_lone_surrogate_is_a_400_and_the_connection_stays_open(edge, field):
    """JSON "\\ud800" decodes to a lone surrogate: no tokenizer or response can encode it.
    It used to be a 500 that dropped the keep-alive connection."""
    path, body = "/v1/completions", {"model": "edge", "prompt": "hi", "max_tokens": 2}
    if field == "messages":
        path, body = "/v1/chat/completions", {"model": "edge", "max_tokens": 2, "messages": [
            {"role": "user", "content": "PLACEHOLDER"}]}
    elif field == "stop":
        body["stop"] = ["PLACEHOLDER"]
    else:
        body["prompt"] = "PLACEHOLDER"
    raw = json.dumps(body).replace("PLACEHOLDER", "a\\ud800b").encode()
    conn = http.client.HTTPConnection("127.0.0.1", edge.http.port, timeout=10)
    try:
        conn.request("POST", path, raw, {"content-type": "application/json"})
        resp = conn.getresponse()
        error = json.loads(resp.read())["error"]
        assert resp.status == 400
        assert "lone surrogate" in error["message"] and error["param"] == field
        sock = conn.sock
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "edge", "prompt": "hi", "max_tokens": 2}).encode(),
            {"content-type": "application/json"})
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["usage"]
        assert conn.sock is sock  # the same keep-alive connection served it
    finally:
        conn.close()


def test_special_token_text_in_a_prompt_is_the_special_token_as_in_vllm(edge, tokenizer):
    """A completions prompt already in the chat format means its markers: vLLM and
    transformers encode "<|im_end|>" as the special token, not as its characters."""
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    resp = _post(edge, {"model": "edge", "prompt": text, "max_tokens": 2,
                        "request_id": "special-text"})
    assert resp.status_code == 200, resp.text
    ids = edge.backend.last_request("special-text").prompt_token_ids
    assert ids == tokenizer._hf.encode(text)
    assert ids.count(2) == 2 and ids.count(3) == 1  # <|im_start|> twice, <|im_end|> once
    # the same conversation through chat gives the same markers
    chat = _post(edge, {"model": "edge", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 2, "request_id": "chat-markers"},
                 path="/v1/chat/completions")
    assert chat.status_code == 200
    assert 2 in edge.backend.last_request("chat-markers").prompt_token_ids  # <|im_start|>


def test_token_ids_are_checked_against_the_vocabulary_modelinfo_reports(edge, tokenizer):
    from router.client import SplitServeClient

    with SplitServeClient(edge.grpc_address, timeout=10) as client:
        vocab = client.model_info().vocab_size
    assert vocab == tokenizer.vocab_size
    models = httpx.get(f"{edge.base_url}/v1/models").json()["data"]
    assert [m["vocab_size"] for m in models] == [vocab]
    resp = _post(edge, {"model": "edge", "prompt": [5, vocab], "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert f"[0, {vocab})" in resp.json()["error"]["message"]
    assert _post(edge, {"model": "edge", "prompt": [5, vocab - 1], "max_tokens": 2}
                 ).status_code == 200


def test_body_over_the_limit_is_413_with_an_openai_error(edge):
    prompt = "a" * (BODY_LIMIT + 10)
    resp = _post(edge, {"model": "edge", "prompt": prompt})
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert f"at most {BODY_LIMIT} bytes" in error["message"]

    def chunked():  # no Content-Length: counted while read
        body = json.dumps({"model": "edge", "prompt": prompt}).encode()
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]
    resp = httpx.post(f"{edge.base_url}/v1/completions", content=chunked(),
                      headers={"content-type": "application/json"}, timeout=20)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_ten_megabyte_prompt_is_refused_quickly(edge):
    start = time.monotonic()
    resp = _post(edge, {"model": "edge", "prompt": "word " * 2_000_000})
    assert resp.status_code == 413
    assert time.monotonic() - start < 5


def test_prompt_longer_than_the_character_limit_is_a_400(edge):
    resp = _post(edge, {"model": "edge", "prompt": "b" * (PROMPT_CHARS + 1)})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert f"limit of {PROMPT_CHARS}" in resp.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(edge, prompt="b" * (PROMPT_CHARS + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many_ids = _post(edge, {"model": "edge", "prompt": [5] * (MAX_MODEL_LEN + 1)})
    assert too_many_ids.status_code == 400


def test_a_large_prompt_is_tokenized_off_the_event_loop(stack):
    """A ~1 MB prompt (within the default limits) takes about a second to tokenize; the
    event loop, which every stream shares, must keep turning meanwhile."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:  # on the server's loop: how late does a 5 ms sleep wake up?
        while not stop.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)

    probing = asyncio.run_coroutine_threadsafe(probe(), stack.loop)
    prompt = "The quick brown fox jumps over the lazy dog. " * 22_000  # ~990k characters
    start = time.monotonic()
    resp = _post(stack, {"model": "fake-model", "prompt": prompt, "max_tokens": 2})
    took = time.monotonic() - start
    stack.loop.call_soon_threadsafe(stop.set)
    probing.result(5)
    assert resp.status_code == 400  # tokenized, then longer than the model's context
    assert "tokens" in resp.json()["error"]["message"]
    assert took > 0.2, "the prompt was not tokenized at all"
    assert max(lags) < max(0.25, took / 3), (max(lags), took)


@pytest.mark.parametrize(("extra", "param"), [
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
])
def test_stop_lists_are_bounded(edge, extra, param):
    """Stop strings are matched per token on the event loop and stop ids looked up per step
    on the workers: a client cannot make them unbounded."""
    resp = _post(edge, {"model": "edge", "prompt": "hi", "max_tokens": 2, **extra})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(edge, prompt="hi", sampling={"max_tokens": 2, **extra})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = {k: v[:4] for k, v in extra.items()}
    assert _post(edge, {"model": "edge", "prompt": "hi", "max_tokens": 2, **ok}
                 ).status_code == 200
