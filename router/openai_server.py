"""The OpenAI-compatible HTTP edge (FastAPI): completions, chat, models, health, metrics.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming ending with
``data: [DONE]``, ``stream_options.include_usage``), GET /v1/models, GET /health (200 when
ready, 503 otherwise), GET /metrics (Prometheus text). With an API key configured, /v1/*
needs ``Authorization: Bearer <key>`` (401 otherwise). Errors are OpenAI-style bodies built
by ``router.errors``. A client that disconnects aborts its request: streaming through the
SSE task's cancellation, non-streaming through a watcher on the ASGI disconnect message.

Every refusal is an HTTP status before the response starts, streaming included: a streaming
request is prepared, admitted and run to its first chunk before the 200 and the event
stream go out, so an overloaded server answers 429 (with ``Retry-After``, as 503 does), never
a 200 followed by an in-band error. Errors after the first chunk are reported in-band, as
OpenAI does. ``router.http_edge`` bounds the body size (413) and answers any exception no
handler took (500) without dropping the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import sse_starlette.sse
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import SplitServeError
from router import openai_format as oaf
from router import openai_protocol as oai
from router.config import PortInUseError, TLSConfig
from router.errors import (
    ClientCancelledError,
    ErrorInfo,
    UnauthenticatedError,
    classify,
    http_error,
    http_status,
    openai_error_body,
    outcome_code,
    retry_after,
)
from router.http_edge import EdgeMiddleware
from router.service import GenerationService
from router.tool_parsers import DEFAULT_PARSER, get_parser
from router.types import GenerateChunk, PreparedRequest
from router.utility_routes import utility_router


def create_app(service: GenerationService, *, api_key: str | None = None) -> FastAPI:
    """The HTTP app for one service. ``api_key`` defaults to ``service.config.api_key``."""
    key = api_key if api_key is not None else service.config.api_key
    app = FastAPI(title="splitserve", summary="OpenAI-compatible LLM serving")
    _install_error_handlers(app, service)
    app.add_middleware(EdgeMiddleware, max_body_bytes=service.config.max_request_body_bytes,
                       on_error=lambda exc: _count(service, exc))
    api = APIRouter(dependencies=[Depends(_auth_dependency(key, service))],
                    responses=oai.ERROR_RESPONSES)

    @api.get("/v1/models", responses=oai.JSON_OK)
    async def list_models() -> dict[str, Any]:
        # vocab_size: the token ids a prompt may use, as gRPC ModelInfo reports it
        vocab = int(service.tokenizer.vocab_size)
        return {"object": "list", "data": [
            {"id": c.id, "object": "model", "created": c.created, "owned_by": c.owned_by,
             "max_model_len": c.max_model_len, "vocab_size": vocab}
            for c in service.list_models()]}

    @api.post("/v1/completions", responses=oai.GENERATE_RESPONSES)
    async def completions(body: oai.CompletionRequest, request: Request) -> Response:
        return await _generate(service, request, body, chat=False)

    @api.post("/v1/chat/completions", responses=oai.GENERATE_RESPONSES)
    async def chat(body: oai.ChatCompletionRequest, request: Request) -> Response:
        return await _generate(service, request, body, chat=True)

    app.include_router(api)
    # /version, /v1/models/{id}, /tokenize, /detokenize: behind the same key as /v1/*
    app.include_router(utility_router(service), dependencies=api.dependencies)

    @app.get("/health", responses=oai.HEALTH_RESPONSES)
    async def health(request: Request) -> JSONResponse:
        # Liveness/readiness stay open (probes send no key); the detail (workers, counts)
        # describes the deployment, so with an API key set only a caller holding it sees it.
        ready = service.is_ready()
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable"}
        if key is None or _holds_key(request, key):
            body.update(requests_in_flight=service.num_inflight,
                        backend=service.backend.stats())
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=oai.METRICS_RESPONSES)
    async def metrics() -> Response:
        data, content_type = service.metrics.exposition()
        return Response(content=data, media_type=content_type)

    return app


def _holds_key(request: Request, key: str) -> bool:
    """Whether the request sends ``Authorization: Bearer <key>`` (constant-time compare)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)


def _count(service: GenerationService, exc: BaseException) -> None:
    service.metrics.requests.labels(code=outcome_code(exc)).inc()


