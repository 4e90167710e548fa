"""What :class:`Client` and :class:`AsyncClient` share: the channel's setup and every call.

:class:`Core` resolves the target (one server or several replicas, see ``_balancing``), the
credentials and the metadata, and builds each call as a :class:`Unary` or a :class:`Stream`:
the method to invoke, the request, whether the client retries it, and the converter of its
response to the public types. The two clients differ only in how they send a call (blocking
or awaited) and in their channel type; the retry schedule (:class:`Attempts`) and the typed
errors of a stream (:func:`stream_error`) are here, once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from retd.v1 import decoder_pb2, decoder_pb2_grpc, repository_pb2_grpc

from . import _balancing, _health, _requests, _security, convert
from ._security import PemSource
from ._tracing import Metadata, with_trace_context
from .convert import EmbeddingEncoding, EmbeddingLike
from .errors import RetdError, UnavailableError, from_rpc_error
from .types import (
    DecodeBatchItem,
    DecodeResult,
    GenerateResult,
    HealthStatus,
    ModelInfo,
    ModelVersionStatus,
    RepositoryListing,
    StreamChunk,
    StreamItem,
)

__all__ = [
    "DEFAULT_TARGET",
    "Attempts",
    "ClientBase",
    "Core",
    "Stream",
    "Unary",
    "call_options",
    "insecure_or_secure",
    "stream_error",
]

#: Where ``retd serve`` listens by default.
DEFAULT_TARGET = "127.0.0.1:50051"

R = TypeVar("R")
Options = Sequence[tuple[str, Any]]
StreamItems = Iterable[EmbeddingLike | tuple[str, EmbeddingLike]]
#: Opens a channel: (target, credentials or None for plaintext, options) -> channel.
ChannelOpener = Callable[[str, "grpc.ChannelCredentials | None", list[tuple[str, Any]]], Any]


#: A public method's arguments that are not its call's options.
_NOT_OPTIONS = frozenset({"self", "timeout", "embedding", "embeddings", "items"})


def call_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """What a public method passes to its call's builder: its keyword arguments (its
    ``locals()`` as it starts) but ``timeout``, which is the sending's, and the embeddings."""
    return {name: value for name, value in arguments.items() if name not in _NOT_OPTIONS}


def constructor_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """What a client's ``__init__`` passes on to :class:`Core`: its arguments (its
    ``locals()`` as it starts) but ``self``."""
    return {name: value for name, value in arguments.items() if name not in ("self", "__class__")}


@dataclass(frozen=True)
class Unary(Generic[R]):
    """A unary call to make: ``convert(method(request, ...))``; ``retry``: the client repeats
    it on a retryable status (for the calls gRPC's own policy cannot single out)."""

    method: Callable[..., Any]
    request: Any
    convert: Callable[[Any], R]
    retry: bool = False


@dataclass
class Stream(Generic[R]):
    """A streaming call: ``method`` takes ``request`` (a message, or an iterator of them
    for DecodeStream) and its responses are converted one by one. ``failure`` holds what
    went wrong reading the caller's items (raised to the caller from the iteration)."""

    method: Callable[..., Any]
    convert: Callable[[Any], R]
    request: Any = None
    item: Callable[[int, object], decoder_pb2.DecodeStreamRequest] | None = None
    failure: list[BaseException] = field(default_factory=list)

    def requests(self, items: StreamItems) -> Iterator[decoder_pb2.DecodeStreamRequest]:
        """DecodeStream's requests from ``items``, read lazily; a failure ends them."""
        assert self.item is not None
        try:
            for index, item in enumerate(items):
                yield self.item(index, item)
        except Exception as err:  # raised to the caller from the response iterator
            self.failure.append(err)

    async def arequests(
        self, items: StreamItems | AsyncIterable[EmbeddingLike | tuple[str, EmbeddingLike]]
    ) -> AsyncIterator[decoder_pb2.DecodeStreamRequest]:
        """:meth:`requests` for the asyncio client: ``items`` may be an async iterable."""
        assert self.item is not None
        try:
            if isinstance(items, AsyncIterable):
                index = 0
                async for item in items:
                    yield self.item(index, item)
                    index += 1
            else:
                for index, item in enumerate(items):
                    yield self.item(index, item)
        except Exception as err:  # raised to the caller from the response iterator
            self.failure.append(err)


