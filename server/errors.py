"""The server's one error: a request, a sequence or a registry call that cannot be served as
asked (`ServeError`), with its kind (`ErrorKind`). The gRPC status each kind ends a call with
is chosen at the edge, once (server/calls.py)."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Why a call (or one item of a batch or stream) cannot be served."""

    INVALID = "invalid"  # the request is malformed or out of bounds
    NOT_FOUND = "not_found"  # no such model or version
    UNAVAILABLE = "unavailable"  # shutting down, or the model is still loading
    LOAD_FAILED = "load_failed"  # the model's version failed to load
    EXHAUSTED = "exhausted"  # a limit is reached: the queue of waiting requests, a stream's items
    CANCELLED = "cancelled"  # the caller left
    DEADLINE = "deadline"  # the caller's deadline passed
    INTERNAL = "internal"  # the model failed


class ServeError(Exception):
    """A request, sequence or registry call that cannot be served as asked: its `kind`, and
    a `message` that names the field or the model and what was expected."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type[ServeError], tuple[ErrorKind, str]]:
        return ServeError, (self.kind, self.message)  # crosses to and from an engine process


def invalid(message: str) -> ServeError:
    return ServeError(ErrorKind.INVALID, message)


def not_found(message: str) -> ServeError:
    return ServeError(ErrorKind.NOT_FOUND, message)
