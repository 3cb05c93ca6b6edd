"""Chat messages and tools: the request side of OpenAI tool calling.

``ChatMessage`` keeps what a multi-turn tool conversation needs in the history: an
assistant's ``tool_calls`` (their JSON-text arguments become objects, as chat templates
expect) and a ``tool`` message's ``tool_call_id``. ``ToolSpec`` checks ``tools`` and
``tool_choice`` and says what the request becomes:

  tool_choice  template gets tools   output constrained by              reply parsed by
  none         no                    -                                  -
  auto         yes                   -                                  the tool parser
  required     yes                   JSON: a non-empty array of          the array itself
                                     {"name", "parameters"}, one of the tools each
  named        yes                   JSON: the function's parameters     the object itself

(the default is ``auto`` with tools, ``none`` without). ``render_chat`` renders messages and
tools with the model's chat template (transformers' ``apply_chat_template(tools=...)``), as
``ChatTemplateOptions`` (vLLM's fields) ask.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.structured import StructuredSpec
from router.errors import InvalidParamError
from router.tool_parsers import ToolCall, ToolCallStream, ToolParser

_STRICT = ConfigDict(extra="forbid", strict=True)
ROLES = ("system", "developer", "user", "assistant", "tool")


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    model_config = _STRICT
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # An earlier response's message sent back as history carries these as null; anything
    # else is refused (400) rather than dropped.
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None

    def as_dict(self) -> dict[str, Any]:
        for name in ("refusal", "annotations", "audio", "function_call"):
            if getattr(self, name):
                raise InvalidParamError(f"messages: {name} in a message is not supported",
                                        "messages")
        if self.role not in ROLES:
            raise InvalidParamError(f"messages: unknown role {self.role!r}; use one of "
                                    f"{', '.join(ROLES)}", "messages")
        out: dict[str, Any] = {"role": self.role, "content": _text(self.content)}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            if self.role != "assistant":
                raise InvalidParamError("messages: only assistant messages carry tool_calls",
                                        "messages")
            out["tool_calls"] = [_call_for_template(c) for c in self.tool_calls]
        if self.role == "tool":
            if not self.tool_call_id:
                raise InvalidParamError("messages: a tool message needs tool_call_id",
                                        "messages")
            out["tool_call_id"] = self.tool_call_id
        elif self.tool_call_id is not None:
            raise InvalidParamError("messages: only tool messages carry tool_call_id",
                                    "messages")
        return out


def _text(content) -> str:
    if isinstance(content, list):
        if any(part.get("type") != "text" for part in content):
            raise InvalidParamError("only text content parts are supported", "messages")
        return "".join(str(part.get("text", "")) for part in content)
    return content or ""


def _call_for_template(call: MessageToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise InvalidParamError("messages: a tool call's function.arguments must be JSON "
                                "text", "messages") from None
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


class ToolSpec:
    """Checked ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` of one chat request."""

    def __init__(self, tools: list[dict[str, Any]] | None, tool_choice: Any,
                 parallel_tool_calls: bool | None) -> None:
        self.functions = [_function(t, i) for i, t in enumerate(tools or [])]
        names = [f["name"] for f in self.functions]
        if len(set(names)) != len(names):
            raise InvalidParamError("tools: function names must be unique", "tools")
        self.choice = _choice(tool_choice, names)
        self.max_calls = 1 if parallel_tool_calls is False else None

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        if self.choice == "none" or not self.functions:
            return None
        return [{"type": "function", "function": f} for f in self.functions]

    @property
    def named(self) -> dict[str, Any] | None:
        """The function ``tool_choice`` names, if it names one."""
        return next((f for f in self.functions if f["name"] == self.choice), None)

    def structured(self, parser: ToolParser | None = None) -> StructuredSpec | None:
        """The output constraint that enforces ``required`` or a named function, or with
        ``auto`` and a ``strict`` tool, the calls' schemas in ``parser``'s format (where it
        has a structural tag: ``ToolParser.structural_tag``)."""
        if self.choice == "auto" and parser is not None \
                and any(f.get("strict") for f in self.functions):
            tag = parser.structural_tag(self.functions, self.max_calls)
            return StructuredSpec.structural_tag(tag) if tag is not None else None
        named = self.named
        if named is not None:
            return StructuredSpec.json_schema(named.get("parameters") or {"type": "object"})
        if self.choice != "required":
            return None
        item = {"anyOf": [{"type": "object", "properties": {
            "name": {"const": f["name"]},
            "parameters": f.get("parameters") or {"type": "object"}},
            "required": ["name", "parameters"]} for f in self.functions]}
        schema = {"type": "array", "items": item, "minItems": 1}
        if self.max_calls == 1:
            schema["maxItems"] = 1
        return StructuredSpec.json_schema(schema)

    def stream(self, parser: ToolParser) -> ToolCallStream | None:
        """How the reply's text becomes content and calls (None: all content)."""
        if self.choice == "none" or not self.functions:
            return None
        if self.choice == "auto":
            return ToolCallStream(parser, self.max_calls)
        return ToolCallStream(_ForcedCalls(self.named), self.max_calls)


class _ForcedCalls(ToolParser):
    """The reply of a constrained request: the named function's arguments object, or the
    ``required`` array of {"name", "parameters"}. Everything is held to the end."""

    def __init__(self, named: dict[str, Any] | None) -> None:
        self._named = named

    def hold_from(self, text: str, at_start: bool) -> tuple[int, bool]:
        return 0, True

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:  # cut off by max_tokens: show what there is
            return text, []
        if self._named is not None:
            return "", [ToolCall(self._named["name"], json.dumps(value, ensure_ascii=False))]
        return "", [ToolCall(v["name"], json.dumps(v["parameters"], ensure_ascii=False))
                    for v in value]


def _function(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise InvalidParamError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                "{...}} (only function tools are supported)", "tools")
    fn = tool["function"]
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise InvalidParamError(f"tools[{i}].function has an unknown field {unknown[0]!r}",
                                "tools")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidParamError(f"tools[{i}].function.name must be a non-empty string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidParamError(f"tools[{i}].function.parameters must be a JSON schema object",
                                "tools")
    if params is not None:  # an invalid schema is a 400 now, not a failure in a worker
        try:
            StructuredSpec.json_schema(params)
        except ValueError as exc:
            raise InvalidParamError(f"tools[{i}].function.parameters: {exc}", "tools") from None
    return dict(fn)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto" if names else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise InvalidParamError(f"tool_choice={choice!r} needs tools", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" \
            or not isinstance(name, str):
        raise InvalidParamError("tool_choice must be 'none', 'auto', 'required' or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                                "tool_choice")
    if name not in names:
        raise InvalidParamError(f"tool_choice names {name!r}, which is not in tools",
                                "tool_choice")
    return name


# apply_chat_template's own arguments and the tokenizer's special tokens (which transformers
# passes to the template itself): not template variables a client may set.
_NOT_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
    "cls_token", "mask_token", "additional_special_tokens", "extra_special_tokens"})


class ChatTemplateOptions(BaseModel):
    """vLLM's chat rendering fields: ``add_generation_prompt`` (open the assistant's turn),
    ``continue_final_message`` (leave the last message's turn open, so the model goes on
    with it; an assistant prefill) and ``chat_template_kwargs`` (more template variables,
    such as Qwen3's ``enable_thinking``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @classmethod
    def of(cls, request: Any) -> ChatTemplateOptions:
        """The options a chat or /tokenize request (with these three fields) sets."""
        return cls(add_generation_prompt=request.add_generation_prompt,
                   continue_final_message=request.continue_final_message,
                   chat_template_kwargs=request.chat_template_kwargs)

    def check(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidParamError(
                "continue_final_message continues the last message, add_generation_prompt "
                "opens a new turn: set add_generation_prompt to false with it",
                "continue_final_message")
        for key in self.chat_template_kwargs or {}:
            if not key.isidentifier() or key.startswith("_") or key in _NOT_TEMPLATE_KWARGS:
                raise InvalidParamError(
                    f"chat_template_kwargs may not set {key[:40]!r}: give template variables "
                    "(such as enable_thinking), not the renderer's own arguments",
                    "chat_template_kwargs")


def render_chat(tokenizer, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None,
                options: ChatTemplateOptions | None = None) -> list[int]:
    """Prompt ids of a chat (with the tools in the template when given)."""
    if not messages:
        raise InvalidParamError("messages is empty; send at least one message", "messages")
    options = options or ChatTemplateOptions()
    options.check()
    try:
        if tools and not tokenizer.has_chat_template:
            raise InvalidParamError("this model has no chat template; use completions "
                                    "instead", "messages")
        return list(tokenizer.apply_chat_template(
            messages, add_generation_prompt=options.add_generation_prompt, tools=tools or None,
            continue_final_message=options.continue_final_message,
            template_kwargs=options.chat_template_kwargs))
    except InvalidParamError:
        raise
    except Exception as exc:  # template errors come as jinja, KeyError, ValueError, ...
        raise InvalidParamError(f"the chat template could not render the messages: {exc}",
                                "messages") from exc
