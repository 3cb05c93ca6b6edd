"""n > 1 at the edges: n choices per prompt (index = prompt * n + sample), streamed and not,
usage counting each prompt once, tool calls per choice, and gRPC's per-sample messages.
``NSamplesBackend`` is the fake backend with samples: sample i replies ``reply[i:]``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import openai
import pytest

from cluster.backend import BackendOutput, BackendRequest
from router import convert
from router.config import RouterConfig
from tests.router.conftest import REPLY_TEXT, Stack
from tests.router.fake_backend import FAKE_TIMING, FakeBackend


class NSamplesBackend(FakeBackend):
    """FakeBackend whose n > 1 requests stream n samples, two tokens a step round robin;
    sample i replies ``reply[i:]`` then end-of-sequence (or stops at max_tokens)."""

    def submit(self, request: BackendRequest) -> AsyncIterator[BackendOutput]:
        if request.n == 1:
            return super().submit(request)
        self.submitted.append(request)
        return self._samples(request)

    async def _samples(self, req: BackendRequest) -> AsyncIterator[BackendOutput]:
        rid, max_tokens = req.request_id, req.params.max_tokens
        plans = []
        for i in range(req.n):
            reply = (self.reply[i:] + [self.eos_token_id])[:max_tokens]
            plans.append((reply, "stop" if reply[-1] == self.eos_token_id else "length"))
        sent = [0] * req.n
        while any(sent[i] < len(plans[i][0]) for i in range(req.n)):
            for i, (reply, finish) in enumerate(plans):
                if sent[i] >= len(reply):
                    continue
                ids = reply[sent[i]: sent[i] + self.tokens_per_step]
                sent[i] += len(ids)
                done = sent[i] >= len(reply)
                yield BackendOutput(rid, ids, finish if done else None, index=i,
                                    num_prompt_tokens=len(req.prompt_token_ids),
                                    timing=dict(FAKE_TIMING) if done else {})
                await asyncio.sleep(0)


@pytest.fixture(scope="module")
def n_stack(tokenizer):
    reply = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    backend = NSamplesBackend(lambda ids: tokenizer.decode(ids), reply,
                              tokenizer.eos_token_ids[0])
    s = Stack(backend, tokenizer, RouterConfig(model_name="fake-model", max_model_len=1024))
    yield s
    s.close()


@pytest.fixture
def client(n_stack):
    with openai.OpenAI(base_url=f"{n_stack.base_url}/v1", api_key="x", max_retries=0,
                       timeout=10) as c:
        yield c


def _expected(tokenizer, i: int) -> str:
    reply = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    return tokenizer.decode(reply[i:])


def test_n_choices_non_stream(client, tokenizer, n_stack):
    resp = client.completions.create(model="fake-model", prompt="hi", n=3, max_tokens=200,
                                     extra_body={"request_id": "n3"})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [_expected(tokenizer, i) for i in range(3)]
    assert n_stack.backend.last_request("n3").n == 3
    prompt_len = len(n_stack.backend.last_request("n3").prompt_token_ids)
    assert resp.usage.prompt_tokens == prompt_len  # the prompt once, not n times
    reply_len = len(tokenizer.encode(REPLY_TEXT, add_special_tokens=False))
    assert resp.usage.completion_tokens == sum(reply_len - i + 1 for i in range(3))


def test_n_choices_with_a_batch_stream(client, tokenizer):
    stream = client.completions.create(model="fake-model", prompt=["a", "b"], n=2,
                                       max_tokens=200, stream=True,
                                       stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for event in stream:
        usage = event.usage or usage
        for choice in event.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {p * 2 + i: _expected(tokenizer, i) for p in range(2) for i in range(2)}
    assert set(finishes.values()) == {"stop"}
    assert usage.prompt_tokens == 2 * len(tokenizer.encode("a", add_special_tokens=True))


def test_n_chat_choices(client, tokenizer):
    resp = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=200)
    assert [c.message.content for c in resp.choices] == [_expected(tokenizer, i)
                                                         for i in range(2)]


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_refused(client, n):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="fake-model", prompt="hi", n=n)
    assert err.value.body["param"] == "n"


@pytest.mark.parametrize("stream", [True, False])
def test_grpc_messages_carry_the_sample_index(n_stack, tokenizer, stream):
    with grpc.insecure_channel(n_stack.grpc_address) as channel:
        stub = convert.GenerationStub(channel)
        req = convert.build_request("hi", stream=stream, sampling={"max_tokens": 200, "n": 2})
        msgs = list(stub.Generate(req, timeout=10))
    texts = {0: "", 1: ""}
    for m in msgs:
        texts[m.index] += m.text
    assert texts == {i: _expected(tokenizer, i) for i in range(2)}
    assert sum(1 for m in msgs if m.finish_reason) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_sample_ended_by_a_stop_string_is_ended_in_the_backend(client, n_stack, stream):
    """Sample i replies ``reply[i:]``, so sample 2 meets " lazy" first, then 1, then 0:
    the router ends samples 2 and 1 itself and asks the backend to end them
    (``abort_sample``: their decoding would be wasted); sample 0's stop ends the request,
    whose clean-up needs no per-sample abort."""
    rid = f"stopper-{stream}"
    resp = client.completions.create(model="fake-model", prompt="hi", n=3, max_tokens=200,
                                     stop=[" lazy"], stream=stream,
                                     extra_body={"request_id": rid})
    if stream:
        finishes = {c.index: c.finish_reason for event in resp for c in event.choices
                    if c.finish_reason}
    else:
        finishes = {c.index: c.finish_reason for c in resp.choices}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    ended = sorted(i for r, i in n_stack.backend.samples_aborted if r == rid)
    assert ended == [1, 2]