def _auth_dependency(key: str | None, service: GenerationService):
    async def check(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), key):
            service.metrics.requests.labels(code="UNAUTHENTICATED").inc()
            raise UnauthenticatedError("missing or wrong API key; send 'Authorization: Bearer "
                                       "<key>'")
    return check


def _install_error_handlers(app: FastAPI, service: GenerationService) -> None:
    """Classified errors -> OpenAI-style bodies; refusals worth retrying carry Retry-After.
    Anything else is answered by ``EdgeMiddleware`` (500)."""
    wait_s = service.config.retry_after_s

    async def on_error(_request: Request, exc: Exception) -> JSONResponse:
        info = classify(exc)
        after = retry_after(info.code, wait_s)
        return JSONResponse(openai_error_body(info), status_code=http_status(info),
                            headers={"Retry-After": after} if after else None)

    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        why = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":  # never silently ignored: see docs/api.md
            why = "unknown field; this server does not implement it (docs/api.md lists the fields)"
        info = ErrorInfo("INVALID_ARGUMENT", f"{'.'.join(loc) or 'body'}: {why}",
                         loc[0] if loc else None)
        service.metrics.requests.labels(code=info.code).inc()
        return JSONResponse(openai_error_body(info), status_code=http_status(info))

    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own refusals (unknown route, wrong method, a body that
        # is not JSON) in the same OpenAI shape as ours.
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None,
                          "code": f"http_{exc.status_code}"}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(SplitServeError, on_error)
    app.add_exception_handler(ValueError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


async def _generate(service: GenerationService, request: Request, body, chat: bool) -> Response:
    try:
        inputs = body.to_inputs(deadline=None)
        tools = body.tool_spec() if chat else None
        parser = get_parser(_tool_parser_name(service)) if tools and tools.functions else None
    except SplitServeError as exc:
        service.metrics.requests.labels(code=outcome_code(exc)).inc()
        raise
    preps = [await service.prepare(inp) for inp in inputs]  # large prompts: tokenizer threads
    model = body.model or service.config.model_name
    n = body.n  # choice index = prompt * n + sample
    if chat:
        fmt: oaf.CompletionFormat = oaf.ChatFormat(
            preps[0].request_id, model, [tools.stream(parser) if parser else None
                                         for _ in range(n)])
    else:
        echo = [_echo_text(service, inp, prep) for inp, prep in zip(inputs, preps, strict=True)
                for _ in range(n)] if body.echo else None
        fmt = oaf.CompletionFormat(preps[0].request_id, model, echo)
    if body.stream:
        return await _start_stream(service, request, preps, fmt, body.include_usage)
    chunks = await _until_disconnect(request, _complete_all(service, preps))
    return JSONResponse(fmt.full(chunks))


def _tool_parser_name(service: GenerationService) -> str:
    # RouterConfig.tool_call_parser (requested; see docs/api.md) picks the registry entry.
    return getattr(service.config, "tool_call_parser", DEFAULT_PARSER)


def _echo_text(service: GenerationService, inp, prep: PreparedRequest) -> str:
    if inp.prompt is not None:
        return inp.prompt
    return service.tokenizer.decode(prep.prompt_token_ids,
                                    skip_special_tokens=prep.skip_special_tokens)


async def _complete_all(service: GenerationService,
                        preps: list[PreparedRequest]) -> list[GenerateChunk]:
    """Every sample's merged chunk, prompt by prompt; one failure cancels (aborts) the
    others."""
    if len(preps) == 1:
        return await service.complete(preps[0])
    results = await _all([service.complete(p) for p in preps])
    return [chunk for chunks in results for chunk in chunks]


async def _all(coros: list) -> list:
    """Run ``coros`` together; the first failure cancels the others (which aborts their
    requests) and is raised as itself, so the error handlers classify it as they would for
    one prompt."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _start_stream(service: GenerationService, request: Request,
                        preps: list[PreparedRequest], fmt, include_usage: bool) -> Response:
    """Admit every prompt and wait for each one's first chunk, then answer 200 with the event
    stream. A refusal before that (admission, the backend's own overload, a failure) raises
    here, and the error handlers answer it with its own status."""
    streams = [service.stream(p) for p in preps]

    async def close_all() -> None:
        for stream in streams:
            await stream.aclose()

    try:
        firsts = await _until_disconnect(request, _firsts(streams))
    except BaseException:
        await close_all()
        raise
    events = _sse_events(_merged(streams, firsts), fmt, include_usage, preps[0].n)
    return _EventStream(events, close_all)


async def _firsts(streams: list[AsyncIterator[GenerateChunk]]) -> list[GenerateChunk]:
    if len(streams) == 1:
        return [await anext(streams[0])]
    return await _all([anext(s) for s in streams])


async def _merged(streams: list[AsyncIterator[GenerateChunk]], firsts: list[GenerateChunk],
                  ) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """(prompt index, chunk) as the prompts' requests produce them."""
    for index, chunk in enumerate(firsts):
        yield index, chunk
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # handed to the reader, which reports it in-band
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, chunk, exc = await queue.get()
            if exc is not None:
                raise exc
            if chunk is None:
                running -= 1
                continue
            yield index, chunk
    finally:  # the reader left early or failed: end the other choices (aborts them)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _EventStream(EventSourceResponse):
    """The SSE response, closing the request's chunk streams however the response ends, even
    when the client left before the stream's first event (then the event generator never
    started, and closing it would not reach the chunk streams)."""

    def __init__(self, events: AsyncIterator[str], close) -> None:
        super().__init__(events, sep="\n", ping=15)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


async def _until_disconnect(request: Request, work) -> GenerateChunk:
    """Await ``work`` unless the client disconnects first (then cancel it: the abort path)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientCancelledError("the client disconnected")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def _sse_events(chunks: AsyncIterator[tuple[int, GenerateChunk]], fmt,
                      include_usage: bool, n: int) -> AsyncIterator[str]:
    finals: list[GenerateChunk] = []
    started: set[int] = set()  # choices whose first event went out
    try:
        async with contextlib.aclosing(chunks):
            async for prompt, chunk in chunks:
                choice = prompt * n + chunk.index
                first = choice not in started
                started.add(choice)
                for event in fmt.events(choice, chunk, first, include_usage):
                    yield json.dumps(event)
                if chunk.finish_reason is not None:
                    finals.append(chunk)
        if include_usage:
            yield json.dumps(fmt.usage_event(oaf.total_usage(finals)))
    except Exception as exc:  # after the 200 header: report in-band, as OpenAI does
        yield json.dumps(http_error(exc)[1])
    yield "[DONE]"


@dataclass
class HttpServer:
    """A running uvicorn server and the port it bound (useful when asked for port 0)."""

    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.task, timeout)
        await _stop_sse_watcher()


async def _stop_sse_watcher() -> None:
    """End sse-starlette's per-loop shutdown watcher. It polls for uvicorn's signal-handler
    shutdown, which a server stopped from code (ours) never triggers, so it outlived every
    server and the loop closed on it ("Task was destroyed but it is pending!"). Its
    process-wide ``AppStatus.should_exit`` switch would also end later servers' streams."""
    watcher = getattr(sse_starlette.sse, "_shutdown_watcher", None)
    if watcher is None:  # a later sse-starlette without it
        return
    watchers = [
        task for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "cr_code", None) is watcher.__code__
    ]
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)


