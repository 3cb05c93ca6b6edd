"""Tool-call parsers: the model's text -> OpenAI ``tool_calls``, chosen by name.

A parser knows how one model family writes a call (``ToolParser`` in ``base``):

  hermes   ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5 / Qwen3,
           Hermes; the chat template that ``make-model`` writes)
  llama3   ``{"name": ..., "parameters": {...}}`` as the whole reply, several joined by
           ``;`` (Llama 3.1 / 3.2 JSON tool calling), optionally after ``<|python_tag|>``

Parsers are imported on first use (``get_parser``), so adding one costs nothing to the others.
"""

from __future__ import annotations

import importlib

from router.tool_parsers.base import ToolCall, ToolCallStream, ToolParser

_REGISTRY: dict[str, str] = {
    "hermes": "router.tool_parsers.hermes:HermesToolParser",
    "llama3": "router.tool_parsers.llama3:Llama3JsonToolParser",
}
DEFAULT_PARSER = "hermes"


def parser_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_parser(name: str) -> ToolParser:
    """A new parser of the registered ``name`` (ValueError naming the known ones otherwise)."""
    target = _REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(parser_names())}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["DEFAULT_PARSER", "ToolCall", "ToolCallStream", "ToolParser", "get_parser",
           "parser_names"]
