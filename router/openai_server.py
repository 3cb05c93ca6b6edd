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
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import sse_starlette.sse
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import SplitServeError
from router import openai_protocol as oai
from router.config import PortInUseError, TLSConfig
from router.errors import (
    ErrorInfo,
    UnauthenticatedError,
    classify,
    http_status,
    openai_error_body,
    outcome_code,
    retry_after,
)
from router.http_edge import EdgeMiddleware
from router.openai_generate import generate
from router.service import GenerationService
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
        return await generate(service, request, body, chat=False)

    @api.post("/v1/chat/completions", responses=oai.GENERATE_RESPONSES)
    async def chat(body: oai.ChatCompletionRequest, request: Request) -> Response:
        return await generate(service, request, body, chat=True)

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
        if first.get("type") == "json_invalid":  # loc is then a byte offset, not a field
            detail = (first.get("ctx") or {}).get("error", "")
            at = f" at position {loc[0]}" if loc else ""
            info = ErrorInfo("INVALID_ARGUMENT", f"the request body is not valid JSON"
                             f"{': ' + str(detail) if detail else ''}{at}")
        else:
            if first.get("type") == "extra_forbidden":  # never silently ignored: docs/api.md
                why = ("unknown field; this server does not implement it (docs/api.md lists "
                       "the fields)")
            info = ErrorInfo("INVALID_ARGUMENT", f"{'.'.join(loc) or 'body'}: {why}",
                             loc[0] if loc else None)
        service.metrics.requests.labels(code=info.code).inc()
        return JSONResponse(openai_error_body(info), status_code=http_status(info))

    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own refusals (unknown route, wrong method, a body that
        # is not JSON) in the same OpenAI shape as ours.
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        message = str(exc.detail)
        if exc.status_code == 400:  # a request body FastAPI could not read (not UTF-8)
            message = f"the request body is not valid JSON ({message.lower()})"
            service.metrics.requests.labels(code="INVALID_ARGUMENT").inc()
        body = {"error": {"message": message, "type": kind, "param": None,
                          "code": f"http_{exc.status_code}"}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(SplitServeError, on_error)
    app.add_exception_handler(ValueError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a process that owns its signals (``splitserve serve`` stops it with
    ``HttpServer.stop``). Left to itself uvicorn takes SIGINT and SIGTERM while it serves,
    then hands each one it caught to the handler it found at start: Ray's, by then, which
    turns SIGTERM into SystemExit(15), so the process exited 15 mid-shutdown."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


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
    server = _EmbeddedServer(config)
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

