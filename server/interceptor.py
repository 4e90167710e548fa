"""The server interceptor around every call of the Decoder and the ModelRepository: the
shutdown gate, the call's server span (current while the handler runs), its metrics and its
access-log line. Health and reflection pass through it untouched.

grpc.aio takes a server's interceptors when the server is made, before its port is bound:
`bound()` tells the interceptor the address once there is one (the spans' `server.address`
and `server.port`). It comes after the token check: a call turned away for its token gets
no span."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Any

import grpc

from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.telemetry import Telemetry

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
Observed = Callable[[grpc.aio.ServicerContext], contextlib.AbstractContextManager[bool]]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Gates and observes the calls of `services` (full names: `retd.v1.Decoder`)."""

    def __init__(self, telemetry: Telemetry, gate: CallGate, services: Collection[str]) -> None:
        self.telemetry = telemetry
        self.gate = gate
        self.services = frozenset(services)
        self.host = ""
        self.port = 0

    def bound(self, host: str, port: int) -> None:
        """The address the server listens on (bound, not yet started)."""
        self.host, self.port = host, port

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service not in self.services:
            return handler

        def observed(context: grpc.aio.ServicerContext) -> contextlib.AbstractContextManager[bool]:
            return self._observed(service, method, context)

        return _observing(handler, observed, self.gate)

    @contextlib.contextmanager
    def _observed(
        self, service: str, method: str, context: grpc.aio.ServicerContext
    ) -> Iterator[bool]:
        """Around a call, admitted or turned away: its span, current while it runs; at its
        end, its status, metrics and log line. Yields whether the gate admitted it."""
        started = time.monotonic()
        error: BaseException | None = None
        admitted = self.gate.enter()
        with self.telemetry.rpc_span(service, method, context, self.host, self.port) as span:
            try:
                yield admitted
            except BaseException as exc:
                error = exc
                raise
            finally:
                if admitted:
                    self.gate.exit()
                code = _outcome(context, error)
                details = context.details() or (str(error) if error else "")
                self.telemetry.finish_rpc(span, method, code, details, time.monotonic() - started)


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if error is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


async def _refuse(gate: CallGate, context: grpc.aio.ServicerContext) -> None:
    """Answer a call the gate turned away: UNAVAILABLE (held first while the gate holds its
    refusals for the last moments before the listener closes; see `CallGate.quiesce`).
    Raises, as `context.abort` does."""
    await gate.refuse(context.time_remaining())
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


def _observing(
    handler: grpc.RpcMethodHandler, observed: Observed, gate: CallGate
) -> grpc.RpcMethodHandler:
    """`handler` run inside `observed`, of the same streaming shape (a coroutine or an async
    generator); a call the gate turns away never reaches it."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        streams = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with observed(context) as admitted:
                if not admitted:
                    await _refuse(gate, context)
                async for item in streams(request, context):
                    yield item

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(stream, **options)
        return grpc.unary_stream_rpc_method_handler(stream, **options)

    answers = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with observed(context) as admitted:
            if not admitted:
                await _refuse(gate, context)
            return await answers(request, context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)
