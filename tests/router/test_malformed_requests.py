"""Malformed HTTP requests get a 400 that names what is wrong, and every refusal or failure
is counted in splitserve_requests_total (found probing the API as a client: these gave a 500
or a misleading message, and the 500s went uncounted)."""

from __future__ import annotations

import re

import httpx
import pytest

from router.config import RouterConfig
from router.openai_protocol import CompletionRequest
from tests.router.conftest import MAX_MODEL_LEN, Stack, make_backend


@pytest.fixture
def fresh(tokenizer):
    """A stack of its own: counters start at zero."""
    s = Stack(make_backend(tokenizer), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN))
    yield s
    s.close()


def _requests_total(base_url: str, code: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    m = re.search(rf'^splitserve_requests_total{{code="{code}"}} ([0-9.]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("key", ["²", "٣", "1\u200b", " 7", "9" * 5000])
def test_a_logit_bias_key_that_is_not_a_token_id_is_refused_naming_the_field(fresh, key):
    resp = httpx.post(f"{fresh.base_url}/v1/completions", timeout=10, json={
        "model": "fake-model", "prompt": "hi", "max_tokens": 2, "logit_bias": {key: 5}})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "logit_bias" and "token id" in error["message"]
    assert _requests_total(fresh.base_url, "INVALID_ARGUMENT") == 1


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "fake-model",', b"\xff\xfe",
                                  b"\xff", b'{"model": "\xff"}', b"\x80{}"])
def test_a_body_that_is_not_json_is_refused_as_such(fresh, body):
    resp = httpx.post(f"{fresh.base_url}/v1/completions", content=body, timeout=10,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON"), error
    assert _requests_total(fresh.base_url, "INVALID_ARGUMENT") == 1


@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_an_unexpected_failure_before_the_request_is_prepared_is_counted(fresh, monkeypatch,
                                                                         error):
    def broken(self, deadline):
        raise error("a bug in the request conversion")

    monkeypatch.setattr(CompletionRequest, "to_inputs", broken)
    resp = httpx.post(f"{fresh.base_url}/v1/completions", timeout=10, json={
        "model": "fake-model", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 500
    assert resp.json()["error"]["message"] == (
        "internal server error; the server log has the details")
    assert _requests_total(fresh.base_url, "INTERNAL") == 1
