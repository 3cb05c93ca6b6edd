"""The one place that turns exceptions into gRPC statuses and OpenAI-style HTTP errors.

Classification comes from ``engine.errors`` (each class has a gRPC-style ``code``). Two
router-only classes add what the edge needs: ``InvalidParamError`` names the offending
request field (OpenAI's ``param``), ``UnauthenticatedError`` is a missing or wrong API key.
A ``ValueError`` raised by ``SamplingParams`` validation is an INVALID_ARGUMENT naming its
field; any other unexpected exception is INTERNAL with a message that leaks nothing.
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

_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)=")


def classify(exc: BaseException) -> ErrorInfo:
    """Map any exception to an ErrorInfo; unexpected ones are logged and become INTERNAL."""
    if isinstance(exc, SplitServeError):
        code = exc.code if exc.code in _TABLE else "INTERNAL"
        return ErrorInfo(code, str(exc) or type(exc).__name__, getattr(exc, "param", None))
    if isinstance(exc, ValueError) and (m := _SAMPLING_FIELD.match(str(exc))):
        return ErrorInfo("INVALID_ARGUMENT", str(exc), m.group(1))
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ErrorInfo("DEADLINE_EXCEEDED", "the request's deadline passed")
    logger.error("internal error", exc_info=exc)
    return ErrorInfo("INTERNAL", "internal server error; the server log has the details")


def outcome_code(exc: BaseException | None) -> str:
    """The ``code`` label of splitserve_requests_total: OK or the error's code."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return classify(exc).code


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details for an exception."""
    info = classify(exc)
    return _TABLE[info.code][0], info.message


def http_status(info: ErrorInfo) -> int:
    return _TABLE[info.code][1]


def openai_error_body(info: ErrorInfo) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {
        "message": info.message,
        "type": _TABLE[info.code][2],
        "param": info.param,
        "code": _OPENAI_CODES.get(info.code, info.code.lower()),
    }}


def http_error(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body for an exception."""
    info = classify(exc)
    return http_status(info), openai_error_body(info)


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

