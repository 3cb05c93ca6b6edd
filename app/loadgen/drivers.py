"""Senders: how one request reaches the server, and the stamps taken as its chunks arrive.

A sender is an object with ``stream(spec) -> AsyncIterator[StreamEvent]`` (one event per
chunk the server sends), ``limits()`` (what the server accepts) and ``close()``:

- ``GrpcSender``: the gRPC API through ``router.client.AsyncSplitServeClient``, prompts as
  token ids; each chunk says how many tokens it carries.
- ``HttpSender``: OpenAI-compatible ``/v1/completions`` with SSE streaming (httpx), prompts
  as token ids; any such server (vLLM, SGLang, ...), not only ours. It asks for
  ``logprobs: 0`` because that is the only way an OpenAI stream says how many tokens each
  event carries (``logprobs.tokens``); a server that sends no logprobs is counted one token
  per event with text. The model is ``--model-name`` or else the first of ``/v1/models``;
  ``max_model_len`` and ``vocab_size`` there and splitserve's ``timing`` extension are used
  when present.

Every request is greedy (temperature 0) with ``ignore_eos``, so its output length is exact.
``measure`` turns one request's events into a ``RequestResult``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.loadgen.stats import RequestResult, arrival_gaps, latencies
from app.loadgen.workload import RequestSpec
from engine.errors import SplitServeError

OK_FINISH = ("length", "stop")


class RequestFailed(Exception):
    """A request failed in a way the sender could classify (HTTP status, in-band error)."""


@dataclass(frozen=True)
class StreamEvent:
    """One chunk of a streamed response."""

    num_tokens: int  # tokens this chunk carries
    finish_reason: str | None = None  # set on the final chunk
    timing: dict[str, float] | None = None  # the server's phase breakdown, final chunk, s
    completion_tokens: int | None = None  # usage, when the server reports it


@dataclass(frozen=True)
class ServerLimits:
    vocab_size: int | None  # None when the API does not say (HTTP)
    max_model_len: int | None
    model: str  # the model name requests should carry


async def measure(spec: RequestSpec, sender, start: float) -> RequestResult:
    """Send ``spec`` now and record when each chunk arrives; never raises for a request
    that fails (the failure is recorded), only for cancellation."""
    t0 = time.perf_counter()
    result = RequestResult(spec.index, spec.prompt_len, spec.output_len, sent_s=t0 - start)
    stamps: list[tuple[float, int]] = []
    final: StreamEvent | None = None
    try:
        async for event in sender.stream(spec):
            stamps.append((time.perf_counter(), event.num_tokens))
            if event.finish_reason is not None or event.completion_tokens is not None:
                final = _merge_final(final, event)
    except SplitServeError as exc:
        result.error = f"{exc.code}: {exc}"
    except RequestFailed as exc:
        result.error = str(exc)
    result.ttft_s, result.itl_s = latencies(t0, stamps)
    result.arrival_gaps_s = arrival_gaps(stamps)
    result.output_tokens = sum(n for _, n in stamps)
    if stamps:
        result.e2e_s = stamps[-1][0] - t0
    if final is not None:
        result.finish_reason, result.timing = final.finish_reason, final.timing
    if result.error is None:
        result.ok = result.finish_reason in OK_FINISH
        if not result.ok:
            result.error = f"finish_reason={result.finish_reason}"
    return result


def _merge_final(prev: StreamEvent | None, event: StreamEvent) -> StreamEvent:
    """The final chunk and a usage-only event after it (HTTP) are one final record."""
    if prev is None:
        return event
    return StreamEvent(0, prev.finish_reason or event.finish_reason, prev.timing or event.timing,
                       event.completion_tokens or prev.completion_tokens)


class GrpcSender:
    """Streams over gRPC (``address`` is host:port)."""

    def __init__(self, address: str, *, model: str = "", timeout_s: float | None = None,
                 api_key: str | None = None) -> None:
        from router.client import AsyncSplitServeClient

        self.address = address
        self.timeout_s = timeout_s  # per-request deadline, enforced by the server too
        self._client = AsyncSplitServeClient(address, model=model, api_key=api_key)

    async def limits(self) -> ServerLimits:
        info = await self._client.model_info()
        return ServerLimits(info.vocab_size, info.card.max_model_len, info.card.id)

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        chunks = self._client.stream(list(spec.prompt_token_ids), timeout=self.timeout_s,
                                     max_tokens=spec.output_len, temperature=0.0,
                                     ignore_eos=True)
        async for chunk in chunks:
            usage = chunk.usage.completion_tokens if chunk.usage is not None else None
            yield StreamEvent(len(chunk.token_ids), chunk.finish_reason, chunk.timing, usage)

    async def close(self) -> None:
        await self._client.close()


class HttpSender:
    """Streams from OpenAI-compatible ``/v1/completions`` (``base_url`` ends in /v1)."""

    def __init__(self, base_url: str, *, model: str = "", timeout_s: float | None = None,
                 api_key: str | None = None, transport=None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout_s, connect=10.0),
                                       transport=transport)  # tests: httpx.MockTransport

    async def limits(self) -> ServerLimits:
        """The model to ask for and its context length: ``model`` (--model-name) when set,
        else the first model ``/models`` lists; /models may be missing if a name is set."""
        cards = await self._model_cards()
        card = next((c for c in cards if c.get("id") == self.model),
                    None if self.model else (cards[0] if cards else None))
        if card is None and not self.model:
            raise RequestFailed(f"{self.base_url}/models lists no model; name one with "
                                "--model-name")
        self.model = self.model or card["id"]
        card = card or {}
        max_len, vocab = card.get("max_model_len"), card.get("vocab_size")  # ours has both
        return ServerLimits(vocab if isinstance(vocab, int) else None,
                            max_len if isinstance(max_len, int) else None, self.model)

    async def _model_cards(self) -> list[dict]:
        import httpx

        try:
            resp = await self._http.get("/models")
            resp.raise_for_status()
            cards = resp.json().get("data")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            if self.model:  # the name is all we need
                return []
            raise RequestFailed(f"cannot list models at {self.base_url}/models ({exc}); "
                                "name the model with --model-name") from exc
        return [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        import httpx

        body = {"model": self.model, "prompt": list(spec.prompt_token_ids),
                "max_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
        try:
            async with self._http.stream("POST", "/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise RequestFailed(f"HTTP {resp.status_code}: {text[:200]}")
                async for line in resp.aiter_lines():
                    event = _sse_event(line)
                    if event is not None:
                        yield event
        except httpx.HTTPError as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._http.aclose()


def _sse_event(line: str) -> StreamEvent | None:
    """The StreamEvent of one SSE line (None for blank lines, comments and [DONE])."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    body = json.loads(data)
    if "error" in body:
        err = body["error"]
        raise RequestFailed(f"{err.get('code') or err.get('type')}: {err.get('message')}")
    usage = (body.get("usage") or {}).get("completion_tokens")
    if not body.get("choices"):
        return StreamEvent(0, completion_tokens=usage)
    choice = body["choices"][0]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        tokens = len(logprobs["tokens"])
    else:  # a server that streams no logprobs: one token per event with text
        tokens = 1 if choice.get("text") else 0
    timing = (body.get("splitserve") or {}).get("timing")
    return StreamEvent(tokens, choice.get("finish_reason"), timing, usage)
