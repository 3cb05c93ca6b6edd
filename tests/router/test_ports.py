"""A port already in use is a clear startup error naming the port, for gRPC and HTTP alike.

grpcio sets SO_REUSEPORT by default: a second server on the port of a running one started
and said nothing, and the kernel then split new connections between the two processes."""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import pytest

from router.config import PortInUseError, RouterConfig
from router.grpc_server import start_grpc_server
from router.openai_server import start_http_server
from router.service import GenerationService
from tests.router.conftest import make_backend


@pytest.fixture
def service(tokenizer):
    return GenerationService(make_backend(tokenizer), tokenizer,
                             RouterConfig(model_name="fake-model"))


def test_a_second_grpc_server_on_a_used_port_fails_naming_the_port(service):
    async def main():
        first = await start_grpc_server(service, "127.0.0.1", 0)
        try:
            with pytest.raises(PortInUseError, match=f"gRPC port {first.port} .*in use"):
                second = await start_grpc_server(service, "127.0.0.1", first.port)
                await second.stop(None)  # only reached on failure of the test
        finally:
            await first.stop(None)

    asyncio.run(main())


def test_grpc_on_a_port_held_by_another_listener_fails(service):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another grpcio
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        async def main():
            with pytest.raises(PortInUseError, match=f"gRPC port {port} "):
                server = await start_grpc_server(service, "127.0.0.1", port)
                await server.stop(None)

        asyncio.run(main())


def test_http_on_a_used_port_fails_naming_the_port(service):
    async def main():
        first = await start_http_server(service, "127.0.0.1", 0)
        try:
            with pytest.raises(PortInUseError, match=f"HTTP port {first.port} .*in use"):
                second = await start_http_server(service, "127.0.0.1", first.port)
                await second.stop()
        finally:
            await first.stop()

    asyncio.run(main())


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_serve_reports_a_used_port_at_once_without_a_traceback(which, capsys):
    """`splitserve serve` checks its ports before starting anything: exit 1 and one line
    naming the port (before the kernel build, Ray and the workers)."""
    from app.commands.serve import add_cluster_flags, run

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        parser = argparse.ArgumentParser()
        add_cluster_flags(parser)
        ports = {"grpc": ["--grpc-port", str(port), "--http-port", "0"],
                 "http": ["--grpc-port", "0", "--http-port", str(port)]}[which]
        t0 = time.monotonic()
        code = run(parser.parse_args(["--model", "unused", *ports]))
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 5  # a start-up error: exit 2, before Ray
    what = "gRPC" if which == "grpc" else "HTTP"
    assert f"{what} port {port} on 127.0.0.1 is already in use" in err
    assert "Traceback" not in err
