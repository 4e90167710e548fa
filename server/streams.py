"""DecodeBatch's and DecodeStream's items: each is answered in a span of its own and fails
on its own (an `ItemError` in its slot, the call goes on), and DecodeStream answers items
as they finish, in any order, through a queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager as ContextManager

from retd.server.calls import Unparseable
from retd.server.config import ServiceLimits
from retd.server.engine import SequenceRequest
from retd.server.errors import ErrorKind, ServeError, invalid
from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.handles import SequenceResult
from retd.server.hybrid import HybridDecoder, hybrid_of
from retd.server.repository import ModelRegistry
from retd.server.responses import decode_response, item_error
from retd.server.telemetry import Telemetry
from retd.server.validation import DecodeOptions
from retd.server.versions import ModelVersion
from retd.v1 import decoder_pb2 as pb

# Builds the sequence one embedding asks of a leased version: (served, embedding, field,
# options, deadline).
RequestBuilder = Callable[
    [ModelVersion, pb.Embedding, str, DecodeOptions, float | None], SequenceRequest
]
# Runs one sequence on a leased model version and returns its result.
Runner = Callable[[ModelVersion, SequenceRequest], Awaitable[SequenceResult]]

Outcome = tuple[pb.DecodeResponse | None, pb.ItemError | None]


class ItemDecoder:
    """Answers the items of DecodeBatch and DecodeStream calls from `models`: builds each
    item's sequence with `build`, runs it with `run` (hybrid items: `hybrid`)."""

    def __init__(
        self,
        service_name: str,
        models: ModelRegistry,
        limits: ServiceLimits,
        gate: CallGate,
        telemetry: Telemetry,
        hybrid: HybridDecoder,
        build: RequestBuilder,
        run: Runner,
    ) -> None:
        self.service_name = service_name
        self.models = models
        self._limits = limits
        self.gate = gate
        self.telemetry = telemetry
        self.hybrid = hybrid
        self._build = build
        self._run = run

    async def batch(
        self, request: pb.DecodeBatchRequest, deadline: float | None
    ) -> pb.DecodeBatchResponse:
        """Every item of the batch at once, on one leased version; a result per item."""
        if not request.embeddings:
            raise invalid("embeddings: empty; expected at least one embedding")
        if len(request.embeddings) > self._limits.max_batch_items:
            raise invalid(
                f"embeddings: {len(request.embeddings)} items exceed the server's "
                f"max_batch_items {self._limits.max_batch_items}; split the batch",
            )
        # one version serves the whole batch; an unknown model fails the call
        with self.models.lease(request.model, request.version) as served:
            outcomes = await asyncio.gather(
                *(
                    self.decode_item(
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

    async def stream(
        self,
        request_iterator: AsyncIterator[pb.DecodeStreamRequest],
        deadline: float | None,
    ) -> AsyncGenerator[pb.DecodeStreamResponse, None]:
        """Answer each item read from `request_iterator` as soon as it is done; end once
        every item read is answered. An item that cannot be parsed, or one past the
        server's max_stream_items, is answered with its error."""
        answers: asyncio.Queue[pb.DecodeStreamResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(item: pb.DecodeStreamRequest) -> None:
            ok, err = await self.decode_item(
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

    async def decode_item(
        self,
        served_by: Callable[[], ContextManager[ModelVersion]],
        embedding: pb.Embedding,
        options: DecodeOptions,
        field: str,
        deadline: float | None,
        item: str,
        method: str,
        hybrid: pb.Hybrid | None = None,
    ) -> Outcome:
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
    ) -> Outcome:
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
                sequence = self._build(served, embedding, field, options, deadline)
                result = await self._run(served, sequence)
        except ServeError as error:
            return None, item_error(error)
        return decode_response(result, served, received_at), None
