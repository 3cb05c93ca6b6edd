"""The one place that turns exceptions into gRPC statuses and OpenAI-style HTTP errors.

Classification comes from ``engine.errors`` (each class has a gRPC-style ``code``). Two
router-only classes add what the edge needs: ``InvalidParamError`` names the offending
request field (OpenAI's ``param``), ``UnauthenticatedError`` is a missing or wrong API key.
A ``ValueError`` raised by ``SamplingParams`` validation is an INVALID_ARGUMENT naming its
field; any other unexpected exception is INTERNAL with a message that leaks nothing.

Every message that reaches a client goes through ``client_message``: errors raised inside
workers arrive wrapped by Ray (``ray::DecodeWorker.reserve() (pid=…, ip=…, actor_id=…)``
followed by a traceback), and transfer errors name peer addresses. The client gets the
error's own last line, with addresses, pids, actor/node ids, namespaces and file paths
removed; the server log keeps the original.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import grpc

from engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    SplitServeError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


class InvalidParamError(InvalidRequestError):
    """An invalid request field; ``param`` is its name as the client spelled it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnauthenticatedError(SplitServeError):
    """Missing or wrong API key."""

    code = "UNAUTHENTICATED"


class RequestTooLargeError(InvalidParamError):
    """The HTTP body is larger than the server accepts (413)."""

    code = "REQUEST_TOO_LARGE"


class ClientCancelledError(SplitServeError):
    """The client went away (closed the stream or cancelled the call)."""

    code = "CANCELLED"


@dataclass(frozen=True)
class ErrorInfo:
    """A classified error: gRPC-style code, client-safe message, offending field if known."""

    code: str
    message: str
    param: str | None = None


# code -> (gRPC status, HTTP status, OpenAI error type)
_TABLE: dict[str, tuple[grpc.StatusCode, int, str]] = {
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    "REQUEST_TOO_LARGE": (grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    "UNAUTHENTICATED": (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    "UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    "CANCELLED": (grpc.StatusCode.CANCELLED, 499, "cancelled_error"),
    "INTERNAL": (grpc.StatusCode.INTERNAL, 500, "internal_error"),
}
# OpenAI's machine-readable `code` for the cases its clients look for.
_OPENAI_CODES = {"NOT_FOUND": "model_not_found", "UNAUTHENTICATED": "invalid_api_key",
                 "RESOURCE_EXHAUSTED": "rate_limit_exceeded"}
# Codes whose refusals tell the client to come back (HTTP Retry-After, gRPC "retry-after").
RETRYABLE_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})

_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)=")


def classify(exc: BaseException, log: bool = True) -> ErrorInfo:
    """Map any exception to an ErrorInfo; unexpected ones are logged (``log``: by the one
    call that answers the client) and become INTERNAL."""
    if isinstance(exc, SplitServeError):
        code = exc.code if exc.code in _TABLE else "INTERNAL"
        message = client_message(str(exc)) or type(exc).__name__
        if message != str(exc) and log:
            logger.warning("%s error sent to the client as %r: %s", code, message, exc)
        return ErrorInfo(code, message, getattr(exc, "param", None))
    if isinstance(exc, ValueError) and (m := _SAMPLING_FIELD.match(str(exc))):
        return ErrorInfo("INVALID_ARGUMENT", client_message(str(exc)), m.group(1))
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ErrorInfo("DEADLINE_EXCEEDED", "the request's deadline passed")
    if log:
        logger.error("internal error", exc_info=exc)
    return ErrorInfo("INTERNAL", "internal server error; the server log has the details")


