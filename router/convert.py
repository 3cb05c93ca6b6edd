"""Protobuf <-> router dataclasses. The only module that imports generated ``*_pb2`` code.

Server side: ``GenerateRequest`` -> ``GenerateInput`` (a chat's messages and tools through
``router.chat``, the structured-output spec checked by the grammar engine,
``prompt_logprobs`` as a sampling field), ``GenerateChunk`` (+ parsed tool calls) ->
``GenerateResponse``, model cards and info. Client side: keyword sampling arguments,
text / token-id / chat prompts -> ``GenerateRequest``, ``GenerateResponse`` ->
``GenerateChunk`` and tool calls. The gRPC
stub, servicer base class and registration function are re-exported from here so no other
module touches generated code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from splitserve_proto.splitserve.v1 import generate_pb2 as pb
from splitserve_proto.splitserve.v1 import generate_pb2_grpc as pb_grpc

from cluster.backend import MIGRATION_COUNT, MIGRATION_TIMING
from engine.structured import StructuredSpec
from router.chat import ChatMessage, ToolSpec
from router.errors import InvalidParamError
from router.tool_parsers import ToolCall, ToolParser
from router.types import (
    GenerateChunk,
    GenerateInput,
    LogprobEntry,
    ModelCard,
    ModelInfo,
    TopToken,
    Usage,
)

GenerationStub = pb_grpc.GenerationStub
GenerationServicer = pb_grpc.GenerationServicer
add_generation_servicer = pb_grpc.add_GenerationServicer_to_server
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Generation"].full_name

# Optional scalar fields of the SamplingParams message, mapped 1:1 to SamplingParams fields.
_SCALAR_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                    "ignore_eos", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "logprobs", "min_tokens", "prompt_logprobs")
_REPEATED_SAMPLING = ("stop", "stop_token_ids")
SAMPLING_FIELDS = _SCALAR_SAMPLING + _REPEATED_SAMPLING

_FINISH_TO_PROTO = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                    "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}
_TIMING_FIELDS = tuple(f.name for f in pb.Timing.DESCRIPTOR.fields)


def _timing_from_proto(timing: pb.Timing) -> dict[str, float]:
    """As the HTTP extension has it: migrations and migration only for a migrated request."""
    return {f: getattr(timing, f) for f in _TIMING_FIELDS
            if timing.migrations or f not in MIGRATION_TIMING}


# ---- server side -------------------------------------------------------------------------

def sampling_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """The fields the client set (proto3 presence), as SamplingParams keyword arguments
    (``n`` is the request's, not a SamplingParams field)."""
    out: dict[str, Any] = {name: getattr(msg, name) for name in _SCALAR_SAMPLING
                           if msg.HasField(name)}
    for name in _REPEATED_SAMPLING:
        values = list(getattr(msg, name))
        if values:
            out[name] = tuple(values)
    if msg.logit_bias:
        out["logit_bias"] = {b.token_id: b.bias for b in msg.logit_bias}
    if msg.HasField("structured"):
        out["structured"] = structured_from_proto(msg.structured)
    return out


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredSpec:
    """The spec, checked by the grammar engine now (INVALID_ARGUMENT naming the field)."""
    which = msg.WhichOneof("kind")
    if which is None:
        raise InvalidParamError("sampling.structured: set one kind", "structured")
    value: Any = getattr(msg, which)
    kind = which
    if which == "json_object":
        kind, value = "json_object", ""
    elif which == "choice":
        value = tuple(value.choices)
    try:
        return StructuredSpec(kind, value)
    except ValueError as exc:
        raise InvalidParamError(f"sampling.structured: {exc}", "structured") from None


def tool_spec_from_proto(req: pb.GenerateRequest) -> ToolSpec | None:
    """A chat request's checked tools and tool choice (None for other prompts)."""
    if req.WhichOneof("prompt") != "chat":
        return None
    chat = req.chat
    tools = [{"type": "function", "function": _function_from_proto(t)} for t in chat.tools]
    choice: Any = chat.tool_choice or None
    if chat.tool_choice_function:
        choice = {"type": "function", "function": {"name": chat.tool_choice_function}}
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else None
    return ToolSpec(tools, choice, parallel)


def _function_from_proto(tool: pb.Tool) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description:
        fn["description"] = tool.description
    if tool.parameters_json:
        try:
            fn["parameters"] = json.loads(tool.parameters_json)
        except json.JSONDecodeError:
            raise InvalidParamError(f"tools: {tool.name!r} parameters_json is not JSON",
                                    "tools") from None
    if tool.HasField("strict"):
        fn["strict"] = tool.strict
    return fn


def _messages_from_proto(chat: pb.ChatPrompt) -> list[dict[str, Any]]:
    messages = []
    for m in chat.messages:
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                 for c in m.tool_calls]
        messages.append(ChatMessage.model_validate({
            "role": m.role, "content": m.content, "name": m.name or None,
            "tool_calls": calls or None, "tool_call_id": m.tool_call_id or None}).as_dict())
    return messages


