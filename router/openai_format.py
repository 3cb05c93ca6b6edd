"""OpenAI response bodies for completions and chat: whole responses and stream events.

A request has n choices per prompt (a completions batch has several prompts): choice
``index`` = prompt * n + sample. A format object follows one HTTP request: ``full(chunks)``
builds the JSON response from each choice's merged chunk, ``events(index, chunk, first)``
the stream events for one chunk of one choice, ``usage_event(usage)`` the closing usage
event (``stream_options.include_usage``). Final choices carry the non-standard
``"splitserve": {"request_id", "timing"}`` extension.

Completions with ``echo``: a choice's text starts with its prompt's text. Chat with tools:
each choice's text goes through a ``ToolCallStream``; calls become ``tool_calls`` (whole, in
the final delta when streaming) and the finish reason ``tool_calls``.
"""

from __future__ import annotations

import time
from itertools import accumulate
from typing import Any

from router.tool_parsers import ToolCall, ToolCallStream
from router.types import GenerateChunk, LogprobEntry, Usage


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def total_usage(finals: list[GenerateChunk]) -> Usage:
    """The usage of a request's final chunks: each prompt once (its sample 0), every
    sample's completion."""
    usages = [c.usage for c in finals if c.usage is not None]
    firsts = [c.usage for c in finals if c.usage is not None and c.index == 0]
    return Usage(sum(u.prompt_tokens for u in firsts),
                 sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in firsts))


def extension_body(chunk: GenerateChunk) -> dict[str, Any]:
    return {"request_id": chunk.request_id, "timing": chunk.timing or {}}


def completion_logprobs(entries: list[LogprobEntry] | None,
                        prompt: list[LogprobEntry] | None = None,
                        start: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object. ``prompt``: echo, the prompt's entries go first (its
    first token's logprob and top are None). ``text_offset``: each token's character offset
    in the choice's text, the first one's ``start``. Each ``top_logprobs`` dict holds the
    token itself first, then the most likely ones: up to ``logprobs + 1`` entries, as OpenAI
    and vLLM give them (a check that the chosen token was the likeliest reads it there)."""
    if entries is None:
        return None
    if prompt:
        entries = prompt + entries
    ends = list(accumulate((len(e.token) for e in entries), initial=start))
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else _with_chosen(e) for e in entries],
            "text_offset": ends[:-1]}


def _with_chosen(e: LogprobEntry) -> dict[str, float]:
    top = {e.token: e.logprob}
    for t in e.top:
        top.setdefault(t.token, t.logprob)
    return top


def vllm_prompt_logprobs(entries: list[LogprobEntry] | None) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}} for the prompt token and the top
    alternatives (ranks 1, 2, ...)."""
    if entries is None:
        return None
    out: list[dict | None] = [None]
    for e in entries[1:]:
        d = {e.token_id: {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token}}
        for rank, t in enumerate(e.top, start=1):
            d.setdefault(t.token_id, {"logprob": t.logprob, "rank": rank,
                                      "decoded_token": t.token})
        out.append(d)
    return out


def chat_logprobs(entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t.token, t.logprob) for t in e.top]}
                        for e in entries]}


class CompletionFormat:
    object_full, object_chunk, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, request_id: str, model: str, echo: list[str] | None = None,
                 prompt_logprobs: bool = False,
                 prompt_ids: list[list[int]] | None = None) -> None:
        self.id = f"{self.id_prefix}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self._echo = echo  # per choice: its prompt's text, to put first
        self._prompt_logprobs = prompt_logprobs  # vLLM's extra: on each choice's first part
        # vLLM's return_token_ids: per choice, its prompt's ids (None: not asked)
        self._prompt_ids = prompt_ids
        self._offset: dict[int, int] = {}  # per choice: text_offset of its next token

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, index: int, chunk: GenerateChunk, first: bool) -> dict[str, Any]:
        text = (self._echo[index] if self._echo and first else "") + chunk.text
        prompt = chunk.prompt_logprobs if first else None
        shown = prompt if self._echo else None
        # an echoed prompt without its tokens' entries still comes first in the text
        start = len(self._echo[index]) if first and self._echo and not shown else \
            self._offset.get(index, 0)
        logprobs = completion_logprobs(chunk.logprobs, shown, start)
        if logprobs is not None:
            self._offset[index] = start + sum(len(t) for t in logprobs["tokens"])
        out = {"index": index, "text": text, "logprobs": logprobs,
               "finish_reason": chunk.finish_reason, "stop_reason": chunk.stop_reason}
        if self._prompt_logprobs and first:
            out["prompt_logprobs"] = vllm_prompt_logprobs(prompt)
        if self._prompt_ids is not None:  # as vLLM: the prompt's with the first part
            out["token_ids"] = chunk.token_ids
            if first:
                out["prompt_token_ids"] = self._prompt_ids[index]
        return out

    def full(self, chunks: list[GenerateChunk]) -> dict[str, Any]:
        return {**self._base(self.object_full),
                "choices": [self._choice(i, c, True) for i, c in enumerate(chunks)],
                "usage": usage_body(total_usage(chunks)),
                "splitserve": extension_body(chunks[0])}

    def events(self, index: int, chunk: GenerateChunk, first: bool,
               include_usage: bool) -> list[dict[str, Any]]:
        event = {**self._base(self.object_chunk), "choices": [self._choice(index, chunk, first)]}
        if include_usage:
            event["usage"] = None
        if chunk.finish_reason is not None:
            event["splitserve"] = extension_body(chunk)
        return [event]

    def usage_event(self, usage: Usage) -> dict[str, Any]:
        return {**self._base(self.object_chunk), "choices": [], "usage": usage_body(usage)}


