"""The `retd.v1.Decoder` service: validates requests, hands sequences to the model
engines, and turns their results into responses with clear gRPC statuses.

Every RPC serves both kinds of model: a generative one (`ret`) generates, a phrase bank
(`phrase_bank`) returns its nearest phrases. A hybrid Decode asks a bank first and a
generative model when the bank's phrase is not similar enough."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from retd.server.calls import Unparseable, rpc
from retd.server.config import DecodeDefaults, ServiceLimits
from retd.server.engine import SequenceRequest, SequenceResult
from retd.server.errors import ErrorKind, ServeError, invalid
from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.hybrid import HybridDecoder, hybrid_of
from retd.server.repository import ModelRegistry, ModelVersion
from retd.server.responses import (
    decode_response,
    generate_response,
    item_error,
    last_chunk,
    model_info,
)
from retd.server.telemetry import Telemetry
from retd.server.validation import DecodeOptions
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DECODER_SERVICE = pb.DESCRIPTOR.services_by_name["Decoder"].full_name


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """When the call's deadline passes, on the monotonic clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class DecoderService(pb_grpc.DecoderServicer):
    """Serves every loaded model; requests naming no model go to the registry's default."""

    service_name = DECODER_SERVICE

    def __init__(
        self,
        models: ModelRegistry,
        telemetry: Telemetry | None = None,
        limits: ServiceLimits | None = None,
        gate: CallGate | None = None,
        decode_defaults: DecodeDefaults | None = None,
    ) -> None:
        self.models = models
        self._limits = limits or ServiceLimits()
        self._decode_defaults = decode_defaults or DecodeDefaults()
        self.gate = gate or CallGate()
        self.telemetry = telemetry or Telemetry()
        self.hybrid = HybridDecoder(
            models, self._run, self._limits.max_new_tokens_limit, self._decode_defaults
        )

    def _decode_request(
        self,
        served: ModelVersion,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        deadline: float | None,
    ) -> SequenceRequest:
        return served.ready_engine.build_request(
            embedding, field, options, self._decode_defaults, deadline,
            self._limits.max_new_tokens_limit,
        )  # fmt: skip

    def _generate_request(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        served: ModelVersion,
        stream: bool,
    ) -> SequenceRequest:
        limit = self._limits.max_new_tokens_limit
        return served.ready_engine.build_generate_request(
            request, stream, deadline_of(context), limit
        )

    async def _run(self, served: ModelVersion, request: SequenceRequest) -> SequenceResult:
        handle = served.ready_engine.submit(request)
        try:
            result = await handle.result()
        finally:
            handle.cancel()  # the caller left (task cancelled) or it is done: free its slot
        self.telemetry.record_sequence(served, request, result)
        return result

    @rpc
    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeResponse:
        received_at = time.monotonic()
        if request.HasField("hybrid"):
            return await self.hybrid.decode(
                request, request.hybrid, request.embedding, "embedding",
                deadline_of(context), received_at,
            )  # fmt: skip
        with self.models.lease(request.model, request.version) as served:
            sequence = self._decode_request(
                served, request.embedding, "embedding", request, deadline_of(context)
            )
            result = await self._run(served, sequence)
        return decode_response(result, served, received_at)

    @rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        received_at = time.monotonic()
        with self.models.lease(request.model, request.version) as served:
            sequence = self._generate_request(request, context, served, stream=False)
            result = await self._run(served, sequence)
        return generate_response(result, served, received_at)

    @rpc
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        received_at = time.monotonic()
        with self.models.lease(request.model, request.version) as served:
            sequence = self._generate_request(request, context, served, stream=True)
            handle = served.ready_engine.submit(sequence)
            try:
                async for event in handle.events():
                    if isinstance(event, SequenceResult):
                        self.telemetry.record_sequence(served, sequence, event)
                        yield last_chunk(event, served, received_at)
                    else:
                        yield pb.GenerateChunk(text=event.text, token_ids=event.token_ids)
            finally:
                handle.cancel()

    async def _decode_item(
        self,
        served_by: Callable[[], ContextManager[ModelVersion]],
        embedding: pb.Embedding,
        options: DecodeOptions,
        field: str,
        deadline: float | None,
        item: str,
        method: str,
        hybrid: pb.Hybrid | None = None,
    ) -> tuple[pb.DecodeResponse | None, pb.ItemError | None]:
        """One item of a batch or stream, in a span of its own: its response, or its error.
        `served_by` leases the model version that serves it (with `hybrid`, the item leases
        its bank and its generative model itself)."""
        with self.telemetry.item_span(f"{self.service_name}/{method} item", item) as span:
            response, error = await self._decode_one(
                served_by, embedding, options, field, deadline, hybrid
            )
            if error is not None:
                self.telemetry.item_failed(span, error.code_name, error.message)
            return response, error

    async def _decode_one(
        self,
        served_by: Callable[[], ContextManager[ModelVersion]],
        embedding: pb.Embedding,
        options: DecodeOptions,
        field: str,
        deadline: float | None,
        hybrid: pb.Hybrid | None,
    ) -> tuple[pb.DecodeResponse | None, pb.ItemError | None]:
        received_at = time.monotonic()
        if not self.gate.open:  # an item sent on a stream after shutdown began
            return None, item_error(ServeError(ErrorKind.UNAVAILABLE, SHUTTING_DOWN))
        try:
            if hybrid is not None:
                answer = await self.hybrid.decode(
                    options, hybrid, embedding, field, deadline, received_at
                )
                return answer, None
            with served_by() as served:
                sequence = self._decode_request(served, embedding, field, options, deadline)
                result = await self._run(served, sequence)
        except ServeError as error:
            return None, item_error(error)
        return decode_response(result, served, received_at), None

    @rpc
    async def DecodeBatch(
        self, request: pb.DecodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeBatchResponse:
        if not request.embeddings:
            raise invalid("embeddings: empty; expected at least one embedding")
        if len(request.embeddings) > self._limits.max_batch_items:
            raise invalid(
                f"embeddings: {len(request.embeddings)} items exceed the server's "
                f"max_batch_items {self._limits.max_batch_items}; split the batch",
            )
        # one version serves the whole batch; an unknown model fails the call
        with self.models.lease(request.model, request.version) as served:
            deadline = deadline_of(context)
            outcomes = await asyncio.gather(
                *(
                    self._decode_item(
                        lambda: contextlib.nullcontext(served),
                        embedding,
                        request,
                        f"embeddings[{i}]",
                        deadline,
                        str(i),
                        "DecodeBatch",
                        hybrid_of(request),
                    )
                    for i, embedding in enumerate(request.embeddings)
                )
            )
        return pb.DecodeBatchResponse(
            results=[pb.DecodeBatchResult(response=ok, error=err) for ok, err in outcomes]
        )

    @rpc
    async def DecodeStream(
        self,
        request_iterator: AsyncIterator[pb.DecodeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        answers: asyncio.Queue[pb.DecodeStreamResponse | None] = asyncio.Queue()
        deadline = deadline_of(context)
        pending: set[asyncio.Task[None]] = set()

        async def answer(item: pb.DecodeStreamRequest) -> None:
            ok, err = await self._decode_item(
                functools.partial(self.models.lease, item.model, item.version),
                item.embedding,
                item,
                "embedding",
                deadline,
                item.id,
                "DecodeStream",
                hybrid_of(item),
            )
            answers.put_nowait(pb.DecodeStreamResponse(id=item.id, response=ok, error=err))

        async def read_requests() -> None:
            count = 0
            async for item in request_iterator:
                count += 1
                if isinstance(item, Unparseable):
                    error = item_error(invalid(item.message))
                    answers.put_nowait(pb.DecodeStreamResponse(error=error))
                    continue
                if count > self._limits.max_stream_items:
                    error = item_error(
                        ServeError(
                            ErrorKind.EXHAUSTED,
                            f"this DecodeStream passed the server's max_stream_items "
                            f"{self._limits.max_stream_items}; open a new stream",
                        )
                    )
                    answers.put_nowait(pb.DecodeStreamResponse(id=item.id, error=error))
                    continue
                task = asyncio.create_task(answer(item))
                pending.add(task)
                task.add_done_callback(pending.discard)

        async def read_then_finish() -> None:
            """Read every item, wait for their answers, then end the response stream,
            also when reading fails (an unparseable message): the call never hangs."""
            try:
                await read_requests()
            finally:
                if pending:
                    await asyncio.gather(*list(pending), return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read_then_finish())
        try:
            while (response := await answers.get()) is not None:
                yield response
            try:
                await reader  # a failure to read the request stream
            except Exception as exc:
                raise invalid(
                    f"request stream: an item could not be read ({exc}); "
                    "the items before it were answered"
                ) from exc
        finally:
            for task in [reader, *pending]:
                task.cancel()

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                model_info(served, served.version == self.models.serving_version(served.name))
                for served in self.models.ready()
            ],
            default_model=self.models.default_model,
        )

    @rpc
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        with self.models.lease(request.model, request.version) as served:
            return model_info(served, served.version == self.models.serving_version(served.name))


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Unparseable(message_class.DESCRIPTOR.full_name, str(exc) or "malformed")

    return parse


def add_service(
    servicer: Any, server: grpc.aio.Server, module: Any, service: str = "Decoder"
) -> None:
    """Register `service`'s methods of the generated `module` (as its generated
    `add_<Service>Servicer_to_server` does) with request parsers that hand unparseable
    messages to the handlers."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_class = getattr(module, method.input_type.name)
        response_class = getattr(module, method.output_type.name)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
