"""Router configuration: one frozen, documented, validated object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class PortInUseError(OSError):
    """A server could not listen on its configured port (another process holds it)."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the gRPC and HTTP servers, from PEM files (read when the servers start)."""

    cert_file: str
    """Server certificate, or a chain starting with it."""
    key_file: str
    """Private key of ``cert_file``."""
    client_ca_file: str | None = None
    """When set, mutual TLS: clients must present a certificate signed by this CA bundle."""

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name.removesuffix('_file').replace('_', ' ')} file "
                                 f"{path!r} does not exist or is not a file")

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None) as PEM bytes."""
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes(), ca


@dataclass(frozen=True)
class RouterConfig:
    model_name: str = "splitserve-model"
    """Name clients pass as ``model`` (and ListModels / /v1/models report)."""
    max_model_len: int = 4096
    """Longest prompt + completion accepted, in tokens (the model's context)."""
    max_inflight_requests: int = 256
    """Admission limit: requests beyond it are refused with RESOURCE_EXHAUSTED / 429."""
    default_max_tokens: int | None = None
    """Cap on completion tokens when a request leaves max_tokens unset; None: the rest of
    the context (OpenAI's completions endpoint still defaults to 16, as OpenAI does)."""
    owned_by: str = "splitserve"
    """The ``owned_by`` field of the model card."""
    api_key: str | None = None
    """When set, HTTP requests must send ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    host: str = "127.0.0.1"
    """Address the gRPC and HTTP servers bind to."""
    grpc_port: int = 50051
    """gRPC port (0 picks a free one)."""
    http_port: int = 8000
    """OpenAI-compatible HTTP port (0 picks a free one)."""

    # ---- what one client may send, and how a refusal asks it to come back ----------------
    max_request_body_bytes: int = 8 << 20
    """Largest HTTP request body accepted; larger ones get 413 before they are read. (gRPC
    messages are capped by grpcio's own 4 MiB receive limit.)"""
    max_prompt_chars: int = 1_000_000
    """Longest text prompt (or rendered chat) in characters, refused with 400 before it is
    tokenized; what passes is then held to ``max_model_len`` tokens."""
    tokenizer_threads: int = 2
    """Threads that tokenize large prompts off the event loop (other streams keep flowing)."""
    retry_after_s: int = 1
    """Seconds a client is told to wait (HTTP ``Retry-After``, gRPC trailing metadata
    ``retry-after``) when refused for overload or while no worker is ready."""
    tls: TLSConfig | None = None
    """TLS (and, with a client CA, mutual TLS) for both servers; None: plaintext."""
    tool_call_parser: str = "hermes"
    """How chat completions find tool calls in generated text (``router.tool_parsers``:
    ``hermes`` for Qwen-style ``<tool_call>`` blocks, ``llama3`` for Llama 3 JSON calls)."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("RouterConfig.model_name must be non-empty")
        from router.tool_parsers import parser_names

        if self.tool_call_parser not in parser_names():
            raise ValueError(f"RouterConfig.tool_call_parser={self.tool_call_parser!r} must "
                             f"be one of {', '.join(parser_names())}")
        if self.max_model_len < 2:
            raise ValueError(f"RouterConfig.max_model_len={self.max_model_len} must be >= 2")
        if self.max_inflight_requests < 1:
            raise ValueError("RouterConfig.max_inflight_requests must be >= 1")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("RouterConfig.default_max_tokens must be >= 1 or None")
        for name in ("max_request_body_bytes", "max_prompt_chars", "tokenizer_threads",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"RouterConfig.{name} must be in [0, 65535]")