class Attempts:
    """The attempts of one unary call within its deadline: :attr:`timeout` of the next one,
    and :meth:`backoff`, how long to wait before it (gRPC's backoff), for a retried call."""

    def __init__(self, deadline: float | None, retry: bool, secure: bool | None) -> None:
        self._deadline = deadline
        self._end = None if deadline is None else time.monotonic() + deadline
        self._pauses = _balancing.backoffs() if retry else iter(())
        self._secure = secure
        self._first = True

    @property
    def timeout(self) -> float | None:
        """The deadline of the attempt made now: what is left of the call's."""
        if self._first or self._end is None:
            return self._deadline
        return self._end - time.monotonic()

    def backoff(self, err: grpc.RpcError) -> float:
        """The pause before the next attempt after ``err``; raises ``err``'s typed error
        when there is none (not retried, out of attempts, or past the deadline)."""
        error = from_rpc_error(err, secure=self._secure)
        pause = next(self._pauses, None) if _balancing.retryable(error.code) else None
        if pause is None or (self._end is not None and time.monotonic() + pause >= self._end):
            raise error from err
        self._first = False
        return pause


def stream_error(
    err: grpc.RpcError, failure: list[BaseException], secure: bool | None
) -> BaseException:
    """What a stream raises when its call fails: the caller's own items' failure first."""
    return failure[0] if failure else from_rpc_error(err, secure=secure)


