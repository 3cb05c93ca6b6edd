"""Errors of the KV transfer layer.

Every error names the request, the peer and what happened, so the line that reaches a log or
a client explains itself ("request r7: KV transfer to decode-2 (10.0.0.5:41231) timed out
after 30.0 s waiting for the payload"). All of them are recoverable: the request fails (or is
re-prefilled elsewhere), the worker lives. The worker layer maps ``TransferError`` to
``engine.errors.KVTransferError``; this package cannot import ``engine``.
"""

from __future__ import annotations


class TransferError(Exception):
    """Moving one request's KV blocks failed; the message says which request, peer and why."""

    def __init__(self, request_id: str | None, peer: str, what: str) -> None:
        self.request_id = request_id  # None when a whole channel failed before any request
        self.peer = peer  # human-readable peer: "decode-2 (10.0.0.5:41231)"
        self.what = what  # what happened, lower case, no trailing period
        subject = f"request {request_id}" if request_id is not None else "channel"
        super().__init__(f"{subject}: KV transfer with {peer} failed: {what}")

    def for_request(self, request_id: str) -> TransferError:
        """The same failure re-addressed to another request (a channel error fails many)."""
        return type(self)(request_id, self.peer, self.what)


class TransferTimeout(TransferError):
    """An operation did not finish within the configured timeout."""


class PeerClosed(TransferError):
    """The peer closed the channel or died (connection closed, process gone)."""


class TransferAborted(TransferError):
    """The request was aborted (by either side) before its KV arrived."""


class LayoutMismatch(TransferError):
    """The two sides' KV caches disagree in layout (layers, block size, heads, dtype)."""
