"""Protobuf <-> router dataclasses. The only module that imports generated ``*_pb2`` code.

Server side: ``GenerateRequest`` -> ``GenerateInput``, ``GenerateChunk`` -> ``GenerateResponse``,
model cards and info. Client side: keyword sampling arguments -> ``GenerateRequest``,
``GenerateResponse`` -> ``GenerateChunk``. The gRPC stub, servicer base class and registration
function are re-exported from here so no other module touches generated code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitserve_proto.splitserve.v1 import generate_pb2 as pb
from splitserve_proto.splitserve.v1 import generate_pb2_grpc as pb_grpc

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
                    "repetition_penalty", "logprobs", "min_tokens")
_REPEATED_SAMPLING = ("stop", "stop_token_ids")
SAMPLING_FIELDS = _SCALAR_SAMPLING + _REPEATED_SAMPLING

_FINISH_TO_PROTO = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                    "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}
_TIMING_FIELDS = tuple(f.name for f in pb.Timing.DESCRIPTOR.fields)


# ---- server side -------------------------------------------------------------------------

def sampling_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """The fields the client set (proto3 presence), as SamplingParams keyword arguments."""
    out: dict[str, Any] = {name: getattr(msg, name) for name in _SCALAR_SAMPLING
                           if msg.HasField(name)}
    for name in _REPEATED_SAMPLING:
        values = list(getattr(msg, name))
        if values:
            out[name] = tuple(values)
    return out


def _option(options: pb.OutputOptions, name: str, default: bool) -> bool:
    return getattr(options, name) if options.HasField(name) else default


def input_from_proto(req: pb.GenerateRequest, deadline: float | None) -> GenerateInput:
    """A GenerateRequest as the service's GenerateInput (validation happens in the service)."""
    which = req.WhichOneof("prompt")
    return GenerateInput(
        model=req.model,
        prompt=req.text if which == "text" else None,
        prompt_token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        sampling=sampling_from_proto(req.sampling),
        request_id=req.request_id,
        deadline=deadline,
        return_text=_option(req.options, "return_text", True),
        skip_special_tokens=_option(req.options, "skip_special_tokens", True),
    )


def wants_stream(req: pb.GenerateRequest) -> bool:
    return _option(req.options, "stream", True)


def _logprobs_to_proto(entries: list[LogprobEntry]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(
        token_id=e.token_id, logprob=e.logprob, token=e.token,
        top=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token)
             for t in e.top],
    ) for e in entries]


def chunk_to_proto(chunk: GenerateChunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text,
        finish_reason=_FINISH_TO_PROTO[chunk.finish_reason])
    if chunk.logprobs:
        msg.logprobs.extend(_logprobs_to_proto(chunk.logprobs))
    if isinstance(chunk.stop_reason, str):
        msg.stop_string = chunk.stop_reason
    elif isinstance(chunk.stop_reason, int):
        msg.stop_token_id = chunk.stop_reason
    if chunk.usage is not None:
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.usage.prompt_tokens,
                                    completion_tokens=chunk.usage.completion_tokens,
                                    cached_tokens=chunk.usage.cached_tokens))
    if chunk.timing is not None:
        msg.timing.CopyFrom(pb.Timing(**{k: v for k, v in chunk.timing.items()
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

def build_request(prompt: str | list[int], *, model: str = "", request_id: str = "",
                  stream: bool = True, return_text: bool = True,
                  skip_special_tokens: bool = True,
                  sampling: Mapping[str, Any] | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from a text or token-id prompt and SamplingParams keyword values."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                        f"known: {', '.join(SAMPLING_FIELDS)}")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    msg = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    req = pb.GenerateRequest(
        request_id=request_id, model=model, sampling=msg,
        options=pb.OutputOptions(stream=stream, return_text=return_text,
                                 skip_special_tokens=skip_special_tokens))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def chunk_from_proto(msg: pb.GenerateResponse) -> GenerateChunk:
    which = msg.WhichOneof("stop_reason")
    final = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return GenerateChunk(
        request_id=msg.request_id,
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=[LogprobEntry(e.token_id, e.logprob, e.token,
                               [TopToken(t.token_id, t.logprob, t.token) for t in e.top])
                  for e in msg.logprobs] or None,
        finish_reason=_FINISH_FROM_PROTO.get(msg.finish_reason, "stop"),
        stop_reason=getattr(msg, which) if which else None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens,
                    msg.usage.cached_tokens) if msg.HasField("usage") else None,
        timing={f: getattr(msg.timing, f) for f in _TIMING_FIELDS} if final else None,
    )


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
