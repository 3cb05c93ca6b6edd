"""ASGI middleware at the HTTP edge: the body size limit and the last-resort error answer.

``EdgeMiddleware`` wraps the FastAPI app:

- A request body larger than ``max_request_body_bytes`` is answered 413 (an OpenAI-style
  error body) before the app sees it: at once when ``Content-Length`` says so, otherwise as
  soon as the bytes read pass the limit. The body is read here and handed to the app whole,
  so no route can hold more than the limit for a request.
- An exception that no route handler turned into a response becomes a 500 with an
  OpenAI-style body (``router.errors``: no traceback), answered here. Starlette's own
  last-resort handler re-raises after answering, and uvicorn then closes the connection,
  which dropped a keep-alive client's connection for one bad request.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import RequestTooLargeError, http_error

DRAIN_LIMIT_BYTES = 64 << 20
"""An over-limit body declared up to this size is read and dropped before the 413; a larger
one gets the 413 at once and the connection is closed."""


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, on_error=None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error  # called with each exception answered here (metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            receive = await self._read_body(scope, receive)
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the edge answers every failure
            if started:  # the status is out: nothing left to say but closing
                raise
            if self.on_error is not None:
                self.on_error(exc)
            status, body = http_error(exc)
            await _send_json(send, status, body)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (at most the limit) and return a ``receive`` replaying it."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            if declared <= DRAIN_LIMIT_BYTES:  # read and drop it: a client that sends its
                await _drain(receive)  # whole body before reading gets the 413, not a reset
            raise self._too_large(declared)
        if scope.get("method") in ("GET", "HEAD"):
            return receive
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive)  # disconnected: let the app see it
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                raise self._too_large(None)
            if not message.get("more_body", False):
                return _replay(parts, None, receive)

    def _too_large(self, declared: int | None) -> RequestTooLargeError:
        size = f"{declared} bytes" if declared is not None else "larger than that"
        return RequestTooLargeError(
            f"the request body is {size}; this server accepts at most {self.max_body_bytes} "
            "bytes: shorten the prompt")


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(parts: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that returns the buffered body once, then defers to ``receive``."""
    pending: list[Message] = [first] if first is not None else [
        {"type": "http.request", "body": b"".join(parts), "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()
    return replay


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
