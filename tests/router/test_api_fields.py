"""The schema walk: every request field of OpenAI's completions and chat schemas (the
installed ``openai`` package's ``CompletionCreateParams`` TypedDicts) and of our request
models either works (it reaches the backend's SamplingParams, the prompt or the response) or
is refused with 400 naming it; only ``request_fields.NO_EFFECT`` is accepted without effect.
"""

from __future__ import annotations

import json
import typing

import httpx
import pytest
from openai.types import completion_create_params as openai_completion
from openai.types.chat import completion_create_params as openai_chat

from router import openai_protocol as oai
from router.config import RouterConfig
from router.request_fields import NO_EFFECT, REFUSED
from tests.router.conftest import REPLY_TEXT, Stack
from tests.router.test_api_n import NSamplesBackend

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}


def _params(check):
    return ("params", check)


# field -> (value, how it is seen to work). Refused fields are in REFUSED with the value
# to send in BAD below; NO_EFFECT fields need only a 200.
COMMON_WORKS = {
    "model": ("fake-model", None),
    "max_tokens": (7, _params(lambda p: p.max_tokens == 7)),
    "temperature": (0.5, _params(lambda p: p.temperature == 0.5)),
    "top_p": (0.5, _params(lambda p: p.top_p == 0.5)),
    "stop": (["zz"], _params(lambda p: p.stop == ("zz",))),
    "presence_penalty": (0.5, _params(lambda p: p.presence_penalty == 0.5)),
    "frequency_penalty": (0.5, _params(lambda p: p.frequency_penalty == 0.5)),
    "seed": (7, _params(lambda p: p.seed == 7)),
    "logit_bias": ({"9": 150}, _params(lambda p: p.logit_bias == ((9, 100.0),))),
    "response_format": ({"type": "json_object"},
                        _params(lambda p: p.structured.kind == "json_object")),
    "stream": (True, ("body", lambda text: text.rstrip().endswith("data: [DONE]"))),
    "stream_options": ({"include_usage": True}, ("body", lambda text: '"usage": {' in text)),
    "top_k": (3, _params(lambda p: p.top_k == 3)),
    "min_p": (0.1, _params(lambda p: p.min_p == 0.1)),
    "repetition_penalty": (1.1, _params(lambda p: p.repetition_penalty == 1.1)),
    "ignore_eos": (True, _params(lambda p: p.ignore_eos)),
    "stop_token_ids": ([5], _params(lambda p: p.stop_token_ids == (5,))),
    "min_tokens": (2, _params(lambda p: p.min_tokens == 2)),
    "skip_special_tokens": (False, None),  # covered by test_openai's special-token tests
    "include_stop_str_in_output": (True, None),  # test_stop_string_kept_when_asked
    "guided_json": (SCHEMA, _params(lambda p: json.loads(p.structured.spec) == SCHEMA)),
    "guided_regex": ("[ab]+", _params(lambda p: p.structured.spec == "[ab]+")),
    "guided_choice": (["yes", "no"], _params(lambda p: p.structured.spec == ("yes", "no"))),
    "guided_grammar": ('root ::= "x"', _params(lambda p: p.structured.kind == "grammar")),
    "structured_outputs": ({"regex": "[0-9]+"},
                           _params(lambda p: p.structured.spec == "[0-9]+")),
    "request_id": ("walk-id", None),  # the walk sends its own ids this way
    "prompt_logprobs": (2, _params(lambda p: p.prompt_logprobs == 2)),
    "return_token_ids": (True, ("body", lambda text: _has_token_ids(json.loads(text)))),
    "n": (2, ("body", lambda text: [c["index"] for c in json.loads(text)["choices"]]
              == [0, 1])),
}
def _has_token_ids(body: dict) -> bool:
    """vLLM's return_token_ids: the choice's ids, and the prompt's (in the choice for
    completions, beside the choices for chat)."""
    choice = body["choices"][0]
    prompt = choice.get("prompt_token_ids") or body.get("prompt_token_ids")
    return bool(choice["token_ids"]) and bool(prompt)


