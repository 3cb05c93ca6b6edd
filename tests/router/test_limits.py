"""Admission control and API-key auth, on a stack with one request slot and a key."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine.errors import ResourceExhaustedError
from router.client import SplitServeClient
from router.config import RouterConfig
from router.errors import UnauthenticatedError
from tests.router.conftest import Stack, make_backend

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def small(tokenizer):
    config = RouterConfig(model_name="small", max_model_len=128, max_inflight_requests=1,
                          api_key=KEY)
    s = Stack(make_backend(tokenizer), tokenizer, config)
    yield s
    s.close()


def test_admission_limit_refuses_then_recovers(small):
    with SplitServeClient(small.grpc_address, api_key=KEY, timeout=10) as client:
        holder = client.stream("slow", request_id="holder", max_tokens=100)
        assert next(holder).token_ids  # holds the only slot
        with pytest.raises(ResourceExhaustedError, match="limit of 1"):
            client.generate("hi", max_tokens=2)
        resp = httpx.post(f"{small.base_url}/v1/completions",
                          json={"model": "small", "prompt": "hi"},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        holder.close()
        assert small.backend.wait_aborted("holder", 1.0)
        assert client.generate("hi", max_tokens=2).finish_reason == "length"
    body = httpx.get(f"{small.base_url}/metrics").text
    assert 'splitserve_requests_total{code="RESOURCE_EXHAUSTED"} 2.0' in body


def test_http_api_key(small):
    bad = openai.OpenAI(base_url=f"{small.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"
    good = openai.OpenAI(base_url=f"{small.base_url}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="small", prompt="hi", max_tokens=2).usage
    assert httpx.get(f"{small.base_url}/health").status_code == 200  # probes need no key


def test_grpc_api_key(small):
    with SplitServeClient(small.grpc_address) as client, pytest.raises(UnauthenticatedError):
        client.list_models()
    with SplitServeClient(small.grpc_address, api_key=KEY) as client:
        assert [m.id for m in client.list_models()] == ["small"]
