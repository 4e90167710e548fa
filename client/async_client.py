"""The asyncio retd client (``grpc.aio``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from typing import Any, TypeVar

import grpc
import grpc.aio

from retd.v1 import decoder_pb2, decoder_pb2_grpc, repository_pb2, repository_pb2_grpc

from . import _balancing, _health, _requests, _security, convert
from ._security import PemSource
from ._tracing import with_trace_context
from .client import DEFAULT_TARGET
from .convert import EmbeddingEncoding, EmbeddingLike
from .errors import UnavailableError, from_rpc_error
from .types import (
    DecodeBatchItem,
    DecodeResult,
    GenerateResult,
    HealthStatus,
    Hybrid,
    ModelInfo,
    ModelVersionStatus,
    RepositoryListing,
    StreamChunk,
    StreamItem,
)

__all__ = ["AsyncClient"]

_T = TypeVar("_T")


class AsyncClient:
    """An asyncio client of a retd server: the methods of :class:`Client` as coroutines.

    The streaming methods return async iterators. Create it inside a running event loop
    (``grpc.aio`` channels belong to one loop). The arguments are those of :class:`Client`,
    several replicas included (balanced and retried by the same rules).

    Example::

        >>> import asyncio, numpy as np
        >>> from retd.client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient("127.0.0.1:50051") as client:
        ...         embedding = np.random.randn(768).astype(np.float32)
        ...         print((await client.decode(embedding)).text)
        ...         async for chunk in client.generate_stream(embedding, seed=0):
        ...             print(chunk.text, end="", flush=True)
        >>> asyncio.run(main())  # doctest: +SKIP

    Leaving an ``async for`` early cancels the call once the iterator is closed: wrap it in
    :func:`contextlib.aclosing` to close it at once.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        encoding: EmbeddingEncoding = "raw",
        tls: bool = False,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        token: str | None = None,
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
        self._owns_channel = channel is None
        # Whether calls go over TLS, for the hints of failed connections (None: unknown).
        self._secure = (credentials is not None) if channel is None else None
        #: Whether the channel balances over replicas with the client's retry policy.
        self.balanced = False
        if channel is None:
            resolved = _balancing.resolve(target, options)
            target, self.balanced = resolved.target, resolved.balanced
            options = resolved.options
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=list(options))
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        #: The gRPC target of the channel (several replicas: the ``ipv4:``/``dns:`` form).
        self.target = target if isinstance(target, str) else ",".join(target)
        self.channel: grpc.aio.Channel = channel
        self._stub = decoder_pb2_grpc.DecoderStub(channel)
        self._admin = repository_pb2_grpc.ModelRepositoryStub(channel)
        self._health_check = channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (unless it was passed in); calls in flight are cancelled."""
        if self._owns_channel:
            await self.channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(target={self.target!r}, timeout={self.timeout!r})"

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; raise :class:`UnavailableError` on timeout."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise UnavailableError(f"{self.target}: not ready after {timeout} s") from None

    # --- calls -------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(
        self,
        method: Callable[..., Awaitable[_T]],
        request: Any,
        timeout: float | None,
        retry: bool = False,
    ) -> _T:
        """Make the call; with ``retry``, as :meth:`Client._unary`."""
        deadline = self._deadline(timeout)
        end = None if deadline is None else time.monotonic() + deadline
        pauses = _balancing.backoffs() if retry else iter(())
        remaining = deadline
        while True:
            try:
                return await method(
                    request, timeout=remaining, metadata=with_trace_context(self._metadata)
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err, secure=self._secure)
                pause = next(pauses, None) if _balancing.retryable(error.code) else None
                if pause is None or (end is not None and time.monotonic() + pause >= end):
                    raise error from err
            await asyncio.sleep(pause)
            remaining = None if end is None else end - time.monotonic()

    async def decode(
        self,
        embedding: EmbeddingLike,
        *,
        model: str | None = None,
        version: int = 0,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        repetition_penalty: float | None = None,
        repetition_ngram_size: int | None = None,
        priority: int | None = None,
        hybrid: Hybrid | None = None,
        timeout: float | None = None,
    ) -> DecodeResult:
        """Decode one embedding to text, greedily; see :meth:`Client.decode`.

        ``priority``: higher is served first when requests wait for a slot; FIFO among equals
        (``None`` means 0). The streaming and batch methods take it too. ``hybrid``: a
        :class:`Hybrid` (a phrase bank first, ``model`` when its phrase is not similar enough);
        ``decode_batch`` and ``decode_stream`` take it too, for every item.
        ``version``: a loaded version of ``model`` (0: the newest); every decoding method and
        :meth:`model_info` take it, and ``result.version`` says which version answered.
        ``no_repeat_ngram_size``, ``repetition_penalty``, ``repetition_ngram_size``: the loop
        breakers, as on :meth:`Client.decode`. On the decode forms ``None`` takes the server's
        default (on by default); ``generate`` takes ``no_repeat_ngram_size`` only, ``None``/0
        being off there.

        >>> async def unlooped(client):
        ...     return (await client.decode(embedding, no_repeat_ngram_size=6)).text
        >>> asyncio.run(unlooped(AsyncClient()))  # doctest: +SKIP
        'a cat sits on the mat'
        """
        request = _requests.decode(
            embedding,
            model=model,
            max_new_tokens=max_new_tokens,
            encoding=self.encoding,
            priority=priority,
            hybrid=hybrid,
            version=version,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
            repetition_ngram_size=repetition_ngram_size,
        )
        return convert.decode_result(await self._unary(self._stub.Decode, request, timeout))

    async def generate(
        self,
        embedding: EmbeddingLike,
        *,
        model: str | None = None,
        version: int = 0,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """Decode one embedding to text with sampling; see :meth:`Client.generate`."""
        request = _requests.generate(
            embedding,
            model=model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            encoding=self.encoding,
            priority=priority,
            version=version,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        retry = self.balanced and _balancing.deterministic(request)
        response = await self._unary(self._stub.Generate, request, timeout, retry)
        return convert.generate_result(response)

    def generate_stream(
        self,
        embedding: EmbeddingLike,
        *,
        model: str | None = None,
        version: int = 0,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Text deltas as they are generated; see :meth:`Client.generate_stream`.

        Arguments are checked at once; the call starts on the first iteration.
        """
        request = _requests.generate(
            embedding,
            model=model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            encoding=self.encoding,
            priority=priority,
            version=version,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        deadline = self._deadline(timeout)
        return _iterate(
            lambda: self._stub.GenerateStream(
                request, timeout=deadline, metadata=with_trace_context(self._metadata)
            ),
            convert.stream_chunk,
            secure=self._secure,
        )

    async def decode_batch(
        self,
        embeddings: Iterable[EmbeddingLike],
        *,
        model: str | None = None,
        version: int = 0,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        repetition_penalty: float | None = None,
        repetition_ngram_size: int | None = None,
        priority: int | None = None,
        hybrid: Hybrid | None = None,
        timeout: float | None = None,
    ) -> list[DecodeBatchItem]:
        """Decode N embeddings in one call, in request order; see :meth:`Client.decode_batch`."""
        request = _requests.decode_batch(
            embeddings,
            model=model,
            max_new_tokens=max_new_tokens,
            encoding=self.encoding,
            priority=priority,
            version=version,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
            repetition_ngram_size=repetition_ngram_size,
            hybrid=hybrid,
        )
        response: decoder_pb2.DecodeBatchResponse = await self._unary(
            self._stub.DecodeBatch, request, timeout
        )
        return [convert.batch_item(result) for result in response.results]

    def decode_stream(
        self,
        items: Iterable[EmbeddingLike | tuple[str, EmbeddingLike]]
        | AsyncIterable[EmbeddingLike | tuple[str, EmbeddingLike]],
        *,
        model: str | None = None,
        version: int = 0,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        repetition_penalty: float | None = None,
        repetition_ngram_size: int | None = None,
        priority: int | None = None,
        hybrid: Hybrid | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[StreamItem, None]:
        """Stream embeddings in and texts out; see :meth:`Client.decode_stream`.

        ``items`` may also be an async iterable.
        """
        failure: list[BaseException] = []
        priority = _requests.check_priority(priority)  # bad arguments raise here, at once
        version = _requests.check_version(version)
        _requests.loop_breakers(no_repeat_ngram_size, repetition_penalty, repetition_ngram_size)

        def request(index: int, item: object) -> decoder_pb2.DecodeStreamRequest:
            return _requests.stream_item(
                index,
                item,
                model=model,
                max_new_tokens=max_new_tokens,
                encoding=self.encoding,
                priority=priority,
                version=version,
                no_repeat_ngram_size=no_repeat_ngram_size,
                repetition_penalty=repetition_penalty,
                repetition_ngram_size=repetition_ngram_size,
                hybrid=hybrid,
            )

        async def requests() -> AsyncIterator[decoder_pb2.DecodeStreamRequest]:
            try:
                if isinstance(items, AsyncIterable):
                    index = 0
                    async for item in items:
                        yield request(index, item)
                        index += 1
                else:
                    for index, item in enumerate(items):
                        yield request(index, item)
            except Exception as err:  # raised to the caller from the response iterator
                failure.append(err)

        deadline = self._deadline(timeout)
        return _iterate(
            lambda: self._stub.DecodeStream(
                requests(), timeout=deadline, metadata=with_trace_context(self._metadata)
            ),
            convert.stream_item,
            failure,
            secure=self._secure,
        )

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server has loaded."""
        response: decoder_pb2.ListModelsResponse = await self._unary(
            self._stub.ListModels, decoder_pb2.ListModelsRequest(), timeout
        )
        return [convert.model_info(m) for m in response.models]

    async def default_model(self, *, timeout: float | None = None) -> str:
        """The name of the model that serves requests naming none."""
        response: decoder_pb2.ListModelsResponse = await self._unary(
            self._stub.ListModels, decoder_pb2.ListModelsRequest(), timeout
        )
        return response.default_model

    async def model_info(
        self, model: str | None = None, *, version: int = 0, timeout: float | None = None
    ) -> ModelInfo:
        """One model's description; ``None`` means the server's default model, ``version``
        0 the version calls naming none get; see :meth:`Client.model_info`."""
        request = _requests.model_info(model, version)
        return convert.model_info(await self._unary(self._stub.GetModelInfo, request, timeout))

    # --- the admin service (retd.v1.ModelRepository) -----------------------------------------

    async def list_versions(
        self, model: str = "", *, timeout: float | None = None
    ) -> RepositoryListing:
        """Every model version the server knows (only ``model``'s when given); see
        :meth:`Client.list_versions`.

        >>> async def show(client):
        ...     listing = await client.list_versions()
        ...     for row in listing:
        ...         print(row.name, row.version, row.state.value, row.serving)
        >>> asyncio.run(show(AsyncClient()))  # doctest: +SKIP
        ret 1 available False
        ret 2 ready True
        """
        request = _requests.list_versions(model)
        response: repository_pb2.RepositoryListResponse = await self._unary(
            self._admin.List, request, timeout
        )
        return convert.repository_listing(response)

    async def load_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> ModelVersionStatus:
        """Load ``version`` of ``model`` (0: the newest in the repository) and return its
        status once READY; never retried. See :meth:`Client.load_model`.

        >>> async def pin(client):
        ...     await client.load_model("ret", 1, timeout=300)
        ...     return (await client.decode(embedding, model="ret", version=1)).version
        >>> asyncio.run(pin(AsyncClient()))  # doctest: +SKIP
        1
        """
        request = _requests.load_model(model, version)
        response: repository_pb2.LoadModelResponse = await self._unary(
            self._admin.Load, request, timeout
        )
        return convert.version_status(response.status)

    async def unload_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> list[ModelVersionStatus]:
        """Release ``version`` of ``model`` (0: every loaded version) once its calls finish;
        return the versions released. Never retried. See :meth:`Client.unload_model`.

        >>> async def release(client):
        ...     return [row.version for row in await client.unload_model("ret", 1)]
        >>> asyncio.run(release(AsyncClient()))  # doctest: +SKIP
        [1]
        """
        request = _requests.unload_model(model, version)
        response: repository_pb2.UnloadModelResponse = await self._unary(
            self._admin.Unload, request, timeout
        )
        return [convert.version_status(row) for row in response.unloaded]

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The standard ``grpc.health.v1`` status of ``service`` ("" is the whole server)."""
        request = _health.HealthCheckRequest(service=service)
        return _health.health_status(await self._unary(self._health_check, request, timeout))


async def _iterate(
    start: Callable[[], Any],
    convert_one: Callable[[Any], _T],
    failure: list[BaseException] | None = None,
    *,
    secure: bool | None = None,
) -> AsyncGenerator[_T, None]:
    """Start a streaming call, yield converted responses; typed errors; cancel when closed."""
    call = start()
    try:
        async for message in call:
            if failure:
                raise failure[0]
            yield convert_one(message)
        if failure:
            raise failure[0]
    except grpc.RpcError as err:
        if failure:
            raise failure[0] from err
        raise from_rpc_error(err, secure=secure) from err
    finally:
        call.cancel()
