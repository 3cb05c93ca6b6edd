"""Schemathesis against the HTTP app's OpenAPI schema (issue 12: fuzzing in the suite).

Every generated request, schema-valid (positive) or not (negative), must get a documented
status with a documented content type and headers, and error bodies in the documented shape;
never a 5xx; schema-invalid requests get a 4xx. The server then still serves a normal
request and holds no request. Bounded: a fixed number of examples per operation and mode,
well under a minute.

(Schemathesis' own pytest loader does not run under pytest 9, so the operations' hypothesis
strategies are driven here directly.)"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from router.config import RouterConfig
from tests.router.conftest import Stack, make_backend

EXAMPLES = 50  # per operation and mode
# Every check but positive_data_acceptance ("a schema-valid request gets 2xx"): validity
# beyond a schema's reach is refused with a 400 naming the field (an empty prompt, max_tokens
# past the context left by the prompt, an unknown model), which is the contract.
EXCLUDED = [positive_data_acceptance]


@pytest.fixture(scope="module")
def fuzz_stack(tokenizer):
    config = RouterConfig(model_name="fuzz", max_model_len=64, max_request_body_bytes=256 << 10,
                          max_prompt_chars=20_000)
    s = Stack(make_backend(tokenizer, faults=False), tokenizer, config)
    yield s
    s.close()


def _operations(stack) -> list:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_http_api_conforms_to_its_schema(fuzz_stack, mode):
    operations = _operations(fuzz_stack)
    assert {op.label for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
        "GET /metrics"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # no parameters: nothing to make invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(timeout=10, excluded_checks=EXCLUDED)
        run()
    resp = httpx.post(f"{fuzz_stack.base_url}/v1/completions", timeout=10,
                      json={"model": "fuzz", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
    assert fuzz_stack.service.num_inflight == 0
