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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from retd.model.checkpoint import PHRASE_BANK_KIND, RET_KIND
from retd.model.generation import SamplingParams
from retd.server.calls import Unparseable, abort, rpc
from retd.server.config import DecodeDefaults, ServiceLimits
from retd.server.engine import Engine, SequenceRequest, SequenceResult
from retd.server.errors import ErrorKind, ServeError, invalid
from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.repository import ModelRegistry, ModelVersion
from retd.server.responses import (
    decode_response,
    generate_response,
    item_error,
    last_chunk,
    model_info,
)
from retd.server.telemetry import Telemetry
from retd.server.validation import (
    ModelLimits,
    greedy_params,
    loop_breakers,
    parse_bank_generate,
    parse_embedding,
    parse_generate,
    parse_min_similarity,
    parse_query,
    shorten,
)
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DECODER_SERVICE = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
# A phrase bank's sequences: one step, no token generated.
BANK_PARAMS = SamplingParams(max_new_tokens=1)


class DecodeOptions(Protocol):
    """What a Decode, a DecodeBatch and a DecodeStream item say about decoding."""

    model: str
    version: int
    max_new_tokens: int
    priority: int
    no_repeat_ngram_size: int
    repetition_penalty: float
    repetition_ngram_size: int

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 (protobuf's name)


def hybrid_of(
    request: pb.DecodeRequest | pb.DecodeBatchRequest | pb.DecodeStreamRequest,
) -> pb.Hybrid | None:
    """The request's hybrid settings when it asks for hybrid decoding."""
    return request.hybrid if request.HasField("hybrid") else None


def model_limits(engine: Engine, max_new_tokens_limit: int = 0) -> ModelLimits:
    model = engine.description
    encoder = model.encoder or "sentence encoder"
    if 0 < max_new_tokens_limit < model.max_length:
        return ModelLimits(
            engine.name,
            model.embedding_dim,
            max_new_tokens_limit,
            encoder,
            "the server's max_new_tokens_limit",
        )
    return ModelLimits(engine.name, model.embedding_dim, model.max_length, encoder)


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

    @contextlib.contextmanager
    def _hybrid_models(
        self, options: DecodeOptions, hybrid: pb.Hybrid
    ) -> Iterator[tuple[ModelVersion, ModelVersion]]:
        """(the generative model, the phrase bank) a hybrid Decode names, checked and leased."""
        name = hybrid.phrase_bank
        banks = self.models.names(PHRASE_BANK_KIND)
        if not name:
            raise invalid(
                f"hybrid.phrase_bank: empty; expected a phrase_bank model, one of {banks}"
            )
        with contextlib.ExitStack() as leases:
            generator = leases.enter_context(self.models.lease(options.model, options.version))
            try:
                bank = leases.enter_context(self.models.lease(name))
            except ServeError as error:
                if error.kind is ErrorKind.NOT_FOUND:
                    raise ServeError(
                        error.kind,
                        f"hybrid.phrase_bank: {shorten(name)!r} is not loaded; expected a "
                        f"phrase_bank model, one of {banks}",
                    ) from None
                raise ServeError(error.kind, f"hybrid.phrase_bank: {error.message}") from None
            self._check_hybrid(generator, bank, banks)
            yield generator, bank

    def _check_hybrid(self, generator: ModelVersion, bank: ModelVersion, banks: list[str]) -> None:
        if bank.kind != PHRASE_BANK_KIND:
            raise invalid(
                f"hybrid.phrase_bank: {bank.name!r} is a {bank.kind!r} model; expected a "
                f"phrase_bank model, one of {banks}"
            )
        if generator.kind != RET_KIND:
            raise invalid(
                f"model: {generator.name!r} is a {generator.kind!r} model; hybrid decoding falls "
                f"back to a generative ({RET_KIND!r}) model, one of {self.models.names(RET_KIND)}"
            )
        ours, theirs = bank.ready_engine.description, generator.ready_engine.description
        if (ours.encoder, ours.embedding_dim) != (theirs.encoder, theirs.embedding_dim):
            raise invalid(
                f"hybrid.phrase_bank: {bank.name!r} holds {ours.encoder} embeddings "
                f"({ours.embedding_dim} values) but model {generator.name!r} decodes "
                f"{theirs.encoder} ones ({theirs.embedding_dim}); both must read the same "
                "encoder's embeddings"
            )

    def _decode_sequence(
        self,
        engine: Engine,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        deadline: float | None,
    ) -> SequenceRequest:
        """A Decode (or an item of a batch or stream) for `engine`, checked. A phrase bank
        returns its phrase whole: max_new_tokens and the loop breakers do not apply to it
        (the latter are checked all the same)."""
        limits = model_limits(engine, self._limits.max_new_tokens_limit)
        priority = options.priority
        if engine.kind == PHRASE_BANK_KIND:
            query = parse_query(embedding, field, limits)
            loop_breakers(options, self._decode_defaults)
            return SequenceRequest(query, BANK_PARAMS, 0, deadline=deadline, priority=priority)
        return SequenceRequest(
            embedding=parse_embedding(embedding, field, limits),
            params=greedy_params(
                options.max_new_tokens, "max_new_tokens", limits, options, self._decode_defaults
            ),
            seed=0,
            deadline=deadline,
            priority=priority,
        )

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

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
        try:
            if request.HasField("hybrid"):
                return await self._hybrid_decode(
                    request, request.hybrid, request.embedding, "embedding",
                    self._deadline(context), received_at,
                )  # fmt: skip
            with self.models.lease(request.model, request.version) as served:
                sequence = self._decode_sequence(
                    served.ready_engine, request.embedding, "embedding", request,
                    self._deadline(context),
                )  # fmt: skip
                result = await self._run(served, sequence)
        except ServeError as error:
            await abort(context, error)
        return decode_response(result, served, received_at)

    async def _hybrid_decode(
        self,
        options: DecodeOptions,
        hybrid: pb.Hybrid,
        embedding: pb.Embedding,
        field: str,
        deadline: float | None,
        received_at: float,
    ) -> pb.DecodeResponse:
        """The bank's nearest phrase when its similarity reaches min_similarity, else the
        generative model's text. Everything is checked before the bank is asked."""
        with self._hybrid_models(options, hybrid) as (generator, bank):
            min_similarity = parse_min_similarity(hybrid)
            limits = model_limits(generator.ready_engine, self._limits.max_new_tokens_limit)
            query = parse_query(embedding, field, limits)
            params = greedy_params(
                options.max_new_tokens, "max_new_tokens", limits, options, self._decode_defaults
            )
            priority = options.priority
            found = await self._run(
                bank, SequenceRequest(query, BANK_PARAMS, 0, deadline=deadline, priority=priority)
            )
            similarity = found.candidates[0].score
            if similarity >= min_similarity:
                return decode_response(found, bank, received_at)
            generated = await self._run(
                generator, SequenceRequest(query, params, 0, deadline=deadline, priority=priority)
            )
            return decode_response(generated, generator, received_at, similarity, earlier=[found])

    def _generate_request(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        engine: Engine,
        stream: bool,
    ) -> SequenceRequest:
        limits = model_limits(engine, self._limits.max_new_tokens_limit)
        if engine.kind == PHRASE_BANK_KIND:
            query = parse_query(request.embedding, "embedding", limits)
            candidates, seed = parse_bank_generate(request)
            return SequenceRequest(
                query,
                BANK_PARAMS,
                seed,
                stream=stream,
                deadline=self._deadline(context),
                priority=request.priority,
                candidates=candidates,
            )
        embedding = parse_embedding(request.embedding, "embedding", limits)
        params, seed = parse_generate(request, limits)
        return SequenceRequest(
            embedding,
            params,
            seed,
            stream=stream,
            deadline=self._deadline(context),
            priority=request.priority,
        )

    @rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        received_at = time.monotonic()
        try:
            with self.models.lease(request.model, request.version) as served:
                sequence = self._generate_request(
                    request, context, served.ready_engine, stream=False
                )
                result = await self._run(served, sequence)
        except ServeError as error:
            await abort(context, error)
        return generate_response(result, served, received_at)

    @rpc
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        received_at = time.monotonic()
        with contextlib.ExitStack() as lease:
            try:
                served = lease.enter_context(self.models.lease(request.model, request.version))
                sequence = self._generate_request(
                    request, context, served.ready_engine, stream=True
                )
                handle = served.ready_engine.submit(sequence)
            except ServeError as error:
                await abort(context, error)
            try:
                async for event in handle.events():
                    if isinstance(event, SequenceResult):
                        self.telemetry.record_sequence(served, sequence, event)
                        yield last_chunk(event, served, received_at)
                    else:
                        yield pb.GenerateChunk(text=event.text, token_ids=event.token_ids)
            except ServeError as error:
                await abort(context, error)
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
                answer = await self._hybrid_decode(
                    options, hybrid, embedding, field, deadline, received_at
                )
                return answer, None
            with served_by() as served:
                sequence = self._decode_sequence(
                    served.ready_engine, embedding, field, options, deadline
                )
                result = await self._run(served, sequence)
        except ServeError as error:
            return None, item_error(error)
        return decode_response(result, served, received_at), None

    @rpc
    async def DecodeBatch(
        self, request: pb.DecodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeBatchResponse:
        if not request.embeddings:
            await abort(
                context,
                invalid("embeddings: empty; expected at least one embedding"),
            )
        if len(request.embeddings) > self._limits.max_batch_items:
            await abort(
                context,
                invalid(
                    f"embeddings: {len(request.embeddings)} items exceed the server's "
                    f"max_batch_items {self._limits.max_batch_items}; split the batch",
                ),
            )
        with contextlib.ExitStack() as lease:
            try:  # one version serves the whole batch; an unknown model fails the call
                served = lease.enter_context(self.models.lease(request.model, request.version))
            except ServeError as error:
                await abort(context, error)
            deadline = self._deadline(context)
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
        deadline = self._deadline(context)
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
                await abort(
                    context,
                    invalid(
                        f"request stream: an item could not be read ({exc}); "
                        "the items before it were answered"
                    ),
                )
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
        try:
            with self.models.lease(request.model, request.version) as served:
                serving = served.version == self.models.serving_version(served.name)
                return model_info(served, serving)
        except ServeError as error:
            await abort(context, error)


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
