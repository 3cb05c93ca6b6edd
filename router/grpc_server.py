"""The gRPC edge: the splitserve.v1.Generation service, grpc.health.v1 and reflection.

Errors: every handler is wrapped by ``grpc_errors``, which maps exceptions to status codes
through ``router.errors`` (the one mapping); refusals worth retrying (RESOURCE_EXHAUSTED,
UNAVAILABLE) carry trailing metadata ``retry-after`` (seconds), and a refusal always comes
before the first response message. Deadlines: the call's remaining time becomes
the request's deadline, so the router aborts the backend request when it passes.
Cancellation: a cancelled call cancels the handler task, which closes the request's stream
(aborting it in the backend); a done-callback on the call context aborts it as well, for
the case where gRPC drops the handler between two messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import SplitServeError
from router import convert
from router.config import PortInUseError, TLSConfig
from router.errors import UnauthenticatedError, grpc_status, outcome_code, retry_after
from router.service import GenerationService
from router.tool_parsers import ToolCallStream, get_parser

logger = logging.getLogger(__name__)


def grpc_errors(handler):
    """Decorator for servicer methods (unary or server-streaming): exceptions -> status."""

    async def fail(self, context, exc: Exception) -> None:
        code, message = grpc_status(exc)
        after = retry_after(code.name, self.retry_after_s)
        await context.abort(code, message,
                            trailing_metadata=(("retry-after", after),) if after else ())

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream_wrapper(self, request, context):
            try:
                self.authorize(context)
                async with contextlib.aclosing(handler(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await fail(self, context, exc)
        return stream_wrapper

    @functools.wraps(handler)
    async def unary_wrapper(self, request, context):
        try:
            self.authorize(context)
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await fail(self, context, exc)
    return unary_wrapper


class GenerationServicer(convert.GenerationServicer):
    def __init__(self, service: GenerationService, api_key: str | None = None) -> None:
        self._service = service
        self._api_key = api_key
        self.retry_after_s = service.config.retry_after_s

    def authorize(self, context) -> None:
        """With an API key configured, calls must send ``authorization: Bearer <key>``."""
        if self._api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self._api_key):
            self._service.metrics.requests.labels(code="UNAUTHENTICATED").inc()
            raise UnauthenticatedError("missing or wrong API key; send the metadata "
                                       "'authorization: Bearer <key>'")

    @grpc_errors
    async def Generate(self, request, context):
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None else None
        try:
            tools = convert.tool_spec_from_proto(request)
            parser = get_parser(self._service.config.tool_call_parser)
            inp = convert.input_from_proto(request, deadline, tools, parser)
        except SplitServeError as exc:  # refused before prepare: count it as prepare does
            self._service.metrics.requests.labels(code=outcome_code(exc)).inc()
            raise
        # a chat with tools: its text goes through the configured tool-call parser
        calls = [tools.stream(parser) for _ in range(inp.n)] if tools else None
        prep = await self._service.prepare(inp)
        context.add_done_callback(functools.partial(self._on_done, prep.request_id))
        if not convert.wants_stream(request):
            for chunk in await self._service.complete(prep):  # one message per sample
                yield _with_calls(chunk, calls)
            return
        async with contextlib.aclosing(self._service.stream(prep)) as chunks:
            async for chunk in chunks:
                yield _with_calls(chunk, calls)

    def _on_done(self, request_id: str, _context) -> None:
        # Runs when the call ends for any reason; aborts a request still in flight.
        if self._service.is_inflight(request_id):
            asyncio.get_running_loop().create_task(self._service.abort(request_id))

    @grpc_errors
    async def Abort(self, request, context):
        return convert.abort_to_proto(await self._service.abort(request.request_id))

    @grpc_errors
    async def ListModels(self, request, context):
        return convert.models_to_proto(self._service.list_models())

    @grpc_errors
    async def ModelInfo(self, request, context):
        return convert.model_info_to_proto(self._service.model_info(request.model))


def _with_calls(chunk, calls: list[ToolCallStream | None] | None):
    """The response for ``chunk``; with tools, calls are held out of the text and sent on
    the sample's last message."""
    stream = calls[chunk.index] if calls is not None else None
    if stream is None:
        return convert.chunk_to_proto(chunk)
    chunk.text = stream.feed(chunk.text)
    found = []
    if chunk.finish_reason is not None:
        rest, found = stream.finish()
        chunk.text += rest
    return convert.chunk_to_proto(chunk, found)


class LiveHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose status follows ``service.is_ready()``.

    Check reads readiness live. Watch streams changes as they happen: the backend reports
    every change of what readiness reads (workers joining, leaving, draining), and each
    report re-reads it on the event loop (no polling).
    """

    def __init__(self, service: GenerationService) -> None:
        super().__init__()
        self._service = service
        self._unwatch: Callable[[], None] | None = None
        self._refreshes: set[asyncio.Task] = set()

    async def refresh(self) -> None:
        ready = self._service.is_ready()
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", convert.SERVICE_NAME):
            await self.set(name, status)

    async def Check(self, request, context):
        await self.refresh()
        return await super().Check(request, context)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._unwatch = self._service.watch_readiness(
            lambda: loop.call_soon_threadsafe(self._refresh_soon))

    def _refresh_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.refresh())
        self._refreshes.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._refreshes.discard)

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        await self.enter_graceful_shutdown()
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)


@dataclass
class GrpcServer:
    """A running gRPC server and the port it bound (useful when asked for port 0)."""

    server: grpc.aio.Server
    port: int
    health: LiveHealthServicer

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.stop()
        await self.server.stop(grace)


async def start_grpc_server(service: GenerationService, host: str = "127.0.0.1",
                            port: int = 0, *, api_key: str | None = None,
                            tls: TLSConfig | None = None) -> GrpcServer:
    """Start the Generation service, health checking and reflection on host:port.

    ``api_key`` defaults to ``service.config.api_key``; health and reflection stay open.
    ``tls`` (default ``service.config.tls``) serves over TLS, with a client CA mutual TLS.
    A port another process listens on is a ``PortInUseError``: SO_REUSEPORT, which grpcio
    sets by default, would let a second server share the port and take half its clients."""
    key = api_key if api_key is not None else service.config.api_key
    tls = tls if tls is not None else service.config.tls
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    convert.add_generation_servicer(GenerationServicer(service, key), server)
    health_servicer = LiveHealthServicer(service)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (convert.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, private_key, client_ca = tls.read()
            creds = grpc.ssl_server_credentials([(private_key, cert)], client_ca,
                                                require_client_auth=client_ca is not None)
            bound = server.add_secure_port(address, creds)
    except RuntimeError:  # grpcio's "Failed to bind": the port is taken (or not ours)
        bound = 0
    if bound == 0:
        raise PortInUseError(f"gRPC port {port} on {host} is already in use (or not "
                             "available to this process): stop what holds it or choose "
                             "another port (--grpc-port, router.grpc_port)")
    await server.start()
    await health_servicer.refresh()
    health_servicer.start()
    logger.info("gRPC server listening on %s:%d%s", host, bound, " (TLS)" if tls else "")
    return GrpcServer(server, bound, health_servicer)
