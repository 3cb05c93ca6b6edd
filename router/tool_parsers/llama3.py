"""Llama 3.1 / 3.2 JSON tool calls: the whole reply is one call, or several joined by ``;``,

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after ``<|python_tag|>``. ``arguments`` is accepted for ``parameters`` (models
fine-tuned on OpenAI-shaped data write it). A reply that is not entirely calls is content.
"""

from __future__ import annotations

import json
from typing import Any

from router.tool_parsers.base import ToolCall, ToolParser, arguments_text, calls_tag

_PYTHON_TAG = "<|python_tag|>"
_CALL_OPENS = '{"name": '  # as the Llama 3.1 / 3.2 chat templates write a call


class Llama3JsonToolParser(ToolParser):
    start_marker = _PYTHON_TAG

    def structural_tag(self, functions: list[dict[str, Any]],
                       max_calls: int | None) -> dict[str, Any]:
        """Free text; once the output writes a call's opening (``{"name": ``), the rest is
        one of ``functions`` with ``parameters`` by its schema. Calls after the first
        (``;``-joined) are held to it too, unless ``max_calls`` is 1."""
        return calls_tag(functions, max_calls, _CALL_OPENS,
                         _CALL_OPENS + '{name}, "parameters": ', "}")

    def hold_from(self, text: str, at_start: bool) -> tuple[int, bool]:
        """A call is the whole reply: hold a reply that starts (after blanks) like one."""
        head = text.lstrip()
        if not at_start:
            return len(text), False
        if head.startswith(("{", _PYTHON_TAG)):
            return 0, True
        if not head or _PYTHON_TAG.startswith(head):
            return 0, False
        return len(text), False

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix(_PYTHON_TAG).strip()
        calls = _calls(body) if body.startswith("{") else None
        return ("", calls) if calls else (text, [])


def _calls(body: str) -> list[ToolCall] | None:
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        call = _call(obj)
        if call is None:
            return None
        calls.append(call)
        pos = end
        rest = body[pos:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        pos = len(body) - len(rest)
    return calls


def _call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = arguments_text(obj.get("parameters", obj.get("arguments", {})))
    return None if args is None else ToolCall(obj["name"], args)