async def start_http_server(service: GenerationService, host: str = "127.0.0.1",
                            port: int = 0, *, api_key: str | None = None,
                            log_level: str = "warning",
                            tls: TLSConfig | None = None) -> HttpServer:
    """Serve ``create_app(service)`` with uvicorn on the running loop.

    The listening socket is made here so the port is known at once. It is created with an
    explicit IPPROTO_TCP: asyncio only sets TCP_NODELAY on sockets whose ``proto`` says TCP,
    and without it every response waits ~40 ms for a delayed ACK (Nagle). A port another
    process listens on is a ``PortInUseError``. ``tls`` (default ``service.config.tls``)
    serves HTTPS; with a client CA, clients must present a certificate it signed."""
    tls = tls if tls is not None else service.config.tls
    sock = _listen(host, port)
    ssl_options: dict[str, Any] = {}
    if tls is not None:
        ssl_options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
        if tls.client_ca_file:
            ssl_options.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(create_app(service, api_key=api_key), log_level=log_level,
                            lifespan="off", timeout_graceful_shutdown=2, **ssl_options)
    try:
        config.load()  # reads the certificate now: a bad one fails here, not per connection
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    return HttpServer(server, task, sock.getsockname()[1])


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not REUSEPORT: no sharing
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortInUseError(f"HTTP port {port} on {host} is already in use: stop what holds "
                             "it or choose another port (--http-port, router.http_port)") from None
    return sock

