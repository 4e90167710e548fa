"""Typed errors: one exception class per gRPC failure kind.

Every failed call raises a :class:`RetdError` subclass chosen by the status code, so callers
catch exactly the failure they can handle::

    >>> from retd.client import Client, InvalidArgumentError
    >>> with Client(address) as client:  # address: "127.0.0.1:50051"
    ...     try:
    ...         client.decode([0.0] * 3)
    ...     except InvalidArgumentError as err:
    ...         print(err.code.name, err.details)
    INVALID_ARGUMENT embedding: got 3 values; expected 768 float32 values ...

Failed items of :meth:`Client.decode_batch` and :meth:`Client.decode_stream` carry the same
classes as values (``item.error``) instead of raising them.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetdError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownError",
    "error_from_code",
    "from_rpc_error",
]


class RetdError(Exception):
    """Base class of every error the retd client raises.

    Attributes:
        code: the gRPC status code of the failure.
        details: the server's message; it names the offending field.
    """

    #: The status code this class stands for (the fallback :class:`UnknownError` takes any).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        super().__init__(details)

    @property
    def code_name(self) -> str:
        """The code's name, e.g. ``"INVALID_ARGUMENT"``."""
        return self.code.name

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(details={self.details!r}, code={self.code.name})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RetdError):
            return NotImplemented
        return type(self) is type(other) and (self.code, self.details) == (
            other.code,
            other.details,
        )

    def __hash__(self) -> int:
        return hash((type(self), self.code, self.details))


class InvalidArgumentError(RetdError, ValueError):
    """A bad request: wrong embedding shape or values, out-of-range sampling parameter, ...

    Also raised client-side, before any call, for inputs that cannot be an embedding.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RetdError):
    """The named model, or version of it, is not loaded on the server (or, for the admin
    calls, not in its model repository); the message lists what is."""

    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(RetdError):
    """The server's queue is full or the message is too large: retry later or send less."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(RetdError, TimeoutError):
    """The call's deadline (``timeout=``) passed before the answer came."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestCancelledError(RetdError):
    """The call was cancelled (by this client or the server).

    Named so as not to shadow :class:`asyncio.CancelledError`.
    """

    default_code = grpc.StatusCode.CANCELLED


class UnavailableError(RetdError):
    """The server cannot be reached or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(RetdError):
    """The call lacks valid credentials."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RetdError):
    """The caller may not make this call: e.g. the admin calls of a server bound to a
    non-loopback address without admin tokens, which are refused to everyone."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(RetdError):
    """The server cannot do it in its present state: e.g. :meth:`Client.load_model` of a
    version whose checkpoint fails to load (the message says why)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(RetdError):
    """The server failed while handling the call (a bug or a broken model)."""

    default_code = grpc.StatusCode.INTERNAL


class UnknownError(RetdError):
    """Fallback for any other status code (UNKNOWN, UNIMPLEMENTED, ABORTED, ...).

    A server older than the admin service answers its calls UNIMPLEMENTED: this class."""

    default_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[RetdError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        DeadlineExceededError,
        RequestCancelledError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        FailedPreconditionError,
        InternalError,
    )
}

_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(code: grpc.StatusCode | int, details: str = "") -> RetdError:
    """The :class:`RetdError` subclass instance for a status code (enum member or number).

    >>> error_from_code(3, "embedding: expected 768 values, got 3")
    InvalidArgumentError(details='embedding: expected 768 values, got 3', code=INVALID_ARGUMENT)
    >>> error_from_code(12, "no such method")
    UnknownError(details='no such method', code=UNIMPLEMENTED)
    """
    if not isinstance(code, grpc.StatusCode):
        code = _BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, UnknownError)(details, code)


def from_rpc_error(err: grpc.RpcError, *, secure: bool | None = None) -> RetdError:
    """Turn a failed call's :class:`grpc.RpcError` (sync or ``grpc.aio``) into a typed error.

    ``secure``: whether the channel used TLS (None: unknown). When known, an UNAVAILABLE
    that looks like a TLS mismatch (a plaintext client at a TLS port, a certificate that did
    not verify, TLS at a plaintext port) gets a hint of the likely cause appended."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    status = code() if callable(code) else None
    message = (details() if callable(details) else None) or ""
    if not isinstance(status, grpc.StatusCode):
        status = grpc.StatusCode.UNKNOWN
    if status is grpc.StatusCode.UNAVAILABLE:
        from ._security import connection_hint

        hint = connection_hint(message, secure)
        message = f"{message} (hint: {hint})" if hint else message
    return error_from_code(status, message)
