"""Hypothesis-generated gRPC GenerateRequests against a real loopback gRPC server (issue 12:
fuzzing in the suite): every call ends, within its deadline, with OK or a client-error status
(never INTERNAL or UNKNOWN, never a hang), and a normal request is served afterwards with
nothing left in flight. Bounded: a fixed number of examples, well under a minute."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import convert
from router.config import RouterConfig
from tests.router.conftest import Stack, make_backend

MAX_MODEL_LEN = 64
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

# protobuf strings must be valid UTF-8: surrogates cannot be sent at all
_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_ids = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 700), max_size=80)
_double = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3)
_uint32 = st.integers(0, 2**32 - 1) | st.integers(0, 80)


def _mostly(draw, usual, wild):
    """``usual`` three times in four: most requests stay valid enough to be served."""
    return draw(wild if draw(st.integers(0, 3)) == 0 else usual)


@st.composite
def generate_requests(draw):
    req = convert.pb.GenerateRequest(
        request_id=_mostly(draw, st.just(""), _text | st.text("abc-_.:", min_size=100,
                                                               max_size=700)),
        model=_mostly(draw, st.sampled_from(["", "fuzz"]), _text))
    prompt = draw(st.sampled_from(["text", "text", "ids", "none"]))
    if prompt == "text":
        req.text = _mostly(draw, st.sampled_from(["hi", "hi <|im_end|> there"]),
                           _text | st.just("a" * 3000))
    elif prompt == "ids":
        req.token_ids.ids.extend(_mostly(draw, st.lists(st.integers(0, 599), min_size=1,
                                                        max_size=20), _ids))
    sampling = req.sampling
    for name, usual, wild in (
            ("max_tokens", st.integers(1, 8), _uint32), ("temperature", st.floats(0, 2), _double),
            ("top_p", st.floats(0.01, 1), _double),
            ("top_k", st.integers(-1, 50), st.integers(-2**31, 2**31 - 1)),
            ("min_p", st.floats(0, 1), _double), ("seed", st.integers(0, 2**63 - 1),
                                                   st.integers(0, 2**64 - 1)),
            ("ignore_eos", st.booleans(), st.booleans()),
            ("presence_penalty", st.floats(-2, 2), _double),
            ("frequency_penalty", st.floats(-2, 2), _double),
            ("repetition_penalty", st.floats(0.5, 2), _double),
            ("logprobs", st.integers(0, 5), _uint32), ("min_tokens", st.integers(0, 4), _uint32)):
        if draw(st.integers(0, 3)) == 0:
            setattr(sampling, name, _mostly(draw, usual, wild))
    sampling.stop.extend(draw(st.lists(_text, max_size=2)))
    sampling.stop_token_ids.extend(draw(st.lists(_uint32, max_size=2)))
    for name in ("stream", "return_text", "skip_special_tokens"):
        if draw(st.booleans()):
            setattr(req.options, name, draw(st.booleans()))
    return req


@pytest.fixture(scope="module")
def fuzz_grpc(tokenizer):
    config = RouterConfig(model_name="fuzz", max_model_len=MAX_MODEL_LEN)
    s = Stack(make_backend(tokenizer, faults=False), tokenizer, config)
    channel = grpc.insecure_channel(s.grpc_address)
    yield s, convert.GenerationStub(channel)
    channel.close()
    s.close()


@pytest.mark.timeout(120)
def test_generated_requests_get_ok_or_a_client_error(fuzz_grpc):
    stack, stub = fuzz_grpc
    seen: dict[str, int] = {}

    @given(req=generate_requests())
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(req):
        call = stub.Generate(req, timeout=5)
        try:
            responses = list(call)
        except grpc.RpcError:
            code = call.code()
            assert code in CLIENT_ERRORS, (code, call.details(), req)
            assert call.details() and "Traceback" not in call.details()
        else:
            assert responses, req
            assert convert.chunk_from_proto(responses[-1]).finish_reason is not None
            code = grpc.StatusCode.OK
        seen[code.name] = seen.get(code.name, 0) + 1

    run()
    assert seen.get("OK") and seen.get("INVALID_ARGUMENT"), seen  # both paths were exercised
    final = list(stub.Generate(convert.build_request("hi", sampling={"max_tokens": 2}),
                               timeout=5))
    assert convert.chunk_from_proto(final[-1]).finish_reason == "length"
    assert stack.service.num_inflight == 0
    assert stack.backend.stats()["running"] == 0
