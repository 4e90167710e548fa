"""The wrapper around every Decoder method: the shutdown gate, the call's server span,
its metrics and its access-log line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import grpc
from opentelemetry.trace import Span

from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.telemetry import Telemetry


class Observed(Protocol):
    gate: CallGate
    telemetry: Telemetry
    service_name: str
    port: int


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if error is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


@contextlib.contextmanager
def _observed(service: Observed, name: str, context: grpc.aio.ServicerContext) -> Iterator[Span]:
    """Around an admitted call: its span; at its end, its status, metrics and log line."""
    started = time.monotonic()
    error: BaseException | None = None
    with service.telemetry.rpc_span(service.service_name, name, context, service.port) as span:
        try:
            yield span
        except BaseException as exc:
            error = exc
            raise
        finally:
            service.gate.exit()
            code = _outcome(context, error)
            details = context.details() or (str(error) if error else "")
            service.telemetry.finish_rpc(span, name, code, details, time.monotonic() - started)


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator)."""
    name = method.__name__

    @functools.wraps(method)
    async def unary(self: Observed, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self.gate.enter():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        with _observed(self, name, context):
            return await method(self, request, context)

    @functools.wraps(method)
    async def stream(
        self: Observed, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if not self.gate.enter():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        with _observed(self, name, context):
            async for item in method(self, request, context):
                yield item

    return stream if inspect.isasyncgenfunction(method) else unary
