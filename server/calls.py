"""The gRPC edge: `add_service` registers a servicer with parsers that hand unparseable
requests to it (`Unparseable`), the wrapper around every servicer method (`rpc`), and
`abort`, which ends a call with an error's status: the one place a `ServeError`'s kind
becomes a gRPC status code (`STATUS_CODES`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from retd.server.errors import ErrorKind, ServeError

STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.LOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_code(error: ServeError) -> grpc.StatusCode:
    """The gRPC status a call (or an item of a batch or stream) that failed with `error`
    ends with."""
    return STATUS_CODES[error.kind]


async def abort(context: grpc.aio.ServicerContext, error: ServeError) -> NoReturn:
    """End the call with `error`'s status and message."""
    await context.abort(status_code(error), error.message)
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


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator): a request message that could
    not be parsed is answered INVALID_ARGUMENT, and a `ServeError` the method raises ends
    the call with its kind's status (`abort`). (The gate and the call's span, metrics and
    log line are the interceptor's: server/interceptor.py.)"""

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparseable):  # a request stream checks each item
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(self, request, context)
        except ServeError as error:
            await abort(context, error)

    @functools.wraps(method)
    async def stream(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if isinstance(request, Unparseable):  # a request stream checks each item
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            async for item in method(self, request, context):
                yield item
        except ServeError as error:
            await abort(context, error)

    return stream if inspect.isasyncgenfunction(method) else unary


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