# What a client must never see (issue 12: a Ray traceback with actor id, pid, node IP and
# namespace reached clients). Applied to the error's last line, in this order.
_SCRUB = (
    (re.compile(r"\bray::\S+"), "a worker call"),
    (re.compile(r"\(pid=[^)]*\)"), ""),  # Ray's "(pid=1, ip=10.0.0.5, actor_id=…, repr=<…>)"
    (re.compile(r"\b(pid|ip|node_ip|actor_id|node_id|worker_id|job_id|task_id|namespace"
                r"|class_name|repr)\s*[=:]\s*(<[^>]*>|[^\s,;)]+)", re.I), "<hidden>"),
    (re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>", re.I), "<hidden>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
     "<id>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\[?\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{1,4}\b\]?(?::\d+)?"
                r"|\[?(?:\b[0-9a-f]{1,4})?::(?:[0-9a-f]{1,4}\b:?)+\]?(?::\d+)?", re.I),
     "<address>"),
    (re.compile(r"\blocalhost:\d+\b"), "<address>"),
    # Ray's hex ids (actor, node, task: 32 to 56 digits), with letters and digits both and
    # longer than any float's digits, so numbers in messages stay; not the router's own
    # request ids (req-<32 hex>), which the client needs to match its request to the logs
    (re.compile(r"(?<!\breq-)\b(?:0x)?(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{20,}\b", re.I),
     "<id>"),
    # file system paths (a directory or more deep, or ending in a file name), not API routes
    (re.compile(r"(?<![\w/])(?!/v1/)(?:[A-Za-z]:)?(?:(?:[/\\][\w.@+-]+){3,}[/\\]?"
                r"|(?:[/\\][\w@+-]+)+[/\\][\w@+-]+\.\w+)"), "<path>"),
)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Z]\w*(?:Error|Exception|Exit|Closed|"
                             r"Timeout|Aborted|Mismatch|Gone)):\s*(.*)$")
# A traceback's last line names the class with its module ("prefill_worker.worker.
# PrefillFailed: ..."), whatever the class is called.
_QUALIFIED_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)+([A-Z]\w*):\s*(.*)$")
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Ray colours its "ray::..." line


def _exception_line(line: str) -> re.Match | None:
    return _EXCEPTION_LINE.match(line) or _QUALIFIED_EXCEPTION_LINE.match(line)


def client_message(text: str) -> str:
    """``text`` made safe for a client: a traceback or a multi-line Ray error is reduced to
    its final "Class: message" line, then identifiers of processes, hosts and files are
    replaced by placeholders. Idempotent; short plain messages pass unchanged."""
    text = _TERMINAL_CODES.sub("", text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    if len(lines) > 1:
        # A traceback or Ray's format: the exception's own line is the last "Class: message"
        # line; without one, the first line says what happened.
        for candidate in reversed(lines):
            if (m := _exception_line(candidate)) is not None:
                line = m.group(2) or m.group(1)
                break
    elif (m := _EXCEPTION_LINE.match(line)) is not None and "." in line.split(":", 1)[0]:
        line = m.group(2) or m.group(1)  # "engine.errors.XError: msg" -> "msg"
    for pattern, repl in _SCRUB:
        line = pattern.sub(repl, line)
    return _valid_unicode(" ".join(line.split()))


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates escaped: they cannot be encoded as UTF-8, so an error
    body echoing one (a client's bad input) would fail to serialize."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def outcome_code(exc: BaseException | None) -> str:
    """The ``code`` label of splitserve_requests_total: OK or the error's code."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return classify(exc, log=False).code  # the edge that answers the client logs it


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details for an exception."""
    info = classify(exc)
    return _TABLE[info.code][0], info.message


def http_status(info: ErrorInfo) -> int:
    return _TABLE[info.code][1]


def openai_error_body(info: ErrorInfo) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {
        "message": _valid_unicode(info.message),
        "type": _TABLE[info.code][2],
        "param": _valid_unicode(info.param) if info.param is not None else None,
        "code": _OPENAI_CODES.get(info.code, info.code.lower()),
    }}


def http_error(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body for an exception."""
    info = classify(exc)
    return http_status(info), openai_error_body(info)


def retry_after(code: str, seconds: int) -> str | None:
    """The Retry-After value (HTTP header, gRPC trailing metadata) for a refusal with status
    ``code`` (ours, or a grpc.StatusCode's name) that the client should retry: overload, no
    ready worker. None for the others."""
    return str(seconds) if code in RETRYABLE_CODES else None


def error_from_grpc(code: grpc.StatusCode, details: str | None) -> SplitServeError:
    """Client side: the engine.errors class for a failed call's status (its message kept)."""
    classes = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
        grpc.StatusCode.NOT_FOUND: NotFoundError,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
        grpc.StatusCode.UNAVAILABLE: UnavailableError,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
        grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
        grpc.StatusCode.CANCELLED: ClientCancelledError,
    }
    exc = classes.get(code, SplitServeError)(details or code.name)
    exc.grpc_code = code
    return exc

