"""Through the official ``openai`` client against an in-process server over a real (tiny,
random-weight) model on the disaggregated path in one process (local cluster: prefill and
decode workers, loopback KV transfer): JSON schemas, tool_choice required / named (enforced
by structured output; a random model's free text is never valid JSON), a follow-up turn with
the tool result, and logit_bias forcing and banning tokens."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from router import convert
from router.config import RouterConfig
from tests.router.conftest import Stack

ENGINE = {"block_size": 4, "max_num_batched_tokens": 256, "max_num_seqs": 8,
          "max_model_len": 1024}
S = {"type": "string", "maxLength": 6}
N = {"type": "integer", "minimum": -50, "maximum": 50}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                         "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2},
                                      "color": {"enum": ["red", "blue"]}},
     "required": ["tags", "color"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": N, "y": N},
                                            "required": ["x", "y"]}}, "required": ["p"]},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMAS[0]}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": SCHEMAS[2]}}


class ClusterStack(Stack):
    def __init__(self, cluster: Cluster, tokenizer) -> None:
        self.cluster = cluster
        super().__init__(cluster.backend, tokenizer,
                         RouterConfig(model_name="tiny", max_model_len=1024))

    def call(self, coro, timeout: float = 120.0):
        return super().call(coro, timeout)  # workers load a model: slower than the fake

    async def _start(self) -> None:
        await self.cluster.start()
        await super()._start()

    async def _stop(self) -> None:
        await super()._stop()
        await self.cluster.shutdown()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from engine.make_model import make_model
    from engine.tokenizer import Tokenizer

    model = make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                       progress=False)
    config = ClusterConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prefill": {"engine": ENGINE}, "decode": {"engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 5}, "scheduler": {"block_size": 4}})
    stack = ClusterStack(Cluster(config, mode="local"), Tokenizer(model))
    _STACK[:] = [stack]
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0,
                       timeout=60) as c:
        yield c
    stack.close()


_STACK: list[ClusterStack] = []


@pytest.fixture(scope="module")
def grpc_stub(client):
    with grpc.insecure_channel(_STACK[0].grpc_address) as channel:
        yield convert.GenerationStub(channel)


USER = [{"role": "user", "content": "Tell me."}]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schemas_hold_stream_and_non_stream(client, stream):
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                      "strict": True}}
        kwargs = {"model": "tiny", "messages": USER, "response_format": fmt, "max_tokens": 150,
                  "seed": i, "temperature": 1.0}
        if stream:
            text = "".join(e.choices[0].delta.content or ""
                           for e in client.chat.completions.create(stream=True, **kwargs))
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_json_object_gives_an_object(client):
    """An arbitrary object's strings are unbounded (a random model fills them freely): what
    finished parses as an object, what ran out of tokens is an object's beginning."""
    free = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, seed=1)
    with pytest.raises(json.JSONDecodeError):  # the random model's text is not JSON
        json.loads(free.choices[0].text)
    finished = 0
    for seed in range(6):
        choice = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=150, seed=seed, temperature=1.0,
            extra_body={"response_format": {"type": "json_object"}}).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
            finished += 1
        else:
            assert choice.text.startswith("{")
    assert finished


def _stream_calls(events) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for event in events:
        for tc in event.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or ""
            entry[1] += tc.function.arguments or ""
    return [tuple(v) for v in calls.values()]


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_give_valid_calls(client, stream):
    schemas = {"get_weather": SCHEMAS[0], "get_time": SCHEMAS[2]}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        kwargs = {"model": "tiny", "messages": USER, "tools": [WEATHER, TIME],
                  "tool_choice": choice, "max_tokens": 200, "temperature": 1.0, "seed": 3}
        if stream:
            calls = _stream_calls(client.chat.completions.create(stream=True, **kwargs))
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert calls
        if choice != "required":
            assert [name for name, _ in calls] == ["get_time"]
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), schemas[name])


def test_a_follow_up_turn_with_the_tool_result_is_accepted(client):
    first = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=200,
        temperature=0.0)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    follow = USER + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                      "content": "sunny"}]
    second = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER],
                                            max_tokens=5, temperature=0.0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_logit_bias_forces_and_bans_a_token(client, grpc_stub):
    def ids(**sampling) -> list[int]:
        req = convert.build_request([5, 6, 7], sampling={"max_tokens": 4, "temperature": 0.0,
                                                          "ignore_eos": True, **sampling})
        return [t for m in grpc_stub.Generate(req, timeout=60) for t in m.token_ids]

    greedy = ids()
    assert ids(logit_bias={300: 100.0}) == [300] * 4
    assert greedy[0] not in ids(logit_bias={greedy[0]: -100.0})
    # the OpenAI edge's string keys reach the same sampler
    text = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4,
                                     temperature=0.0, logit_bias={"300": 100},
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert text == _STACK[0].service.tokenizer.decode([300] * 4)


@pytest.mark.parametrize("stream", [False, True])
def test_n_samples_equal_their_seed_plus_i_runs(client, stream):
    kwargs = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8,
              "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    alone = [client.completions.create(seed=40 + i, **kwargs).choices[0].text
             for i in range(3)]
    if stream:
        texts = ["", "", ""]
        for event in client.completions.create(seed=40, n=3, stream=True, **kwargs):
            for choice in event.choices:
                texts[choice.index] += choice.text
    else:
        texts = [c.text for c in client.completions.create(seed=40, n=3, **kwargs).choices]
    assert texts == alone
    assert len(set(alone)) > 1  # the samples differ
