"""Router test fixtures: a generated tokenizer, the fake backend, and a running stack
(service + gRPC server + uvicorn HTTP server on one event loop in a background thread)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from router.config import RouterConfig
from router.grpc_server import start_grpc_server
from router.openai_server import start_http_server
from router.service import GenerationService
from tests.router.fake_backend import FakeBackend

REPLY_TEXT = "The quick brown fox jumps over the lazy dog."
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from engine.make_model_tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(600, add_bos=False), out, add_bos=False,
                   max_len=MAX_MODEL_LEN)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from engine.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir)


def make_backend(tokenizer, **kwargs) -> FakeBackend:
    reply = tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
    return FakeBackend(lambda ids: tokenizer.decode(ids), reply, tokenizer.eos_token_ids[0],
                       **kwargs)


class Stack:
    """A GenerationService served over gRPC and HTTP from a background event loop."""

    def __init__(self, backend, tokenizer, config: RouterConfig) -> None:
        self.backend = backend
        self.service = GenerationService(backend, tokenizer, config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start())

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the stack's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        await self.service.start()
        self.grpc = await start_grpc_server(self.service, "127.0.0.1", 0)
        self.http = await start_http_server(self.service, "127.0.0.1", 0)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    async def _stop(self) -> None:
        await self.http.stop()
        await self.grpc.stop(0.5)
        await self.service.shutdown()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="session")
def stack(tokenizer):
    """The shared stack: default limits, fake backend with 2 tokens per step."""
    s = Stack(make_backend(tokenizer), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN))
    yield s
    s.close()


@pytest.fixture(scope="session")
def reply_ids(tokenizer) -> list[int]:
    return tokenizer.encode(REPLY_TEXT, add_special_tokens=False)
