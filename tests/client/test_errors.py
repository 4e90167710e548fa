"""Status codes of real failed calls map to one error class each (no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest

from retd.client import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    RetdError,
    UnauthenticatedError,
    UnavailableError,
    UnknownError,
    from_rpc_error,
)
from retd.client.errors import error_from_code

EXPECTED: dict[grpc.StatusCode, type[RetdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.UNIMPLEMENTED: UnknownError,
    grpc.StatusCode.ABORTED: UnknownError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: UnknownError,
    grpc.StatusCode.DATA_LOSS: UnknownError,
    grpc.StatusCode.ALREADY_EXISTS: UnknownError,
}


def _abort_with(code: grpc.StatusCode):
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(code, f"field: failed with {code.name}")

    return grpc.unary_unary_rpc_method_handler(handler)


@pytest.fixture(scope="module")
def aborting_server() -> Iterator[str]:
    """A real gRPC server whose method ``/test.Abort/<CODE>`` fails with status CODE."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Abort", {code.name: _abort_with(code) for code in EXPECTED}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_sync_rpc_error_maps_to_its_class(aborting_server, code):
    with grpc.insecure_channel(aborting_server) as channel:
        call = channel.unary_unary(f"/test.Abort/{code.name}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
    err = from_rpc_error(info.value)
    assert type(err) is EXPECTED[code]
    assert err.code is code
    assert err.details == f"field: failed with {code.name}"
    assert str(err) == f"{code.name}: field: failed with {code.name}"
    assert isinstance(err, RetdError)


def test_aio_rpc_error_maps_too(aborting_server):
    async def run() -> list[RetdError]:
        errors = []
        async with grpc.aio.insecure_channel(aborting_server) as channel:
            for code in EXPECTED:
                try:
                    await channel.unary_unary(f"/test.Abort/{code.name}")(b"", timeout=10)
                except grpc.aio.AioRpcError as err:
                    errors.append(from_rpc_error(err))
        return errors

    errors = asyncio.run(run())
    assert [type(e) for e in errors] == list(EXPECTED.values())
    assert [e.code for e in errors] == list(EXPECTED)


def test_unreachable_server_is_unavailable():
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/x.Y/Z")(b"", timeout=10)
    assert isinstance(from_rpc_error(info.value), UnavailableError)


def test_error_from_code_numbers_and_builtins():
    assert isinstance(error_from_code(3, "x"), InvalidArgumentError)
    assert isinstance(error_from_code(3, "x"), ValueError)
    assert isinstance(error_from_code(4, "x"), TimeoutError)
    assert not isinstance(error_from_code(1, "x"), asyncio.CancelledError)
    unknown = error_from_code(999, "x")
    assert type(unknown) is UnknownError and unknown.code is grpc.StatusCode.UNKNOWN
    assert error_from_code(grpc.StatusCode.NOT_FOUND, "m").code_name == "NOT_FOUND"
