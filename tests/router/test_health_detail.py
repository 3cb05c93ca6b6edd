"""/health: readiness is open to every probe; the detail (workers, in-flight counts) only to
a caller holding the API key when one is configured."""

from __future__ import annotations

import httpx
import pytest

from router.config import RouterConfig
from tests.router.conftest import MAX_MODEL_LEN, Stack, make_backend

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(tokenizer):
    s = Stack(make_backend(tokenizer), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN, api_key=KEY))
    yield s
    s.close()


def test_health_detail_needs_the_api_key_while_readiness_stays_open(keyed):
    url = f"{keyed.base_url}/health"
    anonymous = httpx.get(url, timeout=5)
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    wrong = httpx.get(url, headers={"authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 200 and wrong.json() == {"status": "ok"}
    holder = httpx.get(url, headers={"authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert holder["status"] == "ok" and {"backend", "requests_in_flight"} <= set(holder)
    keyed.backend.ready = False
    try:  # not ready: 503 for everyone, still without detail for the anonymous
        unready = httpx.get(url, timeout=5)
        assert unready.status_code == 503 and unready.json() == {"status": "unavailable"}
    finally:
        keyed.backend.ready = True


def test_without_an_api_key_health_shows_its_detail(stack):
    body = httpx.get(f"{stack.base_url}/health", timeout=5).json()
    assert body["status"] == "ok" and "backend" in body
