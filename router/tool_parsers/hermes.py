"""Hermes-style calls, as Qwen2.5 / Qwen3 chat templates ask for them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls are several blocks; text outside the blocks is the content. A block that is
not a JSON object with a string ``name`` (or is cut off by the token limit) stays content.
"""

from __future__ import annotations

import json
import re
from typing import Any

from router.tool_parsers.base import ToolCall, ToolParser, arguments_text, calls_tag

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class HermesToolParser(ToolParser):
    start_marker = "<tool_call>"

    def structural_tag(self, functions: list[dict[str, Any]],
                       max_calls: int | None) -> dict[str, Any]:
        return calls_tag(functions, max_calls, self.start_marker,
                         '<tool_call>\n{"name": {name}, "arguments": ', "}\n</tool_call>")

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for match in _BLOCK.finditer(text):
            call = _call(match.group(1))
            if call is None:
                continue  # malformed: left in the content below
            kept.append(text[pos:match.start()])
            pos = match.end()
            calls.append(call)
        kept.append(text[pos:])
        content = "".join(kept)
        return (content.strip() if calls else content), calls


def _call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = arguments_text(obj.get("arguments", {}))
    return None if args is None else ToolCall(obj["name"], args)