class Core:
    """A client's channel and calls (the arguments are :class:`Client`'s)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None,
        options: Options,
        channel: Any,
        credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]] | None,
        encoding: EmbeddingEncoding,
        tls: bool,
        root_certificates: PemSource | None,
        certificate_chain: PemSource | None,
        private_key: PemSource | None,
        token: str | None,
        open_channel: ChannelOpener,
    ) -> None:
        if encoding not in ("raw", "vector"):
            raise ValueError(f"encoding must be 'raw' or 'vector', not {encoding!r}")
        self.timeout = timeout
        self.encoding: EmbeddingEncoding = encoding
        credentials, self._metadata = _security.resolve(
            credentials,
            metadata,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            token=token,
        )
        self.owns_channel = channel is None
        # Whether calls go over TLS, for the hints of failed connections (None: a channel
        # of the caller's, unknown).
        self.secure = (credentials is not None) if channel is None else None
        self.balanced = False
        if channel is None:
            resolved = _balancing.resolve(target, options)
            target, self.balanced = resolved.target, resolved.balanced
            channel = open_channel(target, credentials, list(resolved.options))
        self.target = target if isinstance(target, str) else ",".join(target)
        self.channel = channel
        self._stub = decoder_pb2_grpc.DecoderStub(channel)
        self._admin = repository_pb2_grpc.ModelRepositoryStub(channel)
        self._health_check = channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )

    # --- sending, the parts both clients share ---------------------------------------------

    def metadata(self) -> Metadata | None:
        """The metadata of a call made now (the client's, plus the current trace context)."""
        return with_trace_context(self._metadata)

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def attempts(self, call: Unary[Any], timeout: float | None) -> Attempts:
        return Attempts(self.deadline(timeout), call.retry, self.secure)

    def not_ready(self, timeout: float | None) -> RetdError:
        return UnavailableError(f"{self.target}: not ready after {timeout} s")

    # --- the Decoder's calls ---------------------------------------------------------------

    def decode(self, embedding: EmbeddingLike, **options: Any) -> Unary[DecodeResult]:
        request = _requests.decode(embedding, encoding=self.encoding, **options)
        return Unary(self._stub.Decode, request, convert.decode_result)

    def generate(self, embedding: EmbeddingLike, **options: Any) -> Unary[GenerateResult]:
        request = _requests.generate(embedding, encoding=self.encoding, **options)
        retry = self.balanced and _balancing.deterministic(request)
        return Unary(self._stub.Generate, request, convert.generate_result, retry)

    def generate_stream(self, embedding: EmbeddingLike, **options: Any) -> Stream[StreamChunk]:
        request = _requests.generate(embedding, encoding=self.encoding, **options)
        return Stream(self._stub.GenerateStream, convert.stream_chunk, request)

    def decode_batch(
        self, embeddings: Iterable[EmbeddingLike], **options: Any
    ) -> Unary[list[DecodeBatchItem]]:
        request = _requests.decode_batch(embeddings, encoding=self.encoding, **options)
        return Unary(self._stub.DecodeBatch, request, _batch_items)

    def decode_stream(
        self,
        *,
        priority: int | None,
        version: int,
        no_repeat_ngram_size: int | None,
        repetition_penalty: float | None,
        repetition_ngram_size: int | None,
        eos_bias: float | None,
        **options: Any,
    ) -> Stream[StreamItem]:
        """A DecodeStream whose items are built by ``item``; bad arguments raise here."""
        priority = _requests.check_priority(priority)
        version = _requests.check_version(version)
        _requests.loop_breakers(
            no_repeat_ngram_size, repetition_penalty, repetition_ngram_size, eos_bias
        )

        def item(index: int, value: object) -> decoder_pb2.DecodeStreamRequest:
            return _requests.stream_item(
                index,
                value,
                encoding=self.encoding,
                priority=priority,
                version=version,
                no_repeat_ngram_size=no_repeat_ngram_size,
                repetition_penalty=repetition_penalty,
                repetition_ngram_size=repetition_ngram_size,
                eos_bias=eos_bias,
                **options,
            )

        return Stream(self._stub.DecodeStream, convert.stream_item, item=item)

    def list_models(self) -> Unary[list[ModelInfo]]:
        return Unary(self._stub.ListModels, decoder_pb2.ListModelsRequest(), _model_infos)

    def default_model(self) -> Unary[str]:
        return Unary(self._stub.ListModels, decoder_pb2.ListModelsRequest(), _default_model)

    def model_info(self, model: str | None, version: int) -> Unary[ModelInfo]:
        request = _requests.model_info(model, version)
        return Unary(self._stub.GetModelInfo, request, convert.model_info)

    # --- the admin service (retd.v1.ModelRepository) and health ------------------------------

    def list_versions(self, model: str) -> Unary[RepositoryListing]:
        request = _requests.list_versions(model)
        return Unary(self._admin.List, request, convert.repository_listing)

    def load_model(self, model: str, version: int) -> Unary[ModelVersionStatus]:
        request = _requests.load_model(model, version)
        return Unary(self._admin.Load, request, _loaded)

    def unload_model(self, model: str, version: int) -> Unary[list[ModelVersionStatus]]:
        request = _requests.unload_model(model, version)
        return Unary(self._admin.Unload, request, _unloaded)

    def health(self, service: str) -> Unary[HealthStatus]:
        request = _health.HealthCheckRequest(service=service)
        return Unary(self._health_check, request, _health.health_status)


# --- response converters -------------------------------------------------------------------


def _batch_items(response: Any) -> list[DecodeBatchItem]:
    return [convert.batch_item(result) for result in response.results]


def _model_infos(response: Any) -> list[ModelInfo]:
    return [convert.model_info(m) for m in response.models]


def _default_model(response: Any) -> str:
    return str(response.default_model)


def _loaded(response: Any) -> ModelVersionStatus:
    return convert.version_status(response.status)


def _unloaded(response: Any) -> list[ModelVersionStatus]:
    return [convert.version_status(row) for row in response.unloaded]


def insecure_or_secure(insecure: Callable[..., Any], secure: Callable[..., Any]) -> ChannelOpener:
    """A :data:`ChannelOpener` from grpc's (or grpc.aio's) two channel functions."""

    def open_channel(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        if credentials is None:
            return insecure(target, options=options)
        return secure(target, credentials, options=options)

    return open_channel


class ClientBase:
    """The attributes :class:`Client` and :class:`AsyncClient` share, kept by their core."""

    _core: Core

    @property
    def timeout(self) -> float | None:
        """The default deadline of every call, in seconds (``None``: none)."""
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._core.timeout = value

    @property
    def encoding(self) -> EmbeddingEncoding:
        """How embeddings travel: ``"raw"`` float32 bytes or ``"vector"``."""
        return self._core.encoding

    @encoding.setter
    def encoding(self, value: EmbeddingEncoding) -> None:
        self._core.encoding = value

    @property
    def balanced(self) -> bool:
        """Whether the channel balances over replicas with the client's retry policy."""
        return self._core.balanced

    @property
    def target(self) -> str:
        """The gRPC target of the channel (several replicas: the ``ipv4:``/``dns:`` form)."""
        return self._core.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, timeout={self.timeout!r})"
