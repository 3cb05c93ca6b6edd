"""The OpenAI edge's generation path: one request -> its prompts' requests -> a response.

A completions request may carry a batch of prompts, and each prompt has ``n`` samples: the
prompts run as requests of their own, side by side; choice ``index`` = prompt * n + sample.
Non-streaming: every prompt runs to the end, then one JSON body. Streaming: every prompt is
admitted and run to its first chunk before the 200 (a refusal is an HTTP status, never an
in-band error), then their chunks are merged into one event stream as they come. A failure
of one prompt fails the request with that prompt's own error and aborts the others; a client
that disconnects aborts them all (the SSE task's cancellation, or a watcher on the ASGI
disconnect message for non-streaming requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from engine.errors import SplitServeError
from router import openai_format as oaf
from router.errors import ClientCancelledError, classify, http_error, outcome_code
from router.service import GenerationService
from router.tool_parsers import get_parser
from router.types import GenerateChunk, PreparedRequest

logger = logging.getLogger(__name__)


async def generate(service: GenerationService, request: Request, body, chat: bool) -> Response:
    """Answer one completions (``chat`` False) or chat request: JSON, or an event stream."""
    try:
        tools = body.tool_spec() if chat else None
        parser = get_parser(_tool_parser_name(service)) if tools and tools.functions else None
        inputs = body.to_inputs(deadline=None, parser=parser) if chat else \
            body.to_inputs(deadline=None)
    except (SplitServeError, ValueError) as exc:  # their handlers count nothing (an error
        # from prepare is counted there); any other exception is counted by EdgeMiddleware
        service.metrics.requests.labels(code=outcome_code(exc)).inc()
        raise
    preps = [await service.prepare(inp) for inp in inputs]  # large prompts: tokenizer threads
    model = body.model or service.config.model_name
    n = body.n  # choice index = prompt * n + sample
    prompt_logprobs = body.prompt_logprobs is not None
    prompt_ids = [p.prompt_token_ids for p in preps for _ in range(n)] \
        if body.return_token_ids else None  # per choice
    if chat:
        fmt: oaf.CompletionFormat = oaf.ChatFormat(
            preps[0].request_id, model, [tools.stream(parser) if parser else None
                                         for _ in range(n)], prompt_logprobs, prompt_ids)
    else:
        echo = [_echo_text(service, inp, prep) for inp, prep in zip(inputs, preps, strict=True)
                for _ in range(n)] if body.echo else None
        fmt = oaf.CompletionFormat(preps[0].request_id, model, echo, prompt_logprobs,
                                   prompt_ids)
    if body.stream:
        return await _start_stream(service, request, preps, fmt, body.include_usage)
    chunks = await _until_disconnect(request, _complete_all(service, preps))
    for i, chunk in enumerate(chunks):  # a prompt's logprobs come with its sample 0 only
        if chunk.prompt_logprobs is None:
            chunk.prompt_logprobs = chunks[i - i % n].prompt_logprobs
    return JSONResponse(fmt.full(chunks))


def _tool_parser_name(service: GenerationService) -> str:
    # RouterConfig.tool_call_parser (router.tool_parsers) picks the registry entry.
    return service.config.tool_call_parser


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
    raised: BaseException | None = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raised = task.exception()
                raise raised
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        _log_others(results, raised)


def _log_others(errors, raised: BaseException | None) -> None:
    """Log what other prompts of a batch failed with: only the first failure reaches the
    client and the edge's log; an internal error must not go unseen."""
    for exc in errors:
        if (isinstance(exc, Exception) and exc is not raised
                and classify(exc, log=False).code == "INTERNAL"):
            logger.error("another prompt of the batch failed too", exc_info=exc)


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
    raised: BaseException | None = None
    try:
        running = len(tasks)
        while running:
            index, chunk, exc = await queue.get()
            if exc is not None:
                raised = exc
                raise exc
            if chunk is None:
                running -= 1
                continue
            yield index, chunk
    finally:  # the reader left early or failed: end the other choices (aborts them)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _log_others([item[2] for item in _drained(queue)], raised)


def _drained(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


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
    prompt_logprobs: dict[int, list] = {}  # per prompt; they come with its sample 0 only
    try:
        async with contextlib.aclosing(chunks):
            async for prompt, chunk in chunks:
                choice = prompt * n + chunk.index
                first = choice not in started
                started.add(choice)
                if chunk.prompt_logprobs is not None:
                    prompt_logprobs[prompt] = chunk.prompt_logprobs
                elif first:
                    chunk.prompt_logprobs = prompt_logprobs.get(prompt)
                for event in fmt.events(choice, chunk, first, include_usage):
                    yield json.dumps(event)
                if chunk.finish_reason is not None:
                    finals.append(chunk)
        if include_usage:
            yield json.dumps(fmt.usage_event(oaf.total_usage(finals)))
    except Exception as exc:  # after the 200 header: report in-band, as OpenAI does
        yield json.dumps(http_error(exc)[1])
    yield "[DONE]"
