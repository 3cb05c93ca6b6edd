"""Completions batches, echo, include_stop_str_in_output, logit_bias and structured-output
fields at the OpenAI edge (fake backend: it replies REPLY_TEXT whatever the constraint)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.router.conftest import REPLY_TEXT


@pytest.fixture
def oai(stack):
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0,
                       timeout=10) as client:
        yield client


def _post(stack, path, **body):
    return httpx.post(stack.base_url + path, json={"model": "fake-model", **body}, timeout=10)


def test_batched_prompts_give_one_choice_per_prompt(oai, stack, tokenizer):
    ids = tokenizer.encode("token ids", add_special_tokens=False)
    resp = oai.completions.create(model="fake-model", prompt=[ids, ids[:1]], max_tokens=3,
                                  extra_body={"request_id": "batch"})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.text == resp.choices[0].text for c in resp.choices)
    assert resp.usage.prompt_tokens == len(ids) + 1 and resp.usage.completion_tokens == 6
    assert stack.backend.last_request("batch-1").prompt_token_ids == ids[:1]
    text = oai.completions.create(model="fake-model", prompt=["a", "b", "c"], max_tokens=200)
    assert [c.text for c in text.choices] == [REPLY_TEXT] * 3


def test_batched_prompts_stream_with_indexes_and_one_usage(oai):
    stream = oai.completions.create(model="fake-model", prompt=["one", "two"], max_tokens=200,
                                    stream=True, stream_options={"include_usage": True})
    texts, finishes, usages = {0: "", 1: ""}, {}, []
    for event in stream:
        if event.usage is not None:
            usages.append(event.usage)
        for choice in event.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: REPLY_TEXT, 1: REPLY_TEXT} and finishes == {0: "stop", 1: "stop"}
    assert len(usages) == 1 and usages[0].completion_tokens > 0


def test_a_refused_prompt_in_a_batch_refuses_the_request_before_any_work(stack):
    before = len(stack.backend.submitted)
    resp = _post(stack, "/v1/completions", prompt=["fine", "x" * 5000], max_tokens=3)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert len(stack.backend.submitted) == before


def test_echo_puts_the_prompt_first(oai, tokenizer):
    resp = oai.completions.create(model="fake-model", prompt="Once upon", max_tokens=200,
                                  echo=True)
    assert resp.choices[0].text == "Once upon" + REPLY_TEXT
    ids = tokenizer.encode("Once upon", add_special_tokens=False)
    stream = oai.completions.create(model="fake-model", prompt=ids, max_tokens=200, echo=True,
                                    stream=True)
    assert "".join(e.choices[0].text for e in stream) == "Once upon" + REPLY_TEXT


def test_echo_with_logprobs_asks_for_prompt_logprobs(stack):
    """The values themselves: tests/router/test_prompt_logprobs_e2e.py (a real model)."""
    resp = _post(stack, "/v1/completions", prompt="hi", echo=True, logprobs=2,
                 request_id="echo-lp")
    assert resp.status_code == 200
    assert stack.backend.last_request("echo-lp").params.prompt_logprobs == 2
    resp = _post(stack, "/v1/completions", prompt="hi", echo=True, logprobs=1,
                 prompt_logprobs=21)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "prompt_logprobs"


def test_stop_string_kept_when_asked(oai):
    plain = oai.completions.create(model="fake-model", prompt="hi", stop=["brown"],
                                   max_tokens=200)
    kept = oai.completions.create(model="fake-model", prompt="hi", stop=["brown"],
                                  max_tokens=200,
                                  extra_body={"include_stop_str_in_output": True})
    assert plain.choices[0].text == "The quick "
    assert kept.choices[0].text == "The quick brown"
    assert kept.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"),
    ({"guided_json": {"type": "nope"}}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "wat"}}}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_sampling_fields_are_400_naming_them(stack, body, param):
    before = len(stack.backend.submitted)
    resp = _post(stack, "/v1/completions", prompt="hi", **body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert len(stack.backend.submitted) == before  # refused before any work


def test_response_format_json_schema_reaches_the_engine(stack):
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    resp = _post(stack, "/v1/chat/completions", request_id="rf-schema", max_tokens=5,
                 messages=[{"role": "user", "content": "hi"}],
                 response_format={"type": "json_schema", "json_schema": {
                     "name": "n", "schema": schema, "strict": True}})
    assert resp.status_code == 200
    spec = stack.backend.last_request("rf-schema").params.structured
    assert spec.kind == "json_schema" and json.loads(spec.spec) == schema


@pytest.mark.parametrize("stream, word, status", [
    (False, "fail", 503),  # the fake's KV transfer failure after one output: UNAVAILABLE
    (True, "busy", 429),  # refused before any output: RESOURCE_EXHAUSTED, before the 200
])
def test_a_failing_prompt_in_a_batch_fails_the_request_and_aborts_the_others(
        stack, stream, word, status):
    rid = f"batch-fail-{stream}"
    resp = _post(stack, "/v1/completions", prompt=["hang here", f"{word} here"],
                 max_tokens=50, request_id=rid, stream=stream)
    assert resp.status_code == status, resp.text  # as it would be for that prompt alone
    assert stack.backend.wait_aborted(f"{rid}-0", timeout=5)


def test_a_client_leaving_a_batch_stream_aborts_every_prompt(stack):
    rid = "batch-leave"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", timeout=0.5, json={
            "model": "fake-model", "prompt": ["hang a", "hang b"], "stream": True,
            "request_id": rid})
    assert stack.backend.wait_aborted(f"{rid}-0", timeout=5)
    assert stack.backend.wait_aborted(f"{rid}-1", timeout=5)
