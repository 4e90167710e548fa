"""The server's one error vocabulary (server/errors.py) and the one place its kinds become gRPC
status codes (server/calls.py)."""

from __future__ import annotations

import grpc

from retd.server.calls import STATUS_CODES, status_code
from retd.server.errors import ErrorKind, ServeError, invalid


def test_every_kind_ends_a_call_with_its_grpc_status() -> None:
    assert STATUS_CODES == {
        ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
        ErrorKind.LOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
        ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    }
    assert set(STATUS_CODES) == set(ErrorKind)


def test_an_error_keeps_its_message_and_kind() -> None:
    error = invalid("embedding: empty; expected 384 floats")
    assert isinstance(error, ServeError) and error.kind is ErrorKind.INVALID
    assert error.message == str(error) == "embedding: empty; expected 384 floats"
    assert status_code(error) is grpc.StatusCode.INVALID_ARGUMENT
