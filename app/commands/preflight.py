"""Checks `splitserve serve` runs before it starts Ray: the config, the model directory and
the ports. Each failure is one line that says what is wrong and what to do (the caller
prints it and exits 2).

Everything here is cheap and light to import (no torch, ray, grpc): a user who mistyped a
path hears about it in well under two seconds, not after the workers started.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

# The names engine.llm_engine accepts (checked there again, after Ray has started).
DTYPES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class PreflightError(ValueError):
    """A problem found before start-up; its message is one line, safe to print."""


def config_error_line(exc: Exception) -> str:
    """One line for a config that did not validate (pydantic's are multi-line)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic.ValidationError, without importing pydantic here
        parts = []
        for e in errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", ""))
        return "; ".join(parts)
    return " ".join(str(exc).split())


def check_model_dir(path: str, dtype: str, weights: bool = True) -> None:
    """The checkpoint folder exists and holds what the router and the workers will read:
    config.json of a supported architecture, a tokenizer and (``weights``) safetensors
    weights. Workers on other nodes of a Ray cluster read the weights from their own mount,
    which this machine may not have: the caller then passes ``weights=False``."""
    from engine.model_config import ModelConfig  # reads json and the registry: no torch

    model = Path(path).expanduser()
    if not model.exists():
        raise PreflightError(f"model directory {path} does not exist: pass --model with a "
                             "Hugging Face checkpoint folder (or run `splitserve make-model`)")
    if not model.is_dir():
        raise PreflightError(f"--model {path} is a file; pass the checkpoint's folder")
    if not (model / "config.json").is_file():
        raise PreflightError(f"no config.json in {path}: is it a Hugging Face model folder?")
    try:
        ModelConfig.from_pretrained(model)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else " ".join(
            str(exc).split())
        raise PreflightError(f"the model's config.json cannot be used: {detail}") from None
    if weights:
        _check_weights(model, path)
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise PreflightError(f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer next to the weights")
    if dtype not in DTYPES:
        raise PreflightError(f"model.dtype={dtype!r} is not supported; use one of "
                             f"{', '.join(DTYPES)}")


def _check_weights(model: Path, path: str) -> None:
    index = model / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PreflightError(f"{index.name} in {path} is not a safetensors index (no "
                                 "weight_map)") from None
        missing = sorted(f for f in files if not (model / f).is_file())
        if missing:
            raise PreflightError(f"{index.name} lists {missing[0]}, which is not in {path} "
                                 f"({len(missing)} weight file(s) missing)")
        return
    if not (model / "model.safetensors").is_file():
        raise PreflightError(f"no weights in {path}: expected model.safetensors or "
                             "model.safetensors.index.json (only safetensors checkpoints are "
                             "supported)")


def check_ports(host: str, ports: list[tuple[str, int, str]]) -> None:
    """``ports``: (what, port, flag). Each non-zero port must be free to bind on ``host``
    (probed as the servers bind: SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    from router.config import PortInUseError  # a light module (dataclasses only)

    wanted = [p for _, p, _ in ports if p]
    if len(wanted) != len(set(wanted)):
        raise PreflightError(f"the gRPC and HTTP servers are both given port {wanted[0]}; "
                             "give them different ports (--grpc-port, --http-port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for what, port, flag in ports:
        if port == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(f"{what} port {port} on {host} is already in use: stop "
                                         f"what holds it or choose another port ({flag})"
                                         ) from None
                raise PreflightError(f"cannot listen on {host}:{port} ({exc.strerror}); check "
                                     "--host") from None


def check_all(config: Any, *, gpu_memory_flag: bool) -> None:
    """Every check (ports first: the cheapest). Raises ``PreflightError`` or
    ``router.config.PortInUseError``."""
    if not config.model.path:
        raise PreflightError("no model: pass --model DIR (or model.path in --config)")
    if config.model.device == "cpu":
        written = [f"{section}.engine.gpu_memory_utilization"
                   for section in ("decode",) + (() if config.colocated else ("prefill",))
                   if "gpu_memory_utilization" in getattr(config, section).engine.model_fields_set]
        if gpu_memory_flag or written:
            what = "--gpu-memory-utilization" if gpu_memory_flag else written[0]
            raise PreflightError(f"{what} applies to CUDA workers only; on CPU the KV cache "
                                 "size is set by engine.kv_cache_memory_bytes in --config")
    rc = config.router
    check_ports(rc.host, [("gRPC", rc.grpc_port, "--grpc-port"),
                          ("HTTP", rc.http_port, "--http-port")])
    check_model_dir(config.model.path, config.model.dtype, weights=not config.ray.address)
