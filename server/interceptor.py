"""The server interceptor around every call of the Decoder and the ModelRepository: the
shutdown gate, the call's server span (current while the handler runs), its metrics and its
access-log line. Health and reflection pass through it untouched.

grpc.aio takes a server's interceptors when the server is made, before its port is bound:
`bound()` tells the interceptor the address once there is one (the spans' `server.address`
and `server.port`). It comes after the token check: a call turned away for its token gets
no span."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextvars import Token
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as context_api
from opentelemetry.trace import Span

from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.telemetry import Telemetry

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


@dataclass(slots=True)
class Call:
    """One call in flight, as the interceptor keeps it between `begin` and `end`."""

    method: str
    started: float
    admitted: bool  # by the gate
    span: Span
    token: Token[context_api.Context]  # the span as the current one


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
        return _observing(handler, self, service, method)

    def begin(self, service: str, method: str, context: grpc.aio.ServicerContext) -> Call:
        """A call arrives: the gate admits it or not; its span starts, the current one
        while it runs. (Begin and end rather than a context manager: two fewer generator
        context managers a call, on the event loop's thread.)"""
        started = time.monotonic()
        admitted = self.gate.enter()
        span, token = self.telemetry.start_rpc(service, method, context, self.host, self.port)
        return Call(method, started, admitted, span, token)

    def end(
        self, call: Call, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> None:
        """A call is over, admitted or turned away: its status, metrics and log line, and
        its span ends."""
        try:
            if call.admitted:
                self.gate.exit()
            code = _outcome(context, error)
            details = context.details() or (str(error) if error else "")
            seconds = time.monotonic() - call.started
            self.telemetry.finish_rpc(call.span, call.method, code, details, seconds)
        finally:
            self.telemetry.end_rpc(call.span, call.token)


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
    handler: grpc.RpcMethodHandler, calls: CallInterceptor, service: str, method: str
) -> grpc.RpcMethodHandler:
    """`handler` observed by `calls` (`begin` and `end` around it), of the same streaming
    shape (a coroutine or an async generator); a call the gate turns away never reaches it."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        streams = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = calls.begin(service, method, context)
            error: BaseException | None = None
            try:
                if not call.admitted:
                    await _refuse(calls.gate, context)
                async for item in streams(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                calls.end(call, context, error)

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(stream, **options)
        return grpc.unary_stream_rpc_method_handler(stream, **options)

    answers = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = calls.begin(service, method, context)
        error: BaseException | None = None
        try:
            if not call.admitted:
                await _refuse(calls.gate, context)
            return await answers(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            calls.end(call, context, error)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)
