"""Python clients for the splitserve gRPC API (sync and asyncio).

    with SplitServeClient("127.0.0.1:50051") as client:
        result = client.generate("Hello", max_tokens=32, temperature=0)
        for chunk in client.stream("Hello", max_tokens=32, stop=["."]):
            print(chunk.text, end="")

Sampling keywords are SamplingParams' field names. ``timeout`` (seconds) becomes the call's
deadline; the server aborts the request when it passes. Leaving a ``stream`` early cancels
the call, which aborts the request on the server. Failures raise the ``engine.errors`` class
of the status (InvalidRequestError, ResourceExhaustedError, UnavailableError, ...), with
``grpc_code`` set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from router import convert
from router.errors import error_from_grpc
from router.types import GenerateChunk, ModelCard, ModelInfo, merge_samples


def _request(prompt: str | list[int], model: str, request_id: str, stream: bool,
             sampling: dict[str, Any]):
    return convert.build_request(prompt, model=model, request_id=request_id, stream=stream,
                                 sampling=sampling)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class SplitServeClient:
    """Blocking client. ``address`` is "host:port"."""

    def __init__(self, address: str, *, model: str = "", timeout: float | None = None,
                 api_key: str | None = None) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout  # default deadline for every call, seconds
        self._metadata = _metadata(api_key)
        self._channel = grpc.insecure_channel(address)
        self._stub = convert.GenerationStub(self._channel)

    def generate(self, prompt: str | list[int], *, timeout: float | None = None,
                 request_id: str = "", **sampling: Any) -> GenerateChunk:
        """The whole completion as one chunk (text, token_ids, usage, timing...)."""
        return _single(self.samples(prompt, timeout=timeout, request_id=request_id,
                                    **sampling))

    def samples(self, prompt: str | list[int], *, timeout: float | None = None,
                request_id: str = "", **sampling: Any) -> list[GenerateChunk]:
        """Every sample of the completion (``n=`` of them), one merged chunk each, in
        sample order (``index``)."""
        req = _request(prompt, self.model, request_id, False, sampling)
        try:
            chunks = [convert.chunk_from_proto(r)
                      for r in self._stub.Generate(req, timeout=timeout or self.timeout,
                                                 metadata=self._metadata)]
        except grpc.RpcError as exc:
            raise error_from_grpc(exc.code(), exc.details()) from None
        return merge_samples(chunks)

    def stream(self, prompt: str | list[int], *, timeout: float | None = None,
               request_id: str = "", **sampling: Any) -> Iterator[GenerateChunk]:
        """Chunks as the server produces them; the last one has finish_reason set."""
        req = _request(prompt, self.model, request_id, True, sampling)
        call = self._stub.Generate(req, timeout=timeout or self.timeout,
                                   metadata=self._metadata)
        try:
            for response in call:
                yield convert.chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise error_from_grpc(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # no-op when finished; aborts the request when left early

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight request; False when the server does not know it (any more)."""
        return self._unary(self._stub.Abort, convert.abort_request(request_id)).aborted

    def list_models(self) -> list[ModelCard]:
        resp = self._unary(self._stub.ListModels, convert.list_models_request())
        return [convert.model_card_from_proto(m) for m in resp.models]

    def model_info(self, model: str = "") -> ModelInfo:
        resp = self._unary(self._stub.ModelInfo, convert.model_info_request(model))
        return convert.model_info_from_proto(resp)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (UnavailableError after ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise error_from_grpc(grpc.StatusCode.UNAVAILABLE,
                                  f"cannot reach a splitserve server at {self.address}") from None

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_grpc(exc.code(), exc.details()) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SplitServeClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncSplitServeClient:
    """asyncio client; create and use it inside one event loop."""

    def __init__(self, address: str, *, model: str = "", timeout: float | None = None,
                 api_key: str | None = None) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = convert.GenerationStub(self._channel)

    async def generate(self, prompt: str | list[int], *, timeout: float | None = None,
                       request_id: str = "", **sampling: Any) -> GenerateChunk:
        """The whole completion as one chunk (text, token_ids, usage, timing...)."""
        return _single(await self.samples(prompt, timeout=timeout, request_id=request_id,
                                          **sampling))

    async def samples(self, prompt: str | list[int], *, timeout: float | None = None,
                      request_id: str = "", **sampling: Any) -> list[GenerateChunk]:
        """Every sample of the completion (``n=`` of them), one merged chunk each."""
        chunks = [c async for c in self._call(prompt, timeout, request_id, False, sampling)]
        return merge_samples(chunks)

    def stream(self, prompt: str | list[int], *, timeout: float | None = None,
               request_id: str = "", **sampling: Any) -> AsyncIterator[GenerateChunk]:
        return self._call(prompt, timeout, request_id, True, sampling)

    async def _call(self, prompt, timeout, request_id, stream, sampling):
        req = _request(prompt, self.model, request_id, stream, sampling)
        call = self._stub.Generate(req, timeout=timeout or self.timeout,
                                   metadata=self._metadata)
        try:
            async for response in call:
                yield convert.chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise error_from_grpc(exc.code(), exc.details()) from None
        finally:
            call.cancel()

    async def abort(self, request_id: str) -> bool:
        resp = await self._unary(self._stub.Abort, convert.abort_request(request_id))
        return resp.aborted

    async def list_models(self) -> list[ModelCard]:
        resp = await self._unary(self._stub.ListModels, convert.list_models_request())
        return [convert.model_card_from_proto(m) for m in resp.models]

    async def model_info(self, model: str = "") -> ModelInfo:
        resp = await self._unary(self._stub.ModelInfo, convert.model_info_request(model))
        return convert.model_info_from_proto(resp)

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_grpc(exc.code(), exc.details()) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSplitServeClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


def _single(samples: list[GenerateChunk]) -> GenerateChunk:
    if len(samples) != 1:
        raise ValueError(f"the request has {len(samples)} samples (n > 1): use samples()")
    return samples[0]
