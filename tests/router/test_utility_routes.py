"""vLLM's utility routes on the HTTP edge: /version, /v1/models/{id}, /tokenize, /detokenize,
driven by the official ``openai`` client and httpx, behind the API key like /v1/*."""

from __future__ import annotations

import httpx
import openai
import pytest

from router.config import RouterConfig
from tests.router.conftest import MAX_MODEL_LEN, Stack, make_backend

KEY = "utility-key"


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(tokenizer):
    s = Stack(make_backend(tokenizer), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN, api_key=KEY))
    yield s
    s.close()


def test_models_retrieve_with_the_openai_sdk(stack):
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=10) as client:
        model = client.models.retrieve("fake-model")
        assert model.id == "fake-model" and model.object == "model"
        assert model.model_extra["max_model_len"] == MAX_MODEL_LEN
        assert model.model_dump() == client.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("no-such-model")
    body = err.value.body
    assert body["code"] == "model_not_found" and "no-such-model" in body["message"]
    assert err.value.response.json()["error"]["type"] == "invalid_request_error"


def test_version(http):
    resp = http.get("/version")
    assert resp.status_code == 200
    assert resp.json()["version"].count(".") >= 1  # a package version such as 0.1.0


def test_tokenize_prompt_as_vllm_answers(http, tokenizer):
    resp = http.post("/tokenize", json={"model": "fake-model", "prompt": "Hello world"})
    assert resp.status_code == 200
    body = resp.json()
    ids = tokenizer.encode("Hello world", add_special_tokens=True)
    assert body == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                    "token_strs": None}
    strs = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    pieces = strs.json()["token_strs"]
    assert len(pieces) == len(ids) and "".join(pieces).strip() == "Hello world"


def test_tokenize_counts_what_a_completion_sends(http, stack):
    """The prompt tokens /tokenize counts are the ones /v1/completions reports as usage,
    special-token text read as the special token by both (as vLLM reads it)."""
    prompt = "The quick brown fox <|im_end|> jumps"
    assert 3 in http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    count = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    done = http.post("/v1/completions", json={"model": "fake-model", "prompt": prompt,
                                              "max_tokens": 1})
    assert done.status_code == 200 and done.json()["usage"]["prompt_tokens"] == count


def test_tokenize_chat_renders_the_template(http, stack):
    messages = [{"role": "user", "content": "Hello!"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    chat = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": messages,
                                                   "max_tokens": 1})
    assert body["count"] == chat.json()["usage"]["prompt_tokens"] == len(body["tokens"])
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert bare.json()["count"] < body["count"]


@pytest.fixture(scope="module")
def long_http(tokenizer):
    """A context long enough for a chat template's tool preamble."""
    s = Stack(make_backend(tokenizer), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=4 * MAX_MODEL_LEN))
    with httpx.Client(base_url=s.base_url, timeout=10) as client:
        yield client
    s.close()


def test_tokenize_chat_with_tools_counts_what_a_chat_with_tools_sends(long_http):
    """The tools are part of the prompt the chat template renders: /tokenize counts them
    as /v1/chat/completions sends them (vLLM's TokenizeChatRequest takes them too)."""
    http = long_http
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with_tools = http.post("/tokenize", json={"messages": messages, "tools": tools}).json()
    without = http.post("/tokenize", json={"messages": messages}).json()
    chat = http.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": messages, "tools": tools, "tool_choice": "none",
        "max_tokens": 1})
    chat_with = http.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": messages, "tools": tools, "max_tokens": 1})
    assert with_tools["count"] > without["count"]  # the template wrote the tools
    assert chat_with.json()["usage"]["prompt_tokens"] == with_tools["count"]
    assert chat.json()["usage"]["prompt_tokens"] == without["count"]  # "none": no tools


def test_detokenize_round_trips(http, tokenizer):
    ids = tokenizer.encode("Disaggregated serving", add_special_tokens=False)
    resp = http.post("/detokenize", json={"model": "fake-model", "tokens": ids})
    assert resp.status_code == 200 and resp.json() == {"prompt": "Disaggregated serving"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "hi", "model": "other"}, 404, None),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, 400,
     "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "other"}, 404, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "chat_template_kwargs": {"tokenize": False}}, 400, "chat_template_kwargs"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "continue_final_message": True}, 400, "continue_final_message"),
    # A field that would change nothing here is refused, naming it
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "chat_template": "{{ 'x' }}"}, 400, "chat_template"),
    ("/tokenize", {"prompt": "hi", "tools": []}, 400, "tools"),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": False}, 400,
     "add_generation_prompt"),
    ("/tokenize", {"prompt": "hi", "chat_template_kwargs": {"x": 1}}, 400,
     "chat_template_kwargs"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "code_interpreter"}]}, 400, "tools"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, 400, "skip_special_tokens"),
])
def test_bad_requests_are_openai_errors(http, path, body, status, param):
    resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/version", None), ("GET", "/v1/models/fake-model", None),
    ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
])
def test_api_key_guards_the_utility_routes(keyed, method, path, body):
    url = f"{keyed.base_url}{path}"
    anonymous = httpx.request(method, url, json=body, timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    good = httpx.request(method, url, json=body, timeout=5,
                         headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200, good.text