def _option(options: pb.OutputOptions, name: str, default: bool) -> bool:
    return getattr(options, name) if options.HasField(name) else default


def input_from_proto(req: pb.GenerateRequest, deadline: float | None,
                     tools: ToolSpec | None = None,
                     parser: ToolParser | None = None) -> GenerateInput:
    """A GenerateRequest as the service's GenerateInput (validation happens in the service);
    ``tools``: ``tool_spec_from_proto(req)`` for a chat; ``parser``: the server's tool-call
    parser (strict tools under "auto" are enforced in its format)."""
    which = req.WhichOneof("prompt")
    sampling = sampling_from_proto(req.sampling)
    forced = tools.structured(parser) if tools is not None else None
    if forced is not None:
        if "structured" in sampling:
            raise InvalidParamError("a required or named tool choice, and strict tools, are "
                                    "enforced with structured output: they cannot be "
                                    "combined with sampling.structured", "tool_choice")
        sampling["structured"] = forced
    return_text = _option(req.options, "return_text", True)
    if not return_text and tools is not None and tools.template_tools is not None:
        raise InvalidParamError("tool calls are parsed from the reply's text, so "
                                "options.return_text=false cannot be combined with tools; "
                                "return the text, or set tool_choice to \"none\"",
                                "options.return_text")
    return GenerateInput(
        model=req.model,
        prompt=req.text if which == "text" else None,
        prompt_token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        messages=_messages_from_proto(req.chat) if which == "chat" else None,
        tools=tools.template_tools if tools is not None else None,
        sampling=sampling,
        request_id=req.request_id,
        deadline=deadline,
        return_text=return_text,
        skip_special_tokens=_option(req.options, "skip_special_tokens", True),
        include_stop_str_in_output=_option(req.options, "include_stop_str_in_output", False),
        n=req.sampling.n if req.sampling.HasField("n") else 1,
    )


def wants_stream(req: pb.GenerateRequest) -> bool:
    return _option(req.options, "stream", True)


def _logprobs_to_proto(entries: list[LogprobEntry]) -> list[pb.TokenLogprob]:
    """Entries without a logprob (a prompt's first token) are left out."""
    return [pb.TokenLogprob(
        token_id=e.token_id, logprob=e.logprob, token=e.token, rank=e.rank,
        top=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token)
             for t in e.top],
    ) for e in entries if e.logprob is not None]


def chunk_to_proto(chunk: GenerateChunk,
                   tool_calls: list[ToolCall] | None = None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text,
        finish_reason=_FINISH_TO_PROTO[chunk.finish_reason], index=chunk.index,
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                    for c in tool_calls or ()])
    if chunk.logprobs:
        msg.logprobs.extend(_logprobs_to_proto(chunk.logprobs))
    if chunk.prompt_logprobs:
        msg.prompt_logprobs.extend(_logprobs_to_proto(chunk.prompt_logprobs))
    if isinstance(chunk.stop_reason, str):
        msg.stop_string = chunk.stop_reason
    elif isinstance(chunk.stop_reason, int):
        msg.stop_token_id = chunk.stop_reason
    if chunk.usage is not None:
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.usage.prompt_tokens,
                                    completion_tokens=chunk.usage.completion_tokens,
                                    cached_tokens=chunk.usage.cached_tokens))
    if chunk.timing is not None:
        msg.timing.CopyFrom(pb.Timing(**{k: int(v) if k == MIGRATION_COUNT else v
                                         for k, v in chunk.timing.items()
                                         if k in _TIMING_FIELDS}))
    return msg


def _card_to_proto(card: ModelCard) -> pb.ModelCard:
    return pb.ModelCard(id=card.id, owned_by=card.owned_by, created=card.created,
                        max_model_len=card.max_model_len)


def models_to_proto(cards: list[ModelCard]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[_card_to_proto(c) for c in cards])


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(card=_card_to_proto(info.card), vocab_size=info.vocab_size,
                                eos_token_ids=list(info.eos_token_ids), ready=info.ready)


def abort_to_proto(aborted: bool) -> pb.AbortResponse:
    return pb.AbortResponse(aborted=aborted)


# ---- client side -------------------------------------------------------------------------

def _sampling_message(fields: dict[str, Any]) -> pb.SamplingParams:
    """``pb.SamplingParams(**fields)``; a value its wire field cannot hold (a negative count
    in an unsigned field, a float where an int goes) is an INVALID_ARGUMENT naming it, as
    the server names what it refuses (protobuf's own error names no field)."""
    try:
        return pb.SamplingParams(**fields)
    except (ValueError, TypeError):
        for name, value in fields.items():
            try:
                pb.SamplingParams(**{name: value})
            except (ValueError, TypeError) as exc:
                raise InvalidParamError(f"SamplingParams.{name}={value!r} cannot be sent: "
                                        f"{exc}", name) from None
        raise


