"""The wrapper around every Decoder method: the shutdown gate, the call's server span,
its metrics and its access-log line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc

from retd.server.gate import SHUTTING_DOWN, CallGate
from retd.server.telemetry import Telemetry


class Observed(Protocol):
    gate: CallGate
    telemetry: Telemetry
    service_name: str
    host: str
    port: int


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if error is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


@contextlib.contextmanager
def _observed(service: Observed, name: str, context: grpc.aio.ServicerContext) -> Iterator[bool]:
    """Around a call, admitted or turned away: its span, current while it runs; at its end,
    its status, metrics and log line. Yields whether the gate admitted it."""
    started = time.monotonic()
    error: BaseException | None = None
    telemetry = service.telemetry
    admitted = service.gate.enter()
    with telemetry.rpc_span(
        service.service_name, name, context, service.host, service.port
    ) as span:
        try:
            yield admitted
        except BaseException as exc:
            error = exc
            raise
        finally:
            if admitted:
                service.gate.exit()
            code = _outcome(context, error)
            details = context.details() or (str(error) if error else "")
            service.telemetry.finish_rpc(span, name, code, details, time.monotonic() - started)


class StatusError(Protocol):
    """An error that carries the gRPC status its call ends with."""

    code: grpc.StatusCode
    message: str


async def abort(context: grpc.aio.ServicerContext, error: StatusError) -> NoReturn:
    """End the call with `error`'s status and message."""
    await context.abort(error.code, error.message)
    raise AssertionError("context.abort raises")


@dataclass(frozen=True)
class Unparseable:
    """A request message that could not be parsed: handlers answer INVALID_ARGUMENT (grpc
    itself would answer UNKNOWN and log a traceback per call)."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return f"request: not a valid {self.type_name} message ({self.error})"


async def _refuse(gate: CallGate, context: grpc.aio.ServicerContext) -> None:
    """Answer a call the gate turned away: UNAVAILABLE (held first while the gate holds its
    refusals for the last moments before the listener closes; see `CallGate.quiesce`).
    Raises, as `context.abort` does."""
    await gate.refuse(context.time_remaining())
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator)."""
    name = method.__name__

    @functools.wraps(method)
    async def unary(self: Observed, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _observed(self, name, context) as admitted:
            if not admitted:
                await _refuse(self.gate, context)
            if isinstance(request, Unparseable):  # a request stream checks each item
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await method(self, request, context)

    @functools.wraps(method)
    async def stream(
        self: Observed, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        with _observed(self, name, context) as admitted:
            if not admitted:
                await _refuse(self.gate, context)
            if isinstance(request, Unparseable):  # a request stream checks each item
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in method(self, request, context):
                yield item

    return stream if inspect.isasyncgenfunction(method) else unary
