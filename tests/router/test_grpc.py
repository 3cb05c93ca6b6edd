"""The gRPC edge against the fake backend: streaming, errors, deadlines, cancel, health."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from router.client import SplitServeClient
from tests.router.conftest import MAX_MODEL_LEN, REPLY_TEXT


@pytest.fixture(scope="module")
def client(stack):
    with SplitServeClient(stack.grpc_address, timeout=10) as c:
        yield c


def test_stream_yields_coalesced_deltas_then_one_final(client, reply_ids):
    chunks = list(client.stream("hello there", max_tokens=6, temperature=0))
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert [len(c.token_ids) for c in chunks] == [2, 2, 2]  # the fake's 2 tokens per step
    assert [t for c in chunks for t in c.token_ids] == reply_ids[:6]
    final = chunks[-1]
    assert final.usage.completion_tokens == 6
    assert final.usage.prompt_tokens > 0
    assert final.usage.cached_tokens == final.usage.prompt_tokens // 2
    assert final.timing["kv_transfer"] == pytest.approx(0.003)
    assert 0 <= final.timing["ttft"] <= final.timing["e2e"]
    assert final.request_id and all(c.request_id == final.request_id for c in chunks)


def test_non_streaming_returns_whole_reply_and_stops_at_eos(stack, client, tokenizer):
    result = client.generate("hello", max_tokens=200, request_id="whole-1")
    assert result.text == REPLY_TEXT
    assert result.finish_reason == "stop"
    assert tokenizer.eos_token_ids[0] == tokenizer.eos_token_id  # what the fake ends with
    assert result.stop_reason is None  # vLLM's: the model's own eos is no stop token
    assert result.request_id == "whole-1"


def test_stop_reason_names_the_stop_token_id_that_ended_it(client, tokenizer):
    """As vLLM: a stop token id (a generation_config.json eos counts as one) is named."""
    reply = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    result = client.generate("hello", max_tokens=200, stop_token_ids=[reply[2]])
    assert result.finish_reason == "stop" and result.stop_reason == reply[2]
    assert result.token_ids == reply[:3]


def test_sampling_fields_reach_backend_with_unset_meaning_default(stack, client):
    client.generate([5, 6, 7], request_id="params-1", max_tokens=3, temperature=0.5,
                    top_k=7, seed=11, stop_token_ids=[9], repetition_penalty=1.2)
    req = stack.backend.last_request("params-1")
    assert req.prompt_token_ids == [5, 6, 7]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop_token_ids) == (3, 0.5, 7, 11, (9,))
    assert p.repetition_penalty == pytest.approx(1.2)
    assert (p.top_p, p.min_p, p.logprobs) == (1.0, 0.0, None)  # unset -> SamplingParams defaults
    client.generate("x", request_id="params-2")
    assert stack.backend.last_request("params-2").params.max_tokens == MAX_MODEL_LEN - 1


def test_stop_string_spanning_tokens_stops_exactly_and_aborts_backend(stack, client, tokenizer):
    stop = "own fo"  # inside "brown fox", across a token boundary
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(REPLY_TEXT, add_special_tokens=False)]
    assert stop not in pieces and not any(stop in p for p in pieces)
    chunks = list(client.stream("hi", request_id="stop-1", max_tokens=50, stop=[stop]))
    assert "".join(c.text for c in chunks) == "The quick br"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop
    ids = [t for c in chunks for t in c.token_ids]
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
    assert stack.backend.wait_aborted("stop-1", 1.0)


def test_a_stop_string_within_min_tokens_is_text(client, tokenizer):
    """As vLLM: stop strings end the output only after min_tokens tokens."""
    ids = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    quick_done = next(k for k in range(1, len(ids) + 1) if "quick" in tokenizer.decode(ids[:k]))
    early = client.generate("hi", max_tokens=50, stop=["quick"])
    assert early.text == "The " and early.finish_reason == "stop"
    late = client.generate("hi", max_tokens=50, stop=["quick", "fox"], min_tokens=quick_done)
    assert late.text == "The quick brown " and late.stop_reason == "fox"


def test_logprobs_are_returned_per_token(client):
    result = client.generate("hi", max_tokens=4, logprobs=2)
    assert len(result.logprobs) == 4
    assert [len(e.top) for e in result.logprobs] == [2, 2, 2, 2]
    assert result.logprobs[0].logprob == pytest.approx(-0.5)
    assert result.logprobs[0].token  # decoded text of the token


def test_abort_rpc_ends_stream_with_abort(stack, client):
    stream = client.stream("slow please", request_id="abort-1", max_tokens=100)
    assert next(stream).token_ids  # in flight now
    assert client.abort("abort-1") is True
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert client.abort("abort-1") is False  # no longer in flight
    for bad in ("", "x" * 200, "bad id!"):  # no request can have it: refused, not "unknown"
        with pytest.raises(InvalidRequestError, match="request_id must be"):
            client.abort(bad)


def test_deadline_aborts_in_backend(stack, client):
    with pytest.raises(DeadlineExceededError):
        client.generate("hang forever", request_id="deadline-1", timeout=0.3)
    assert stack.backend.wait_aborted("deadline-1", 1.0)


def test_client_cancel_reaches_backend_within_a_second(stack, client):
    stream = client.stream("slow please", request_id="cancel-1", max_tokens=100)
    first = next(stream)
    assert first.token_ids
    stream.close()  # leaving early cancels the call
    assert stack.backend.wait_aborted("cancel-1", 1.0)


@pytest.mark.parametrize("prompt, kwargs, field", [
    ("hi", {"temperature": -1.0}, "temperature"),
    ("hi", {"top_p": 0.0}, "top_p"),
    ("", {}, "prompt"),
    ("hi", {"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ([10**6], {}, "vocabulary"),
    ("word " * MAX_MODEL_LEN, {}, "context"),
])
def test_bad_inputs_are_invalid_argument_naming_the_field(client, prompt, kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        client.generate(prompt, **kwargs)
    assert err.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(err.value)


def test_unknown_model_is_not_found(stack):
    with SplitServeClient(stack.grpc_address, model="gpt-17") as c, \
            pytest.raises(NotFoundError, match="gpt-17"):
        c.generate("hi")


def test_backend_failure_is_classified(client):
    with pytest.raises(UnavailableError, match="KV transfer failed"):
        client.generate("this will fail", max_tokens=20)


def test_not_ready_is_unavailable_and_health_follows(stack, client):
    channel = grpc.insecure_channel(stack.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    check = lambda name="": health.Check(health_pb2.HealthCheckRequest(service=name)).status  # noqa: E731
    assert check() == health_pb2.HealthCheckResponse.SERVING
    assert check("splitserve.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
    stack.backend.ready = False
    try:
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(UnavailableError):
            client.generate("hi")
    finally:
        stack.backend.ready = True
    assert check() == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_health_watch_follows_readiness_without_polling(stack):
    """Watch is driven by the backend's readiness reports (nothing re-reads it on a timer):
    each change must reach an open Watch stream."""
    channel = grpc.insecure_channel(stack.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    statuses = iter(stream)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert next(statuses).status == serving
        stack.backend.ready = False  # the fake backend reports it, as workers leaving would
        assert next(statuses).status == not_serving
        stack.backend.ready = True
        assert next(statuses).status == serving
    finally:
        stack.backend.ready = True
        stream.cancel()
        channel.close()


def test_reflection_lists_services(stack):
    channel = grpc.insecure_channel(stack.grpc_address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"splitserve.v1.Generation", "grpc.health.v1.Health"} <= names
    channel.close()


def test_list_models_and_model_info(client, tokenizer):
    [card] = client.list_models()
    assert (card.id, card.max_model_len) == ("fake-model", MAX_MODEL_LEN)
    info = client.model_info("fake-model")
    assert info.vocab_size == tokenizer.vocab_size and info.ready
    assert list(info.eos_token_ids) == list(tokenizer.eos_token_ids)
    with pytest.raises(NotFoundError):
        client.model_info("nope")


def test_a_migrated_requests_timing_says_how_often_and_how_long_it_waited(stack, client):
    import httpx

    final = list(client.stream("migrated here", max_tokens=4, temperature=0))[-1]
    assert final.timing["migrations"] == 1 and final.timing["migration"] == 2.5
    assert final.timing["kv_transfer"] == pytest.approx(0.003)
    plain = list(client.stream("hello there", max_tokens=4, temperature=0))[-1]
    assert "migrations" not in plain.timing and "migration" not in plain.timing
    body = httpx.post(f"{stack.base_url}/v1/completions", timeout=10, json={
        "model": "fake-model", "prompt": "migrated", "max_tokens": 2}).json()
    assert body["splitserve"]["timing"]["migrations"] == 1.0
    metrics = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    assert 'splitserve_request_phase_seconds_count{phase="migration"}' in metrics
    assert 'phase="migrations"' not in metrics  # a count is no phase
