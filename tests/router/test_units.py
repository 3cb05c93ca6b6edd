"""Router pieces on their own: error mapping, proto conversion, metrics, the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import errors as E
from engine.sampling_params import SamplingParams
from router import convert
from router.config import RouterConfig
from router.errors import InvalidParamError, classify, grpc_status, http_error
from router.metrics import ServingMetrics
from router.service import GenerationService
from router.types import GenerateChunk, GenerateInput, Usage
from tests.router.conftest import REPLY_TEXT, make_backend


@pytest.mark.parametrize("exc, grpc_code, http", [
    (E.InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (E.NotFoundError("x"), grpc.StatusCode.NOT_FOUND, 404),
    (E.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (E.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (E.KVTransferError("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (E.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (E.WorkerFatalError("x"), grpc.StatusCode.INTERNAL, 500),
])
def test_error_classes_map_to_grpc_and_http(exc, grpc_code, http):
    assert grpc_status(exc)[0] == grpc_code
    status, body = http_error(exc)
    assert status == http and set(body["error"]) == {"message", "type", "param", "code"}


def test_sampling_value_error_names_field_and_internal_errors_leak_nothing():
    with pytest.raises(ValueError) as err:
        SamplingParams(top_k=-5)
    info = classify(err.value)
    assert (info.code, info.param) == ("INVALID_ARGUMENT", "top_k")
    info = classify(RuntimeError("secret path /etc/x"))
    assert info.code == "INTERNAL" and "secret" not in info.message
    assert classify(InvalidParamError("bad", "seed")).param == "seed"


def test_proto_sampling_keeps_unset_distinct_from_zero():
    req = convert.build_request("hi", sampling={"temperature": 0.0, "stop": "x", "seed": 0})
    assert convert.sampling_from_proto(req.sampling) == {"temperature": 0.0, "seed": 0,
                                                         "stop": ("x",)}
    assert convert.sampling_from_proto(convert.build_request([1, 2]).sampling) == {}
    inp = convert.input_from_proto(req, deadline=None)
    assert (inp.prompt, inp.prompt_token_ids) == ("hi", None)


def test_generated_code_matches_the_proto_source(tmp_path):
    """The committed *_pb2.py was generated from the committed .proto (regenerate: see the
    command in proto/splitserve/v1/generate.proto's header comment)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    from splitserve_proto.splitserve.v1 import generate_pb2

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "generate.pb"
    assert protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}",
                        str(root / "proto/splitserve/v1/generate.proto")]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc adds json names the generated code leaves out
        for f in message.field:
            f.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(generate_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed


def test_chunk_round_trips_through_proto():
    chunk = GenerateChunk("r1", [1, 2], "ab", finish_reason="stop", stop_reason="b",
                          usage=Usage(3, 2, 1), timing={"ttft": 0.5, "e2e": 1.0})
    back = convert.chunk_from_proto(convert.chunk_to_proto(chunk))
    assert (back.token_ids, back.text, back.finish_reason, back.stop_reason) == \
        ([1, 2], "ab", "stop", "b")
    assert back.usage == Usage(3, 2, 1) and back.timing["ttft"] == 0.5
    running = convert.chunk_from_proto(convert.chunk_to_proto(GenerateChunk("r1", [7], "c")))
    assert running.finish_reason is None and running.timing is None and running.usage is None


def test_metrics_registries_are_per_instance():
    a, b = ServingMetrics(), ServingMetrics()
    a.requests.labels(code="OK").inc()
    assert b'splitserve_requests_total{code="OK"} 1.0' in a.exposition()[0]
    assert b'splitserve_requests_total{code="OK"} 0.0' in b.exposition()[0]  # own registry


def _run(service: GenerationService, inp: GenerateInput) -> list[GenerateChunk]:
    async def collect():
        await service.start()
        return [c async for c in service.generate(inp)]
    return asyncio.run(collect())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.integers(1, 5), max_tokens=st.integers(1, 14),
       cut=st.tuples(st.integers(0, len(REPLY_TEXT) - 1), st.integers(1, 6)))
def test_stop_strings_and_max_tokens_give_exact_text(tokenizer, reply_ids, step, max_tokens, cut):
    """Whatever the coalescing and limits, text == the reply's text cut at the stop string,
    and exactly one chunk (the last) is final."""
    stop = REPLY_TEXT[cut[0]: cut[0] + cut[1]]
    backend = make_backend(tokenizer, tokens_per_step=step)
    service = GenerationService(backend, tokenizer, RouterConfig(max_model_len=64))
    chunks = _run(service, GenerateInput(prompt="hi", sampling={"max_tokens": max_tokens,
                                                                 "stop": (stop,)}))
    full = tokenizer.decode(reply_ids[:max_tokens])
    expected = full[: full.index(stop)] if stop in full else full
    assert "".join(c.text for c in chunks) == expected
    assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == ("stop" if stop in full else "length")
    assert service.num_inflight == 0


def test_every_exit_path_aborts_unfinished_requests_and_counts_once(tokenizer):
    backend = make_backend(tokenizer, slow_step_s=0.05)
    service = GenerationService(backend, tokenizer, RouterConfig(max_model_len=64))

    async def scenario():
        # consumer leaves after the first chunk
        stream = service.generate(GenerateInput(prompt="slow", request_id="early"))
        async with contextlib.aclosing(stream):
            await anext(stream)
        # consumer task cancelled while waiting
        task = asyncio.ensure_future(_drain(service.generate(
            GenerateInput(prompt="hang", request_id="cancelled"))))
        for _ in range(10):  # a few loop steps: the task reaches the backend and waits there
            await asyncio.sleep(0)
        assert service.is_inflight("cancelled")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # a request that finishes normally is not aborted
        await _drain(service.generate(GenerateInput(prompt="hi", request_id="done",
                                                    sampling={"max_tokens": 3})))

    asyncio.run(scenario())
    assert backend.aborted == ["early", "cancelled"]
    assert service.num_inflight == 0
    body = service.metrics.exposition()[0].decode()
    assert 'splitserve_requests_total{code="CANCELLED"} 2.0' in body
    assert 'splitserve_requests_total{code="OK"} 1.0' in body
    assert "splitserve_requests_running 0.0" in body and "splitserve_requests_waiting 0.0" in body


async def _drain(stream) -> list[GenerateChunk]:
    return [c async for c in stream]


def test_chat_template_and_default_max_tokens(tokenizer):
    backend = make_backend(tokenizer)
    service = GenerationService(backend, tokenizer,
                                RouterConfig(max_model_len=64, default_max_tokens=5))
    prep = asyncio.run(service.prepare(GenerateInput(messages=[{"role": "user",
                                                                "content": "Hi"}])))
    assert prep.prompt_token_ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}])
    assert prep.params.max_tokens == 5
    with pytest.raises(InvalidParamError) as err:
        asyncio.run(service.prepare(GenerateInput(messages=[])))
    assert err.value.param == "messages"
