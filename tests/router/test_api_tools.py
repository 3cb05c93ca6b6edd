"""Tool calling: the parsers on crafted outputs, ``tools``/``tool_choice`` checks and their
structured-output constraint, and calls coming back through the official ``openai`` client
(stream and non-stream) from a backend that replies with a Hermes call."""

from __future__ import annotations

import json

import openai
import pytest

from router.chat import ToolSpec
from router.config import RouterConfig
from router.errors import InvalidParamError
from router.tool_parsers import ToolCallStream, get_parser
from tests.router.conftest import MAX_MODEL_LEN, Stack
from tests.router.fake_backend import FakeBackend

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
HERMES_REPLY = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                '"Paris"}}\n</tool_call>')


# ---- parsers on crafted outputs -----------------------------------------------------------

def test_hermes_parses_calls_and_keeps_the_text_around_them():
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}'
            '</tool_call>')
    content, calls = get_parser("hermes").parse(text)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


@pytest.mark.parametrize("text", [
    "no calls at all",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": {"a": 1}',  # cut off by the token limit
])
def test_hermes_leaves_what_is_not_a_call_in_the_content(text):
    assert get_parser("hermes").parse(text) == (text, [])


def test_hermes_accepts_arguments_as_json_text():
    _, calls = get_parser("hermes").parse(
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 1}


def test_llama3_json_calls():
    parser = get_parser("llama3")
    _, calls = parser.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                    {"city": "Oslo"})]
    content, calls = parser.parse('<|python_tag|>{"name": "a", "parameters": {}}; '
                                  '{"name": "b", "arguments": {"x": 2}}')
    assert content == "" and [c.name for c in calls] == ["a", "b"]
    for text in ("The answer is {1}.", '{"name": "a", "parameters": {}} and more text',
                 '{"parameters": {}}'):
        assert parser.parse(text) == (text, [])


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")


@pytest.mark.parametrize("pieces", [
    [HERMES_REPLY],
    list(HERMES_REPLY),  # one character at a time: the marker arrives split
    ["Let me look.<tool", "_call>\n{\"name\": \"get_weather\", \"arguments\": "
     "{\"city\": \"Paris\"}}\n</tool_call>"],
])
def test_streaming_releases_content_before_the_call_and_the_call_at_the_end(pieces):
    stream = ToolCallStream(get_parser("hermes"))
    released = "".join(stream.feed(p) for p in pieces)
    rest, calls = stream.finish()
    assert released + rest == "Let me look."
    assert "<" not in released
    assert [c.name for c in calls] == ["get_weather"]


def test_streaming_text_that_only_looks_like_a_marker_start_is_released():
    stream = ToolCallStream(get_parser("hermes"))
    out = stream.feed("a < b and <tool") + stream.feed("box> done")
    rest, calls = stream.finish()
    assert out + rest == "a < b and <toolbox> done" and calls == []


def test_llama3_streaming_holds_a_json_reply_and_releases_prose():
    stream = ToolCallStream(get_parser("llama3"))
    assert stream.feed(' {"name": "a", ') == ""
    assert stream.feed('"parameters": {}}') == ""
    assert [c.name for c in stream.finish()[1]] == ["a"]
    prose = ToolCallStream(get_parser("llama3"))
    assert prose.feed("Hello") == "Hello"


@pytest.mark.parametrize("parser, opening", [("hermes", "<tool_call>"),
                                             ("llama3", '{"name": ')])
def test_a_strict_tool_under_auto_is_enforced_in_each_parsers_format(parser, opening):
    """Every shipped parser writes its calls as a structural tag (llama3's was None: a
    strict tool under auto was accepted and not enforced); what the tag writes, the parser
    reads back as the call."""
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    spec = ToolSpec([strict, TIME], "auto", False).structured(get_parser(parser))
    assert spec is not None and spec.kind == "structural_tag"
    fmt = json.loads(spec.spec)["format"]
    assert fmt["triggers"] == [opening] and fmt["stop_after_first"] is True
    assert [t["content"]["json_schema"] for t in fmt["tags"]] == [
        WEATHER["function"]["parameters"], TIME["function"]["parameters"]]
    tag = fmt["tags"][0]
    written = tag["begin"] + '{"city": "Paris"}' + tag["end"]
    content, calls = get_parser(parser).parse(written)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]


