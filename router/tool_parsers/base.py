"""The tool-parser interface and the streaming wrapper shared by every parser.

``ToolParser.parse(text)`` splits a complete reply into (content, calls). Streaming uses the
parser's ``start_marker``: text is passed through as content until the marker could begin,
then held back; at the end the held text is parsed and the calls go out as OpenAI-style
deltas (one per call, each carrying its index, id, name and whole arguments), which the
``openai`` client accumulates exactly as it does OpenAI's finer-grained deltas.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's ``function.arguments``)."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def as_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.as_dict()}


def arguments_text(value: Any) -> str | None:
    """Arguments as JSON text: a JSON object (dict) or a string holding one; None otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def calls_tag(functions: list[dict[str, Any]], max_calls: int | None, trigger: str,
              opening: str, closing: str) -> dict[str, Any]:
    """An xgrammar structural tag for calls written ``opening`` (with ``{name}``, the
    function's name as JSON), the arguments by the function's schema, then ``closing``:
    free text until ``trigger`` (how every ``opening`` starts), one call after it, and
    with ``max_calls`` 1, the end after the first."""
    tags = [{"type": "tag", "begin": opening.replace("{name}", json.dumps(f["name"])),
             "content": {"type": "json_schema",
                         "json_schema": f.get("parameters") or {"type": "object"}},
             "end": closing} for f in functions]
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": [trigger], "tags": tags,
                       "stop_after_first": max_calls == 1}}


class ToolParser(ABC):
    start_marker: str = ""
    """Text that opens a call (streaming holds text back from there)."""

    @abstractmethod
    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content without the calls, the calls). Text that looks like a call but does not
        parse stays in the content: a model's malformed call is shown, never dropped."""

    def structural_tag(self, functions: list[dict[str, Any]],
                       max_calls: int | None) -> dict[str, Any] | None:
        """The calls of ``functions`` in this parser's format as an xgrammar structural tag
        (free text; after the call marker, a call whose arguments follow the function's
        schema), which enforces ``strict`` tools under tool_choice "auto"; None where this
        format cannot be written as one (the calls are then parsed, not enforced)."""
        return None

    def hold_from(self, text: str, at_start: bool) -> tuple[int, bool]:
        """(where to start holding ``text`` back, whether a call surely began there). The
        default: at ``start_marker``, or at a tail that may be its beginning (not sure)."""
        marker = self.start_marker
        at = text.find(marker)
        if at >= 0:
            return at, True
        for keep in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-keep:]):
                return len(text) - keep, False
        return len(text), False


class ToolCallStream:
    """One chat reply's text, fed delta by delta: content deltas as they can be released,
    tool calls at the end (``finish``). ``max_calls`` (parallel_tool_calls=false: 1) keeps
    only the first calls."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self._parser = parser
        self._max_calls = max_calls
        self._held = ""  # text that may be (the start of) a call
        self._started = False  # some content was released
        self._holding = False  # a call began: hold everything to the end

    def feed(self, delta: str) -> str:
        """The content that can be sent now for ``delta``."""
        if self._holding:
            self._held += delta
            return ""
        text = self._held + delta
        cut, self._holding = self._parser.hold_from(text, at_start=not self._started)
        self._held = text[cut:]
        if cut:
            self._started = True
        return text[:cut]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the content, the calls) at the end of the reply."""
        content, calls = self._parser.parse(self._held)
        if self._max_calls is not None:
            calls = calls[: self._max_calls]
        return content, calls