class ChatFormat(CompletionFormat):
    object_full, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, request_id: str, model: str, tools: list[ToolCallStream | None],
                 prompt_logprobs: bool = False,
                 prompt_ids: list[list[int]] | None = None) -> None:
        super().__init__(request_id, model, prompt_logprobs=prompt_logprobs,
                         prompt_ids=prompt_ids)
        self._tools = tools  # per choice; None: plain text

    def _finish(self, index: int, chunk: GenerateChunk, text: str,
                ) -> tuple[str, list[ToolCall], str | None]:
        """(content, calls, finish reason) of one chunk of choice ``index``."""
        tools = self._tools[index]
        if tools is None:
            return text, [], chunk.finish_reason
        content = tools.feed(text)
        if chunk.finish_reason is None:
            return content, [], None
        rest, calls = tools.finish()
        reason = "tool_calls" if calls and chunk.finish_reason == "stop" else chunk.finish_reason
        return content + rest, calls, reason

    def _choice(self, index: int, chunk: GenerateChunk, first: bool) -> dict[str, Any]:
        content, calls, reason = self._finish(index, chunk, chunk.text)
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if content or first:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [c.as_delta(i) for i, c in enumerate(calls)]
        out = {"index": index, "delta": delta, "logprobs": chat_logprobs(chunk.logprobs),
               "finish_reason": reason, "stop_reason": chunk.stop_reason}
        if self._prompt_ids is not None:
            out["token_ids"] = chunk.token_ids
        return out

    def events(self, index: int, chunk: GenerateChunk, first: bool,
               include_usage: bool) -> list[dict[str, Any]]:
        [event] = super().events(index, chunk, first, include_usage)
        choice = event["choices"][0]
        if (not first and not choice["delta"] and choice["finish_reason"] is None
                and choice["logprobs"] is None and "token_ids" not in choice):
            return []  # a tool call's text, held until it is whole: nothing to say yet
        if self._prompt_logprobs and first:  # vLLM's chat: beside the choices
            event["prompt_logprobs"] = vllm_prompt_logprobs(chunk.prompt_logprobs)
        if self._prompt_ids is not None and first:  # one prompt, beside the choices
            event["prompt_token_ids"] = self._prompt_ids[0]
        return [event]

    def full(self, chunks: list[GenerateChunk]) -> dict[str, Any]:
        choices = []
        for index, chunk in enumerate(chunks):
            content, calls, reason = self._finish(index, chunk, chunk.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [c.as_dict() for c in calls]
            choice = {"index": index, "message": message,
                      "logprobs": chat_logprobs(chunk.logprobs),
                      "finish_reason": reason, "stop_reason": chunk.stop_reason}
            if self._prompt_ids is not None:
                choice["token_ids"] = chunk.token_ids
            choices.append(choice)
        body = {**self._base(self.object_full), "choices": choices,
                "usage": usage_body(total_usage(chunks)),
                "splitserve": extension_body(chunks[0])}
        if self._prompt_logprobs:  # vLLM's chat: one prompt, beside the choices
            body["prompt_logprobs"] = vllm_prompt_logprobs(chunks[0].prompt_logprobs)
        if self._prompt_ids is not None:
            body["prompt_token_ids"] = self._prompt_ids[0]
        return body