def test_parallel_tool_calls_false_keeps_the_first_call():
    stream = ToolCallStream(get_parser("hermes"), max_calls=1)
    stream.feed('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert [c.name for c in stream.finish()[1]] == ["a"]


# ---- tools / tool_choice ------------------------------------------------------------------

def test_tool_choice_sets_the_constraint():
    assert ToolSpec([WEATHER], None, None).choice == "auto"
    assert ToolSpec([WEATHER], "auto", None).structured() is None
    assert ToolSpec([WEATHER], "none", None).template_tools is None
    named = ToolSpec([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                     None).structured()
    assert json.loads(named.spec) == TIME["function"]["parameters"]
    required = json.loads(ToolSpec([WEATHER, TIME], "required", False).structured().spec)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [b["properties"]["name"]["const"] for b in required["items"]["anyOf"]] == [
        "get_weather", "get_time"]


@pytest.mark.parametrize("tools, choice, param", [
    (None, "required", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "other"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([{"type": "code_interpreter"}], None, "tools"),
    ([WEATHER, WEATHER], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}], None,
     "tools"),
])
def test_bad_tools_are_refused_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidParamError) as err:
        ToolSpec(tools, choice, None)
    assert err.value.param == param


# ---- through the openai client ------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_stack(tokenizer):
    reply = tokenizer.encode(HERMES_REPLY, add_special_tokens=False)
    backend = FakeBackend(lambda ids: tokenizer.decode(ids), reply, tokenizer.eos_token_ids[0])
    s = Stack(backend, tokenizer, RouterConfig(model_name="fake-model",
                                               max_model_len=4 * MAX_MODEL_LEN))
    yield s
    s.close()


@pytest.fixture
def client(tool_stack):
    with openai.OpenAI(base_url=f"{tool_stack.base_url}/v1", api_key="x", max_retries=0,
                       timeout=10) as c:
        yield c


def test_auto_tool_call_non_stream(client, tool_stack, tokenizer):
    resp = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER], max_tokens=200)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the tools reached the template: the prompt the backend got lists them
    prompt = tokenizer.decode(tool_stack.backend.submitted[-1].prompt_token_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt


def test_auto_tool_call_streamed_as_deltas(client):
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER], max_tokens=200, stream=True)
    content, calls, finish = "", {}, None
    for i, event in enumerate(stream):
        delta = event.choices[0].delta
        # no empty events while the call's text is held (one per token before), as in vLLM
        assert i == 0 or delta.content or delta.tool_calls or event.choices[0].finish_reason
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = event.choices[0].finish_reason or finish
    assert content == "Let me look." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"})]


def test_tool_result_turn_round_trips_into_the_prompt(client, tool_stack, tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    resp = client.chat.completions.create(model="fake-model", messages=messages,
                                          tools=[WEATHER], max_tokens=200)
    assert resp.choices[0].message.tool_calls
    prompt = tokenizer.decode(tool_stack.backend.submitted[-1].prompt_token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


def test_tool_choice_none_returns_the_text(client, tool_stack, tokenizer):
    resp = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
        tool_choice="none", max_tokens=200)
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content == HERMES_REPLY
    assert "<tools>" not in tokenizer.decode(tool_stack.backend.submitted[-1].prompt_token_ids)


def test_strict_tools_under_auto_carry_their_schemas_to_the_backend(client, tool_stack):
    """As vLLM: a strict tool with tool_choice "auto" is enforced by a structural tag in the
    configured parser's format (free text; after <tool_call>, a call by the schema). A
    tool that is not strict leaves the reply unconstrained, as before."""
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[strict],
        max_tokens=20, extra_body={"request_id": "strict-1"})
    spec = tool_stack.backend.last_request("strict-1").params.structured
    assert spec.kind == "structural_tag"
    tag = json.loads(spec.spec)["format"]
    assert tag["triggers"] == ["<tool_call>"]
    (item,) = tag["tags"]
    assert item["begin"].startswith('<tool_call>\n{"name": "get_weather"')
    assert item["content"]["json_schema"] == WEATHER["function"]["parameters"]
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
        max_tokens=20, extra_body={"request_id": "loose-1"})
    assert tool_stack.backend.last_request("loose-1").params.structured is None
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[strict],
            response_format={"type": "json_object"})
    assert err.value.body["param"] == "tool_choice"


def test_required_and_named_choices_carry_the_constraint_to_the_backend(client, tool_stack):
    client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=20,
        extra_body={"request_id": "named-1"})
    spec = tool_stack.backend.last_request("named-1").params.structured
    assert spec.kind == "json_schema"
    assert json.loads(spec.spec) == WEATHER["function"]["parameters"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
            tool_choice="required", response_format={"type": "json_object"})
    assert err.value.body["param"] == "tool_choice"
