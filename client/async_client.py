"""The asyncio retd client (``grpc.aio``): :class:`AsyncClient` sends the calls its core
builds (``_core.Core``), awaiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from ._core import (
    DEFAULT_TARGET,
    ClientBase,
    Core,
    Stream,
    Unary,
    call_options,
    constructor_options,
    insecure_or_secure,
    stream_error,
)
from ._security import PemSource
from .convert import EmbeddingEncoding, EmbeddingLike
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

R = TypeVar("R")

_open_channel = insecure_or_secure(grpc.aio.insecure_channel, grpc.aio.secure_channel)


class AsyncClient(ClientBase):
    """An asyncio client of a retd server: the methods of :class:`Client` as coroutines.

    The streaming methods return async iterators. Create it inside a running event loop
    (``grpc.aio`` channels belong to one loop). The arguments are those of :class:`Client`,
    several replicas included (balanced and retried by the same rules).

    Example::

        >>> import asyncio, numpy as np
        >>> from retd.client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient(address) as client:  # address: "127.0.0.1:50051"
        ...         embedding = np.random.randn(768).astype(np.float32)
        ...         print("greedy:", (await client.decode(embedding)).text)
        ...         async for chunk in client.generate_stream(embedding, seed=0):
        ...             print(chunk.text, end="", flush=True)
        >>> asyncio.run(main())
        greedy: ...

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
        self._core = Core(**constructor_options(locals()), open_channel=_open_channel)
        self.channel: grpc.aio.Channel = self._core.channel

    # --- lifecycle ---------------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (unless it was passed in); calls in flight are cancelled."""
        if self._core.owns_channel:
            await self.channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; raise :class:`UnavailableError` on timeout."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise self._core.not_ready(timeout) from None

    # --- sending -----------------------------------------------------------------------------

    async def _send(self, call: Unary[R], timeout: float | None) -> R:
        """Make a unary call, as :meth:`Client._send` does, awaiting."""
        attempts = self._core.attempts(call, timeout)
        while True:
            try:
                response = await call.method(
                    call.request, timeout=attempts.timeout, metadata=self._core.metadata()
                )
            except grpc.RpcError as err:
                await asyncio.sleep(attempts.backoff(err))  # raises the typed error if not retried
            else:
                return call.convert(response)

    def _stream(
        self, call: Stream[R], request: Callable[[], Any], timeout: float | None
    ) -> AsyncGenerator[R, None]:
        """A streaming call that starts on the first iteration; its converted responses."""
        deadline = self._core.deadline(timeout)
        return _iterate(
            lambda: call.method(request(), timeout=deadline, metadata=self._core.metadata()),
            call,
            self._core.secure,
        )

    # --- calls -------------------------------------------------------------------------------

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
        eos_bias: float | None = None,
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
        breakers, and ``eos_bias``, as on :meth:`Client.decode`. On the decode forms ``None``
        takes the server's default (the breakers are on by default); ``generate`` takes
        ``no_repeat_ngram_size`` only, ``None``/0 being off there.

        >>> async def unlooped():
        ...     async with AsyncClient(address) as client:
        ...         return await client.decode(embedding, max_new_tokens=16, no_repeat_ngram_size=6)
        >>> asyncio.run(unlooped()).usage
        Usage(generated_tokens=16)
        """
        return await self._send(self._core.decode(embedding, **call_options(locals())), timeout)

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
        return await self._send(self._core.generate(embedding, **call_options(locals())), timeout)

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
        call = self._core.generate_stream(embedding, **call_options(locals()))
        return self._stream(call, lambda: call.request, timeout)

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
        eos_bias: float | None = None,
        priority: int | None = None,
        hybrid: Hybrid | None = None,
        timeout: float | None = None,
    ) -> list[DecodeBatchItem]:
        """Decode N embeddings in one call, in request order; see :meth:`Client.decode_batch`."""
        return await self._send(
            self._core.decode_batch(embeddings, **call_options(locals())), timeout
        )

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
        eos_bias: float | None = None,
        priority: int | None = None,
        hybrid: Hybrid | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[StreamItem, None]:
        """Stream embeddings in and texts out; see :meth:`Client.decode_stream`.

        ``items`` may also be an async iterable.
        """
        call = self._core.decode_stream(
            **call_options(locals())
        )  # bad arguments raise here, at once
        return self._stream(call, lambda: call.arequests(items), timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server has loaded."""
        return await self._send(self._core.list_models(), timeout)

    async def default_model(self, *, timeout: float | None = None) -> str:
        """The name of the model that serves requests naming none."""
        return await self._send(self._core.default_model(), timeout)

    async def model_info(
        self, model: str | None = None, *, version: int = 0, timeout: float | None = None
    ) -> ModelInfo:
        """One model's description; ``None`` means the server's default model, ``version``
        0 the version calls naming none get; see :meth:`Client.model_info`."""
        return await self._send(self._core.model_info(model, version), timeout)

    # --- the admin service (retd.v1.ModelRepository) -----------------------------------------

    async def list_versions(
        self, model: str = "", *, timeout: float | None = None
    ) -> RepositoryListing:
        """Every model version the server knows (only ``model``'s when given); see
        :meth:`Client.list_versions`.

        >>> async def show():
        ...     async with AsyncClient(address) as client:
        ...         for row in await client.list_versions("ret"):
        ...             print(row.name, row.version, row.state.value, row.serving)
        >>> asyncio.run(show())
        ret 1 available False
        ret 2 ready True
        """
        return await self._send(self._core.list_versions(model), timeout)

    async def load_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> ModelVersionStatus:
        """Load ``version`` of ``model`` (0: the newest in the repository) and return its
        status once READY; never retried. See :meth:`Client.load_model`.

        >>> async def pin():
        ...     async with AsyncClient(address) as client:
        ...         await client.load_model("ret", 1, timeout=300)
        ...         return (await client.decode(embedding, model="ret", version=1)).version
        >>> asyncio.run(pin())
        1
        """
        return await self._send(self._core.load_model(model, version), timeout)

    async def unload_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> list[ModelVersionStatus]:
        """Release ``version`` of ``model`` (0: every loaded version) once its calls finish;
        return the versions released. Never retried. See :meth:`Client.unload_model`.

        >>> async def release():
        ...     async with AsyncClient(address) as client:
        ...         return [row.version for row in await client.unload_model("ret", 1)]
        >>> asyncio.run(release())
        [1]
        """
        return await self._send(self._core.unload_model(model, version), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The standard ``grpc.health.v1`` status of ``service`` ("" is the whole server)."""
        return await self._send(self._core.health(service), timeout)


async def _iterate(
    start: Callable[[], Any], stream: Stream[R], secure: bool | None
) -> AsyncGenerator[R, None]:
    """Start a streaming call, yield converted responses; typed errors; cancel when closed."""
    failure = stream.failure
    call = start()
    try:
        async for message in call:
            if failure:
                raise failure[0]
            yield stream.convert(message)
        if failure:
            raise failure[0]
    except grpc.RpcError as err:
        raise stream_error(err, failure, secure) from err
    finally:
        call.cancel()
