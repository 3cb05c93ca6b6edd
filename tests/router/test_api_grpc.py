"""gRPC parity: chat prompts with tools, structured outputs, logit bias, n and prompt
logprobs over splitserve.v1.Generation (fake backend; raw stub and ``router.convert``)."""

from __future__ import annotations

import json

import grpc
import pytest

from engine.structured import StructuredSpec
from router import convert
from router.config import RouterConfig
from tests.router.conftest import MAX_MODEL_LEN, Stack
from tests.router.fake_backend import FakeBackend
from tests.router.test_api_tools import HERMES_REPLY, WEATHER


@pytest.fixture(scope="module")
def tool_stack(tokenizer):
    reply = tokenizer.encode(HERMES_REPLY, add_special_tokens=False)
    backend = FakeBackend(lambda ids: tokenizer.decode(ids), reply, tokenizer.eos_token_ids[0])
    s = Stack(backend, tokenizer, RouterConfig(model_name="fake-model",
                                               max_model_len=4 * MAX_MODEL_LEN))
    yield s
    s.close()


@pytest.fixture(scope="module")
def stub(tool_stack):
    with grpc.insecure_channel(tool_stack.grpc_address) as channel:
        yield convert.GenerationStub(channel)


def _run(stub, req):
    return list(stub.Generate(req, timeout=10))


USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("stream", [True, False])
def test_chat_with_tools_returns_parsed_calls_on_the_last_message(stub, stream):
    msgs = _run(stub, convert.build_request(USER, tools=[WEATHER], stream=stream,
                                            sampling={"max_tokens": 200}))
    assert "".join(m.text for m in msgs) == "Let me look."
    assert all(not m.tool_calls for m in msgs[:-1])
    (call,) = convert.tool_calls_from_proto(msgs[-1])
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_a_tool_result_turn_and_a_named_choice_reach_the_prompt_and_sampling(
        stub, tool_stack, tokenizer):
    history = USER + [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_9", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "rain"}]
    _run(stub, convert.build_request(history, tools=[WEATHER], tool_choice="get_weather",
                                     request_id="grpc-named", sampling={"max_tokens": 20}))
    sent = tool_stack.backend.last_request("grpc-named")
    prompt = tokenizer.decode(sent.prompt_token_ids)
    assert "<tool_response>\nrain\n</tool_response>" in prompt and "<tools>" in prompt
    assert json.loads(sent.params.structured.spec) == WEATHER["function"]["parameters"]


def test_structured_and_logit_bias_reach_sampling(stub, tool_stack):
    for spec in (StructuredSpec.regex("[0-9]+"), StructuredSpec.choice(["a", "b"]),
                 StructuredSpec.json_object()):
        rid = f"grpc-{spec.kind}"
        _run(stub, convert.build_request("hi", request_id=rid, sampling={
            "max_tokens": 3, "structured": spec, "logit_bias": {7: 250.0}}))
        params = tool_stack.backend.last_request(rid).params
        assert params.structured == spec
        assert params.logit_bias == ((7, 100.0),)


def test_a_strict_tool_under_auto_is_enforced_over_grpc_too(stub, tool_stack):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    req = convert.build_request(USER, tools=[strict], request_id="grpc-strict",
                                sampling={"max_tokens": 50})
    assert req.chat.tools[0].strict
    _run(stub, req)
    spec = tool_stack.backend.last_request("grpc-strict").params.structured
    assert spec.kind == "structural_tag"
    assert json.loads(spec.spec)["format"]["tags"][0]["content"]["json_schema"] == \
        WEATHER["function"]["parameters"]


def test_tools_without_the_text_are_refused_not_answered_without_calls(stub, tool_stack):
    """Tool calls are parsed from the reply's text: with return_text=false they were never
    found (no tool_calls, no error). Now refused, naming the option; tool_choice "none"
    (no tools in play) may still leave the text out."""
    before = len(tool_stack.backend.submitted)
    req = convert.build_request(USER, tools=[WEATHER], sampling={"max_tokens": 200})
    req.options.return_text = False
    with pytest.raises(grpc.RpcError) as err:
        _run(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "return_text" in err.value.details()
    assert len(tool_stack.backend.submitted) == before
    req = convert.build_request(USER, tools=[WEATHER], tool_choice="none",
                                sampling={"max_tokens": 200})
    req.options.return_text = False
    msgs = _run(stub, req)
    assert msgs[-1].finish_reason and not any(m.text for m in msgs)


@pytest.mark.parametrize("field, value, param", [
    ("n", 0, "n"),
    ("n", 17, "n"),
    ("prompt_logprobs", 21, "prompt_logprobs"),  # at most 20 alternatives
])
def test_out_of_range_fields_are_invalid_argument_naming_them(stub, field, value, param):
    req = convert.build_request("hi")
    setattr(req.sampling, field, value)
    with pytest.raises(grpc.RpcError) as err:
        _run(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param in err.value.details()


def test_an_invalid_regex_is_refused_before_any_work(stub, tool_stack):
    before = len(tool_stack.backend.submitted)
    req = convert.build_request("hi")
    req.sampling.structured.regex = "("
    with pytest.raises(grpc.RpcError) as err:
        _run(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regex" in err.value.details()
    assert len(tool_stack.backend.submitted) == before


def test_an_old_clients_request_parses_unchanged():
    """New fields only: a request without them is the same bytes and means the same."""
    req = convert.build_request([1, 2, 3], sampling={"max_tokens": 4, "temperature": 0.0})
    again = type(req).FromString(req.SerializeToString())
    assert convert.sampling_from_proto(again.sampling) == {"max_tokens": 4, "temperature": 0.0}
    assert not again.sampling.HasField("structured") and not again.sampling.logit_bias


def test_include_stop_str_in_output_option(stub):
    req = convert.build_request("hi", sampling={"max_tokens": 200, "stop": ["look"]})
    assert "".join(m.text for m in _run(stub, req)) == "Let me "
    req.options.include_stop_str_in_output = True
    assert "".join(m.text for m in _run(stub, req)) == "Let me look"
