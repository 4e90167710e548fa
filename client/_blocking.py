"""How the blocking client talks to a server: its channel (opened by the one core,
``_core.Core``), its lifecycle, and sending: unary calls, repeated when the core says they are
retried, and streams. :class:`~retd.client.client.Client` adds the calls themselves."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any, Self, TypeVar

import grpc

from ._core import (
    DEFAULT_TARGET,
    ClientBase,
    Core,
    Stream,
    Unary,
    constructor_options,
    insecure_or_secure,
    stream_error,
)
from ._security import PemSource
from .convert import EmbeddingEncoding

__all__ = ["BlockingClient"]

R = TypeVar("R")

_open_channel = insecure_or_secure(grpc.insecure_channel, grpc.secure_channel)


class BlockingClient(ClientBase):
    """The channel and the sending of :class:`~retd.client.client.Client`, whose docstring
    describes the arguments."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        encoding: EmbeddingEncoding = "raw",
        tls: bool = False,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        token: str | None = None,
    ) -> None:
        self._core = Core(**constructor_options(locals()), open_channel=_open_channel)
        self.channel: grpc.Channel = self._core.channel

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (unless it was passed in); calls in flight are cancelled."""
        if self._core.owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; raise :class:`UnavailableError` on timeout."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise self._core.not_ready(timeout) from None

    # --- sending -----------------------------------------------------------------------------

    def _send(self, call: Unary[R], timeout: float | None) -> R:
        """Make a unary call, repeated with gRPC's backoff within its deadline when the core
        says it is retried; its response converted, or its typed error raised."""
        attempts = self._core.attempts(call, timeout)
        while True:
            try:
                response = call.method(
                    call.request, timeout=attempts.timeout, metadata=self._core.metadata()
                )
            except grpc.RpcError as err:
                time.sleep(attempts.backoff(err))  # raises the typed error if not retried
            else:
                return call.convert(response)

    def _stream(
        self, call: Stream[R], request: Any, timeout: float | None
    ) -> Generator[R, None, None]:
        """Start a streaming call now; its converted responses as they come."""
        started = call.method(
            request, timeout=self._core.deadline(timeout), metadata=self._core.metadata()
        )
        return _iterate(started, call, self._core.secure)


def _iterate(call: Any, stream: Stream[R], secure: bool | None) -> Generator[R, None, None]:
    """Yield a streaming call's converted responses; typed errors; cancel when closed early."""
    failure = stream.failure
    try:
        for message in call:
            if failure:
                raise failure[0]
            yield stream.convert(message)
        if failure:
            raise failure[0]
    except grpc.RpcError as err:
        raise stream_error(err, failure, secure) from err
    finally:
        call.cancel()