COMPLETION_WORKS = {
    **COMMON_WORKS,
    "prompt": ("hello", None),
    "logprobs": (2, _params(lambda p: p.logprobs == 2)),
    "echo": (True, ("body", lambda text: json.loads(text)["choices"][0]["text"]
                    .startswith("hello"))),
}
CHAT_WORKS = {
    **COMMON_WORKS,
    "messages": ([{"role": "user", "content": "hello"}], None),
    "max_completion_tokens": (6, _params(lambda p: p.max_tokens == 6)),
    "logprobs": (True, _params(lambda p: p.logprobs == 0)),
    "top_logprobs": (3, _params(lambda p: p.logprobs == 3)),  # sent with logprobs=true
    "tools": ([TOOL], ("prompt", lambda prompt: '"name": "f"' in prompt)),
    "tool_choice": ({"type": "function", "function": {"name": "f"}},
                    _params(lambda p: json.loads(p.structured.spec) == SCHEMA)),
    "parallel_tool_calls": (False, None),  # test_api_tools: keeps the first call
    "add_generation_prompt": (False, ("prompt", lambda prompt: prompt.endswith("hello\n"))),
    "continue_final_message": (True, ("prompt", lambda prompt: prompt.endswith("\nSure"))),
    "chat_template_kwargs": ({"enable_thinking": False},
                             ("prompt", lambda prompt: prompt.endswith("</think>\n\n"))),
}
COMPANIONS = {"top_logprobs": {"logprobs": True}, "stream_options": {"stream": True},
              "tool_choice": {"tools": [TOOL]}, "parallel_tool_calls": {"tools": [TOOL]},
              "continue_final_message": {"add_generation_prompt": False, "messages": [
                  {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Sure"}]}}
BAD = {"best_of": 3, "suffix": "tail", "store": True,
       "service_tier": "flex", "audio": {"voice": "alloy", "format": "mp3"},
       "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
       "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
       "moderation": {"x": 1}, "prompt_cache_options": {"x": 1},
       "functions": [{"name": "f"}], "function_call": "auto"}
NO_EFFECT_VALUES = {"user": "u1", "safety_identifier": "s1", "metadata": {"k": "v"},
                    "prompt_cache_key": "k", "prompt_cache_retention": "24h"}


def _openai_keys(module) -> set[str]:
    keys: set[str] = set()
    for name in ("CompletionCreateParamsStreaming", "CompletionCreateParamsNonStreaming"):
        keys |= set(typing.get_type_hints(getattr(module, name)))
    return keys


ENDPOINTS = {
    "completions": ("/v1/completions", {"model": "fake-model", "prompt": "hello"},
                    _openai_keys(openai_completion) | set(oai.CompletionRequest.model_fields),
                    COMPLETION_WORKS),
    "chat": ("/v1/chat/completions",
             {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]},
             _openai_keys(openai_chat) | set(oai.ChatCompletionRequest.model_fields),
             CHAT_WORKS),
}
CASES = [(ep, f) for ep, (_, _, fields, _) in ENDPOINTS.items() for f in sorted(fields)]


@pytest.fixture(scope="module")
def stack(tokenizer):
    """A stack whose context fits the tools' system prompt."""
    reply = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    backend = NSamplesBackend(lambda ids: tokenizer.decode(ids), reply,
                              tokenizer.eos_token_ids[0])
    s = Stack(backend, tokenizer, RouterConfig(model_name="fake-model", max_model_len=1024))
    yield s
    s.close()


def test_the_openai_schema_was_read():
    assert {"logit_bias", "best_of", "echo", "suffix", "stream"} <= ENDPOINTS["completions"][2]
    assert {"tools", "tool_choice", "response_format", "audio"} <= ENDPOINTS["chat"][2]


@pytest.mark.parametrize("endpoint, field", CASES)
def test_every_field_works_or_is_refused_naming_it(stack, endpoint, field):
    path, base, _, works = ENDPOINTS[endpoint]
    kinds = [field in works, field in REFUSED, field in NO_EFFECT]
    assert sum(kinds) == 1, f"{field} must be exactly one of works / refused / no effect"
    rid = f"walk-{endpoint}-{field}"
    body = {**base, "max_tokens": 20, "request_id": rid, **COMPANIONS.get(field, {})}
    if field in REFUSED:
        body[field] = BAD[field]
        resp = httpx.post(stack.base_url + path, json=body, timeout=10)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field
        return
    value, check = works.get(field) or (NO_EFFECT_VALUES[field], None)
    body[field] = value
    if field == "max_completion_tokens":
        del body["max_tokens"]
    resp = httpx.post(stack.base_url + path, json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    if check is None:
        return
    where, ok = check
    if where == "params":
        assert ok(stack.backend.last_request(body["request_id"]).params)
    elif where == "prompt":
        ids = stack.backend.last_request(body["request_id"]).prompt_token_ids
        assert ok(stack.service.tokenizer.decode(ids))
    else:
        assert ok(resp.text)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_unknown_field_is_refused_naming_it(stack, endpoint):
    path, base, _, _ = ENDPOINTS[endpoint]
    resp = httpx.post(stack.base_url + path, json={**base, "frobnicate": 1}, timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "frobnicate" and "unknown field" in error["message"]


def test_refused_fields_accept_their_no_op_values(stack):
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3, "best_of": 1,
            "store": False, "service_tier": "auto", "suffix": ""}
    assert httpx.post(stack.base_url + "/v1/completions", json=body, timeout=10).status_code \
        == 200