def build_request(prompt: str | list[int] | list[dict[str, Any]], *, model: str = "",
                  request_id: str = "", stream: bool = True, return_text: bool = True,
                  skip_special_tokens: bool = True,
                  sampling: Mapping[str, Any] | None = None,
                  tools: list[dict[str, Any]] | None = None,
                  tool_choice: str | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from a text, token-id or chat prompt (OpenAI-style message dicts,
    with OpenAI-style ``tools``; ``tool_choice`` "none" / "auto" / "required" or a function
    name) and SamplingParams keyword values (``structured``: a StructuredSpec,
    ``logit_bias``: {token id: bias})."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS) - {"logit_bias", "structured", "n"})
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                        f"known: {', '.join(SAMPLING_FIELDS)}, logit_bias, structured, n")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    structured = sampling.pop("structured", None)
    bias = sampling.pop("logit_bias", None) or {}
    msg = _sampling_message({k: v for k, v in sampling.items() if v is not None})
    msg.logit_bias.extend(pb.LogitBias(token_id=int(t), bias=float(b)) for t, b in
                          (bias.items() if isinstance(bias, Mapping) else bias))
    if structured is not None:
        msg.structured.CopyFrom(structured_to_proto(structured))
    req = pb.GenerateRequest(
        request_id=request_id, model=model, sampling=msg,
        options=pb.OutputOptions(stream=stream, return_text=return_text,
                                 skip_special_tokens=skip_special_tokens))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.CopyFrom(_chat_to_proto(prompt, tools or [], tool_choice))
    else:
        req.token_ids.ids.extend(prompt)
    return req


def structured_to_proto(spec: StructuredSpec) -> pb.StructuredOutput:
    if spec.kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    if spec.kind == "choice":
        return pb.StructuredOutput(choice=pb.Choices(choices=list(spec.spec)))
    return pb.StructuredOutput(**{spec.kind: spec.spec})


def _chat_to_proto(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                   tool_choice: str | None) -> pb.ChatPrompt:
    chat = pb.ChatPrompt(
        messages=[pb.ChatMessage(
            role=m["role"], content=m.get("content") or "", name=m.get("name") or "",
            tool_call_id=m.get("tool_call_id") or "",
            tool_calls=[pb.ToolCall(id=c["id"], name=c["function"]["name"],
                                    arguments=c["function"]["arguments"])
                        for c in m.get("tool_calls") or ()]) for m in messages],
        tools=[pb.Tool(name=t["function"]["name"],
                       description=t["function"].get("description", ""),
                       parameters_json=json.dumps(t["function"].get("parameters") or {}),
                       strict=t["function"].get("strict"))
               for t in tools])
    if tool_choice in ("none", "auto", "required"):
        chat.tool_choice = tool_choice
    elif tool_choice:
        chat.tool_choice_function = tool_choice
    return chat


def chunk_from_proto(msg: pb.GenerateResponse) -> GenerateChunk:
    which = msg.WhichOneof("stop_reason")
    final = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return GenerateChunk(
        request_id=msg.request_id,
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=_logprobs_from_proto(msg.logprobs),
        prompt_logprobs=_logprobs_from_proto(msg.prompt_logprobs),
        finish_reason=_FINISH_FROM_PROTO.get(msg.finish_reason, "stop"),
        stop_reason=getattr(msg, which) if which else None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens,
                    msg.usage.cached_tokens) if msg.HasField("usage") else None,
        timing=_timing_from_proto(msg.timing) if final else None,
        index=msg.index,
    )


def _logprobs_from_proto(entries) -> list[LogprobEntry] | None:
    return [LogprobEntry(e.token_id, e.logprob, e.token,
                         [TopToken(t.token_id, t.logprob, t.token) for t in e.top],
                         e.rank if e.HasField("rank") else None)
            for e in entries] or None


def tool_calls_from_proto(msg: pb.GenerateResponse) -> list[ToolCall]:
    return [ToolCall(c.name, c.arguments, c.id) for c in msg.tool_calls]


def model_card_from_proto(msg: pb.ModelCard) -> ModelCard:
    return ModelCard(msg.id, msg.owned_by, msg.created, msg.max_model_len)


def list_models_request() -> pb.ListModelsRequest:
    return pb.ListModelsRequest()


def model_info_request(model: str = "") -> pb.ModelInfoRequest:
    return pb.ModelInfoRequest(model=model)


def model_info_from_proto(msg: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(model_card_from_proto(msg.card), msg.vocab_size,
                     tuple(msg.eos_token_ids), msg.ready)


def abort_request(request_id: str) -> pb.AbortRequest:
    return pb.AbortRequest(request_id=request_id)
