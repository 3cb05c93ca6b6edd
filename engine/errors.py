"""Error classes a user can meet, classified once.

Recoverable errors fail one request and leave the server running; fatal errors mean the
worker must restart. Every message is safe to show a client and says what to do. The router
maps ``code`` to gRPC status codes and HTTP statuses in one place (router/errors.py).
"""

from __future__ import annotations


class SplitServeError(Exception):
    """Base class. ``code`` is a gRPC-style status name; ``fatal`` marks worker-ending errors."""

    code = "INTERNAL"
    fatal = False


class InvalidRequestError(SplitServeError, ValueError):
    """The request itself is wrong (bad sampling values, empty or over-long prompt, ...)."""

    code = "INVALID_ARGUMENT"


class NotFoundError(SplitServeError):
    """Unknown model name or request id."""

    code = "NOT_FOUND"


class ResourceExhaustedError(SplitServeError):
    """Admission control refused the request: every pool is full. Retry later."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(SplitServeError):
    """No worker of a needed role is ready (starting up, draining or dead). Retry later."""

    code = "UNAVAILABLE"


class DeadlineExceededError(SplitServeError):
    """The request's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class KVTransferError(SplitServeError):
    """Moving a request's KV cache between workers failed (peer died, timeout)."""

    code = "UNAVAILABLE"


class WorkerFatalError(SplitServeError):
    """The worker is in a state it cannot recover from and must be restarted."""

    code = "INTERNAL"
    fatal = True
