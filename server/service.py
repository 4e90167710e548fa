"""The `retd.v1.Decoder` service: validates requests, hands sequences to the model
engines, and turns their results into responses with clear gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from retd.model.generation import FinishReason
from retd.server.calls import Unparseable, rpc
from retd.server.engine import ModelEngine, SequenceError, SequenceRequest, SequenceResult
from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.telemetry import Telemetry
from retd.server.validation import (
    ModelLimits,
    RequestError,
    greedy_params,
    parse_embedding,
    parse_generate,
)
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}
DECODER_SERVICE = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


@dataclass(frozen=True)
class ServiceLimits:
    """Per-call limits that protect the process (0 = no server-wide cap)."""

    max_batch_items: int = 1024
    max_stream_items: int = 100_000
    max_new_tokens_limit: int = 0


def model_limits(engine: ModelEngine, max_new_tokens_limit: int = 0) -> ModelLimits:
    config = engine.loaded.config
    encoder = engine.loaded.card.get("encoder", {}).get("name", "sentence encoder")
    if 0 < max_new_tokens_limit < config.max_length:
        return ModelLimits(
            engine.name,
            config.embedding_dim,
            max_new_tokens_limit,
            encoder,
            "the server's max_new_tokens_limit",
        )
    return ModelLimits(engine.name, config.embedding_dim, config.max_length, encoder)


def model_info(engine: ModelEngine) -> pb.ModelInfo:
    loaded = engine.loaded
    config = loaded.config
    card = struct_pb2.Struct()
    card.update(_json_safe(loaded.card))
    stats = engine.stats()
    return pb.ModelInfo(
        name=engine.name,
        version=loaded.version,
        architecture=loaded.architecture,
        parameter_count=loaded.model.num_parameters(),
        embedding_dim=config.embedding_dim,
        vocab_size=config.vocab_size,
        max_length=config.max_length,
        dtype=DTYPE_NAMES.get(str(engine.dtype), str(engine.dtype)),
        device=str(engine.device),
        checkpoint_sha256=loaded.sha256,
        card=card,
        trained=loaded.trained,
        encoder=str(loaded.card.get("encoder", {}).get("name", "")),
        load=pb.ModelLoad(
            waiting=stats.waiting,
            max_queue_size=engine.scheduler_config.max_queue_size,
            running=stats.running,
            max_batch_size=engine.scheduler_config.max_batch_size,
            batching=engine.scheduler_config.policy,
            max_wait_ms=engine.scheduler_config.max_wait_ms,
        ),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _timing(result: SequenceResult, received_at: float) -> pb.Timing:
    return pb.Timing(
        queue_ms=result.queue_s * 1e3,
        compute_ms=result.compute_s * 1e3,
        total_ms=(time.monotonic() - received_at) * 1e3,
    )


def _generation_summary(result: SequenceResult, model: str, received_at: float) -> dict[str, Any]:
    """The fields a GenerateResponse and a stream's last GenerateChunk share."""
    return {
        "finish_reason": FINISH_REASONS[result.finish_reason],
        "usage": pb.Usage(generated_tokens=len(result.token_ids)),
        "timing": _timing(result, received_at),
        "mean_logprob": result.mean_logprob,
        "model": model,
        "seed": result.seed,
    }


def _decode_response(result: SequenceResult, model: str, received_at: float) -> pb.DecodeResponse:
    return pb.DecodeResponse(
        text=result.text,
        finish_reason=FINISH_REASONS[result.finish_reason],
        usage=pb.Usage(generated_tokens=len(result.token_ids)),
        timing=_timing(result, received_at),
        model=model,
    )


