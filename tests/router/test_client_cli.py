"""The Python clients (sync and asyncio) and the `splitserve generate` command."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.cli import main
from engine.errors import UnavailableError
from router.client import AsyncSplitServeClient, SplitServeClient
from tests.router.conftest import REPLY_TEXT


def _closed_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_async_client(stack):
    async def scenario():
        async with AsyncSplitServeClient(stack.grpc_address, timeout=10) as client:
            whole = await client.generate("hi", max_tokens=200)
            chunks = [c async for c in client.stream("hi", max_tokens=4)]
            stream = client.stream("slow", request_id="async-abort", max_tokens=100)
            first = await anext(stream)
            aborted = await client.abort("async-abort")
            rest = [c async for c in stream]
            models = await client.list_models()
            return whole, chunks, first, aborted, rest, models

    whole, chunks, first, aborted, rest, models = asyncio.run(scenario())
    assert whole.text == REPLY_TEXT and whole.finish_reason == "stop"
    assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finish_reason == "length"
    assert first.token_ids and aborted and rest[-1].finish_reason == "abort"
    assert models[0].id == "fake-model"


def test_sync_client_rejects_unknown_sampling_names(stack):
    with SplitServeClient(stack.grpc_address) as client, pytest.raises(TypeError, match="tempr"):
        client.generate("hi", tempr=0.5)


def test_unreachable_server_raises_unavailable():
    with SplitServeClient(_closed_port_address(), timeout=2) as client:
        with pytest.raises(UnavailableError):
            client.wait_ready(0.3)
        with pytest.raises(UnavailableError):
            client.generate("hi")


def test_cli_generate_streams_to_stdout(stack, capsys, tokenizer, reply_ids):
    code = main(["generate", "--address", stack.grpc_address, "--max-tokens", "5",
                 "--temperature", "0", "--stats", "hello"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == tokenizer.decode(reply_ids[:5]) + "\n"
    assert "finish_reason=length" in err and "completion_tokens=5" in err


def test_cli_generate_errors(stack, capsys):
    assert main(["generate", "--address", stack.grpc_address, "--temperature", "-1", "hi"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    # values the wire cannot carry (unsigned fields): one line naming the field, as above
    for flag, value in (("--max-tokens", "-5"), ("--seed", "-1")):
        assert main(["generate", "--address", stack.grpc_address, flag, value, "hi"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: INVALID_ARGUMENT: "), err
        assert f"{flag[2:].replace('-', '_')}={value}" in err
    address = _closed_port_address()
    assert main(["generate", "--address", address, "--connect-timeout", "0.3", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach a splitserve server at {address}" in err
