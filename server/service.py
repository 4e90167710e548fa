"""The `retd.v1.Decoder` service: validates requests, hands sequences to the model
engines, and turns their results into responses with clear gRPC statuses.

Every RPC serves both kinds of model: a generative one (`ret`) generates, a phrase bank
(`phrase_bank`) returns its nearest phrases. A hybrid Decode asks a bank first and a
generative model when the bank's phrase is not similar enough."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from retd.server.calls import rpc
from retd.server.config import DecodeDefaults, ServiceLimits
from retd.server.engine import SequenceRequest, ServingEngine
from retd.server.gate import CallGate
from retd.server.handles import SequenceResult
from retd.server.hybrid import HybridDecoder
from retd.server.repository import ModelRegistry
from retd.server.responses import decode_response, generate_response, last_chunk, model_info
from retd.server.streams import ItemDecoder
from retd.server.telemetry import Telemetry
from retd.server.validation import DecodeOptions
from retd.server.versions import ModelVersion
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
        pinned_defaults: frozenset[str] = frozenset(),
    ) -> None:
        """`decode_defaults`: Decode's loop breakers when a request sets none; those not in
        `pinned_defaults` (set explicitly by the operator) give way to what a checkpoint's
        card recommends for it."""
        self.models = models
        self._limits = limits or ServiceLimits()
        self._decode_defaults = decode_defaults or DecodeDefaults()
        self._pinned_defaults = pinned_defaults
        self.gate = gate or CallGate()
        self.telemetry = telemetry or Telemetry()
        self.hybrid = HybridDecoder(
            models, self._run, self._limits.max_new_tokens_limit, self.decode_defaults
        )
        self.items = ItemDecoder(
            self.service_name, models, self._limits, self.gate, self.telemetry, self.hybrid,
            self._decode_request, self._run,
        )  # fmt: skip

    def _decode_request(
        self,
        served: ModelVersion,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        deadline: float | None,
    ) -> SequenceRequest:
        engine = served.ready_engine
        return engine.build_request(
            embedding, field, options, self.decode_defaults(engine), deadline,
            self._limits.max_new_tokens_limit,
        )  # fmt: skip

    def decode_defaults(self, engine: ServingEngine) -> DecodeDefaults:
        """The loop breakers a Decode to `engine`'s model gets when it sets none."""
        return self._decode_defaults.for_card(engine.description.card, self._pinned_defaults)

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

    @rpc
    async def DecodeBatch(
        self, request: pb.DecodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeBatchResponse:
        return await self.items.batch(request, deadline_of(context))

    @rpc
    async def DecodeStream(
        self,
        request_iterator: AsyncIterator[pb.DecodeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        answers = self.items.stream(request_iterator, deadline_of(context))
        async with contextlib.aclosing(answers):
            async for response in answers:
                yield response

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