def _shorten(text: str, limit: int = 80) -> str:
    """Caller-chosen text quoted in a message, cut so the status stays small."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _item_error(code: grpc.StatusCode, message: str) -> pb.ItemError:
    return pb.ItemError(code=code.value[0], code_name=code.name, message=message)


async def _abort(
    context: grpc.aio.ServicerContext, error: RequestError | SequenceError
) -> NoReturn:
    await context.abort(error.code, error.message)
    raise AssertionError("context.abort raises")


class DecoderService(pb_grpc.DecoderServicer):
    """Serves every loaded model; requests naming no model go to `default_model`."""

    service_name = DECODER_SERVICE

    def __init__(
        self,
        engines: Mapping[str, ModelEngine],
        default_model: str,
        telemetry: Telemetry | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        self._engines = dict(engines)
        self._limits = limits or ServiceLimits()
        self._default_model = default_model
        self.gate = CallGate()
        self.telemetry = telemetry or Telemetry()
        self.host = "127.0.0.1"  # set once the server is bound
        self.port = 0

    def _engine(self, name: str) -> ModelEngine:
        engine = self._engines.get(name or self._default_model)
        if engine is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model: {_shorten(name)!r} is not loaded; expected one of {sorted(self._engines)}",
            )
        return engine

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _run(self, engine: ModelEngine, request: SequenceRequest) -> SequenceResult:
        handle = engine.submit(request)
        try:
            result = await handle.result()
        finally:
            handle.cancel()  # the caller left (task cancelled) or it is done: free its slot
        self._record(engine, request, result)
        return result

    def _record(
        self, engine: ModelEngine, request: SequenceRequest, result: SequenceResult
    ) -> None:
        """The finished sequence into the current span (the call's, or its item's)."""
        params = request.params
        self.telemetry.record_sequence(
            trace.get_current_span(),
            engine,
            result,
            {
                "gen_ai.request.max_tokens": params.max_new_tokens,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_k": params.top_k or None,
                "gen_ai.request.top_p": params.top_p,
                "gen_ai.request.seed": request.seed if not params.greedy else None,
                "retd.priority": request.priority,
            },
        )

    @rpc
    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeResponse:
        received_at = time.monotonic()
        try:
            engine = self._engine(request.model)
            limits = model_limits(engine, self._limits.max_new_tokens_limit)
            sequence = SequenceRequest(
                embedding=parse_embedding(request.embedding, "embedding", limits),
                params=greedy_params(request.max_new_tokens, "max_new_tokens", limits),
                seed=0,
                deadline=self._deadline(context),
                priority=request.priority,
            )
            result = await self._run(engine, sequence)
        except (RequestError, SequenceError) as error:
            await _abort(context, error)
        return _decode_response(result, engine.name, received_at)

    async def _generate_request(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool
    ) -> tuple[ModelEngine, SequenceRequest]:
        engine = self._engine(request.model)
        limits = model_limits(engine, self._limits.max_new_tokens_limit)
        embedding = parse_embedding(request.embedding, "embedding", limits)
        params, seed = parse_generate(request, limits)
        return engine, SequenceRequest(
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
            engine, sequence = await self._generate_request(request, context, stream=False)
            result = await self._run(engine, sequence)
        except (RequestError, SequenceError) as error:
            await _abort(context, error)
        return pb.GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            **_generation_summary(result, engine.name, received_at),
        )

    @rpc
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        received_at = time.monotonic()
        try:
            engine, sequence = await self._generate_request(request, context, stream=True)
            handle = engine.submit(sequence)
        except (RequestError, SequenceError) as error:
            await _abort(context, error)
        try:
            async for event in handle.events():
                if isinstance(event, SequenceResult):
                    self._record(engine, sequence, event)
                    yield pb.GenerateChunk(
                        text=event.tail_text,
                        token_ids=event.tail_token_ids,
                        **_generation_summary(event, engine.name, received_at),
                    )
                else:
                    yield pb.GenerateChunk(text=event.text, token_ids=event.token_ids)
        except SequenceError as error:
            await _abort(context, error)
        finally:
            handle.cancel()

    async def _decode_item(
        self,
        model: str,
        embedding: pb.Embedding,
        max_new_tokens: int,
        field: str,
        deadline: float | None,
        priority: int,
        item: str,
        method: str,
    ) -> tuple[pb.DecodeResponse | None, pb.ItemError | None]:
        """One item of a batch or stream, in a span of its own: its response, or its error."""
        with self.telemetry.item_span(f"{self.service_name}/{method} item", item) as span:
            response, error = await self._decode_one(
                model, embedding, max_new_tokens, field, deadline, priority
            )
            if error is not None and span.is_recording():
                span.set_status(Status(StatusCode.ERROR, f"{error.code_name}: {error.message}"))
            return response, error

    async def _decode_one(
        self,
        model: str,
        embedding: pb.Embedding,
        max_new_tokens: int,
        field: str,
        deadline: float | None,
        priority: int,
    ) -> tuple[pb.DecodeResponse | None, pb.ItemError | None]:
        received_at = time.monotonic()
        if not self.gate.open:  # an item sent on a stream after shutdown began
            return None, _item_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            engine = self._engine(model)
            limits = model_limits(engine, self._limits.max_new_tokens_limit)
            sequence = SequenceRequest(
                embedding=parse_embedding(embedding, field, limits),
                params=greedy_params(max_new_tokens, "max_new_tokens", limits),
                seed=0,
                deadline=deadline,
                priority=priority,
            )
            result = await self._run(engine, sequence)
        except (RequestError, SequenceError) as error:
            return None, _item_error(error.code, error.message)
        return _decode_response(result, engine.name, received_at), None

    @rpc
    async def DecodeBatch(
        self, request: pb.DecodeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecodeBatchResponse:
        if not request.embeddings:
            await _abort(
                context,
                RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "embeddings: empty; expected at least one embedding",
                ),
            )
        if len(request.embeddings) > self._limits.max_batch_items:
            await _abort(
                context,
                RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"embeddings: {len(request.embeddings)} items exceed the server's "
                    f"max_batch_items {self._limits.max_batch_items}; split the batch",
                ),
            )
        try:
            self._engine(request.model)  # an unknown model fails the whole call
        except RequestError as error:
            await _abort(context, error)
        deadline = self._deadline(context)
        outcomes = await asyncio.gather(
            *(
                self._decode_item(
                    request.model,
                    embedding,
                    request.max_new_tokens,
                    f"embeddings[{i}]",
                    deadline,
                    request.priority,
                    str(i),
                    "DecodeBatch",
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
                item.model,
                item.embedding,
                item.max_new_tokens,
                "embedding",
                deadline,
                item.priority,
                item.id,
                "DecodeStream",
            )
            answers.put_nowait(pb.DecodeStreamResponse(id=item.id, response=ok, error=err))

        async def read_requests() -> None:
            count = 0
            async for item in request_iterator:
                count += 1
                if isinstance(item, Unparseable):
                    error = _item_error(grpc.StatusCode.INVALID_ARGUMENT, item.message)
                    answers.put_nowait(pb.DecodeStreamResponse(error=error))
                    continue
                if count > self._limits.max_stream_items:
                    error = _item_error(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this DecodeStream passed the server's max_stream_items "
                        f"{self._limits.max_stream_items}; open a new stream",
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
                await _abort(
                    context,
                    RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request stream: an item could not be read ({exc}); "
                        "the items before it were answered",
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
            models=[model_info(engine) for engine in self._engines.values()],
            default_model=self._default_model,
        )

    @rpc
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            return model_info(self._engine(request.model))
        except RequestError as error:
            await _abort(context, error)


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Unparseable(message_class.DESCRIPTOR.full_name, str(exc) or "malformed")

    return parse


def add_decoder_service(servicer: DecoderService, server: grpc.aio.Server) -> None:
    """Register the Decoder's methods (as the generated `add_DecoderServicer_to_server` does)
    with request parsers that hand unparseable messages to the handlers."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Decoder"].methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
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
        (grpc.method_handlers_generic_handler(DECODER_SERVICE, handlers),)
    )
