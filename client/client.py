"""The synchronous retd client: :class:`Client`'s calls, each built by the one core
(``_core.Core``) and sent, blocking, by ``_blocking.BlockingClient`` (its channel and
lifecycle)."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence

from ._blocking import BlockingClient
from ._core import DEFAULT_TARGET, call_options
from .convert import EmbeddingLike
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

__all__ = ["DEFAULT_TARGET", "Client"]


class Client(BlockingClient):
    """A blocking client of a retd server.

    Args:
        target: ``host:port`` of the server (any gRPC target string), or several replicas: a
            list of ``host:port`` addresses, one string of them separated by commas, or a
            ``dns:///name:port`` target that resolves to every replica (a Kubernetes headless
            Service). Several replicas get gRPC's ``round_robin`` policy, a health watch of
            each (a draining replica gets no new calls) and gRPC's retries on UNAVAILABLE
            (and on CANCELLED by a replica that is stopping) of the calls safe to repeat:
            ``decode``, ``decode_batch``, ``model_info``, ``list_models``,
            ``list_versions``, and ``generate`` when it has a ``seed`` or ``temperature=0``
            (retried by the client, with gRPC's backoff). Streams, a sampled ``generate``
            without a seed, ``load_model`` and ``unload_model`` are not retried.
        timeout: default deadline of every call, in seconds; ``None`` waits forever. Each
            method's own ``timeout=`` overrides it.
        options: gRPC channel options, e.g. ``[("grpc.max_receive_message_length", 64 << 20)]``;
            a ``grpc.service_config`` of yours replaces the client's balancing and retries.
        channel: use this channel instead of opening one (``target``, ``options`` and
            ``credentials`` are then ignored); the caller keeps ownership: :meth:`close` leaves
            it open.
        credentials: open a secure channel with these; ``None`` means plaintext.
        metadata: sent with every call, e.g. ``[("x-request-source", "batch-job")]``.
        tls: open a TLS channel trusting the system's roots (or ``root_certificates``).
        root_certificates: PEM bytes, or a path to them, of the CA that signed the server's
            certificate; implies ``tls``.
        certificate_chain, private_key: the client's own certificate and key (PEM bytes or
            paths) for servers that require mutual TLS; implies ``tls``.
        token: sent as ``authorization: Bearer <token>`` with every call, the admin calls
            (:meth:`list_versions`, :meth:`load_model`, :meth:`unload_model`) included.
        encoding: how embeddings travel: ``"raw"`` float32 bytes (default) or ``"vector"``.

    Every failed call raises a :class:`~retd.client.errors.RetdError` subclass.

    Example::

        >>> import numpy as np
        >>> from retd.client import Client
        >>> with Client(address, timeout=30) as client:  # address: "127.0.0.1:50051"
        ...     embedding = np.random.default_rng(0).standard_normal(768).astype(np.float32)
        ...     result = client.decode(embedding)
        ...     print(result.finish_reason.value, result.usage.generated_tokens > 0)
        length True
    """

    # --- calls -------------------------------------------------------------------------------

    def decode(
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
        """Decode one embedding to text, greedily (deterministic).

        A generative model generates the text; a phrase bank (a model of kind
        ``"phrase_bank"``) returns its nearest phrase, whole, with its cosine similarity in
        ``result.similarity``. ``result.source`` says which.

        Args:
            embedding: a 1-D array of ``embedding_dim`` floats (numpy, list, tensor, ...).
            model: the model to use; ``None`` means the server's default.
            version: the version of ``model`` to use, as numbered in the server's model
                repository (``MODEL_REPO/<model>/<version>/``); 0 means the one the model
                serves by default (its newest loaded version). A version that is not loaded
                raises :class:`NotFoundError` listing the loaded ones; ``result.version``
                says which version answered.
            max_new_tokens: tokens to generate at most (a byte each, or a BPE piece of a few
                bytes); ``None`` means the model's max_length. A phrase bank ignores it.
            no_repeat_ngram_size: a loop breaker: never generate a token that would repeat a
                token n-gram of this size already in the text. ``None`` takes the server's
                default (the loop breakers are on by default: see the README's "Decoding that
                does not loop"); 0 is off; at most 256 (tokens). A phrase bank checks it and
                ignores it.
            repetition_penalty: a softer loop breaker (CTRL-style): the logit of a token that
                would repeat a token n-gram of ``repetition_ngram_size`` tokens already in the
                text is divided by this (multiplied, when negative). ``None`` takes the
                server's default; 1 is off; at most 10. Plain greedy decoding, loops and all:
                ``no_repeat_ngram_size=0, repetition_penalty=1``.
            repetition_ngram_size: the n-gram size ``repetition_penalty`` looks at; 1
                penalises every token already generated. ``None`` takes the server's default.
            eos_bias: added to the end-of-sequence token's logit at every step: below 0 the
                answer runs longer, above 0 shorter. ``None`` takes the server's default (0,
                off, unless the model's card recommends one); in [-20, 20].
            priority: higher is served first when requests wait for a slot; FIFO among
                equals. ``None`` means 0, the server's default; any int32, negative included.
            hybrid: a :class:`Hybrid`: ask its phrase bank first, and take its phrase when
                the similarity reaches ``min_similarity``; otherwise ``model`` (a generative
                model) generates. ``result.similarity`` is the bank's best either way.
            timeout: deadline of this call in seconds (default: the client's).

        >>> result = client.decode(embedding, max_new_tokens=16)
        >>> result.text == client.decode(embedding, max_new_tokens=16).text  # greedy
        True
        >>> result.model, result.version, result.usage.generated_tokens
        ('ret_v21', 1, 16)
        >>> client.decode(embedding, max_new_tokens=16, no_repeat_ngram_size=6).usage
        Usage(generated_tokens=16)

        With a model repository (here ``ret_v21/1``, the default model, ``ret/1``, ``ret/2``
        and ``faq/1``, a phrase bank; see the README):

        >>> hybrid = Hybrid(phrase_bank="faq", min_similarity=0.9)
        >>> result = client.decode(embedding, hybrid=hybrid)
        >>> result.source, result.model, round(result.similarity, 2)
        (<AnswerSource.PHRASE_BANK: 'phrase_bank'>, 'faq', 0.97)
        >>> client.decode(embedding, model="ret", version=2).version
        2
        """
        return self._send(self._core.decode(embedding, **call_options(locals())), timeout)

    def generate(
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
        """Decode one embedding to text with sampling.

        A phrase bank returns its ``top_k`` nearest phrases in ``result.candidates`` (best
        first, with their cosine similarities; ``result.text`` is the first one's) and
        ignores the sampling arguments, which are checked all the same.

        Args:
            temperature: softmax temperature; ``None`` means 1.0, ``0`` means greedy.
            top_k: keep only the k most likely tokens; ``None``/0 keeps all. For a phrase
                bank: how many candidates to return; ``None``/0 means 5, at most 100.
            top_p: nucleus sampling threshold in (0, 1]; ``None`` means 1.0.
            seed: seed of this request's random stream; ``None`` lets the server pick one
                (returned as ``result.seed``).
            stop: a string or strings that end generation (left out of the text).

        The other arguments are those of :meth:`decode`, ``no_repeat_ngram_size`` (the loop
        breaker) included: it applies to sampled and greedy generation alike.

        >>> result = client.generate(embedding, temperature=0.7, seed=1, max_new_tokens=16)
        >>> again = client.generate(embedding, temperature=0.7, seed=result.seed, max_new_tokens=16)
        >>> again.text == result.text, result.seed
        (True, 1)
        """
        return self._send(self._core.generate(embedding, **call_options(locals())), timeout)

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
    ) -> Generator[StreamChunk, None, None]:
        """Like :meth:`generate`, yielding text deltas as they are generated.

        The call starts at once; the last chunk has ``finish_reason``, ``usage`` and the rest.
        A failure raises its typed error from the iteration; closing the iterator early
        (``.close()``, or leaving a ``for`` loop and dropping it) cancels the call.

        >>> text = ""
        >>> for chunk in client.generate_stream(embedding, seed=0, max_new_tokens=16):
        ...     text += chunk.text  # or print(chunk.text, end="", flush=True)
        >>> text == client.generate(embedding, seed=0, max_new_tokens=16).text, chunk.is_last
        (True, True)
        """
        call = self._core.generate_stream(embedding, **call_options(locals()))
        return self._stream(call, call.request, timeout)

    def decode_batch(
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
        """Decode N embeddings in one call; the items come back in request order.

        ``embeddings`` is a 2-D array ``(N, dim)`` or a sequence of 1-D embeddings. A bad item
        does not fail the call: its :class:`DecodeBatchItem` has ``ok == False`` and a typed
        ``error``; ``item.unwrap()`` returns the result or raises that error. ``priority``,
        ``version``, the loop breakers (``no_repeat_ngram_size``, ``repetition_penalty``,
        ``repetition_ngram_size``), ``eos_bias`` and ``hybrid`` (see :meth:`decode`) apply to
        every item; a
        ``version`` that is not loaded fails the whole call (:class:`NotFoundError`).
        With ``hybrid``, each item's answer says whether the bank or the model gave it.

        >>> items = client.decode_batch(matrix, max_new_tokens=16)  # matrix: 2 rows
        >>> [item.unwrap().text for item in items] == [client.decode(e, max_new_tokens=16).text
        ...                                            for e in matrix]
        True
        >>> items = client.decode_batch([matrix[0], np.zeros(5)], max_new_tokens=16)
        >>> [item.ok for item in items], items[1].error.code.name
        ([True, False], 'INVALID_ARGUMENT')
        """
        return self._send(self._core.decode_batch(embeddings, **call_options(locals())), timeout)

    def decode_stream(
        self,
        items: Iterable[EmbeddingLike | tuple[str, EmbeddingLike]],
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
    ) -> Generator[StreamItem, None, None]:
        """Stream embeddings in, decoded texts out, as they finish (possibly out of order).

        Each of ``items`` is an embedding (its id is then its index, as a string) or a pair
        ``(id, embedding)`` with a ``str`` id. ``items`` is read lazily, so it may be a
        generator. Answers carry the id; a bad item gets an ``error`` and the rest go on.
        If reading or converting ``items`` fails, that exception is raised from the
        iteration. Closing the iterator early cancels the call. ``model``, ``version``,
        ``priority``, the loop breakers and ``hybrid`` (see :meth:`decode`) apply to every
        item; a bad ``priority``, ``version`` or loop breaker raises at once.

        >>> for item in sorted(client.decode_stream([("a", e1), ("b", e2)]), key=lambda i: i.id):
        ...     print(item.id, item.unwrap().usage.generated_tokens > 0)
        a True
        b True
        >>> [item.id for item in client.decode_stream([e1], no_repeat_ngram_size=6)]
        ['0']
        """
        call = self._core.decode_stream(
            **call_options(locals())
        )  # bad arguments raise here, at once
        return self._stream(call, call.requests(items), timeout)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server has loaded (see :meth:`default_model` for the default)."""
        return self._send(self._core.list_models(), timeout)

    def default_model(self, *, timeout: float | None = None) -> str:
        """The name of the model that serves requests naming none."""
        return self._send(self._core.default_model(), timeout)

    def model_info(
        self, model: str | None = None, *, version: int = 0, timeout: float | None = None
    ) -> ModelInfo:
        """One model's description; ``None`` means the server's default model.

        ``version``: one loaded version of it (see :meth:`decode`); 0 means the version calls
        naming none get. ``info.repository_version`` is the version described and
        ``info.serving`` whether calls naming no version get it.

        >>> info = client.model_info()
        >>> info.name, info.embedding_dim, info.trained  # the test server's: seeded, untrained
        ('ret_v21', 768, False)
        >>> info = client.model_info("ret", version=1)
        >>> info.repository_version, info.serving
        (1, False)
        """
        return self._send(self._core.model_info(model, version), timeout)

    # --- the admin service (retd.v1.ModelRepository) -----------------------------------------

    def list_versions(self, model: str = "", *, timeout: float | None = None) -> RepositoryListing:
        """Every model version the server knows: loaded (READY), loading, unloading, failed
        to load (with the reason), or in its model repository but not loaded (AVAILABLE).

        ``model``: only that model's versions; "" lists all. Like every admin call it goes
        to one server: with several replicas, make a client of each to see them all.

        >>> listing = client.list_versions()
        >>> for row in listing:
        ...     print(row.name, row.version, row.state.value)
        faq 1 ready
        ret 1 available
        ret 2 ready
        ret_v21 1 ready
        >>> listing.serving, listing.default_model
        ({'faq': 1, 'ret': 2, 'ret_v21': 1}, 'ret_v21')
        """
        return self._send(self._core.list_versions(model), timeout)

    def load_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> ModelVersionStatus:
        """Load ``version`` of ``model`` from the server's repository, warm it up, and return
        its status once it takes calls (READY). Never retried by the client.

        ``version=0`` loads the newest version in the repository, which then serves calls
        naming no version (with ``--watch``, newer ones replace it); a version named
        stays loaded beside the others until unloaded. A model served from ``--checkpoint``
        is reloaded from its checkpoint. Loading can take a while: give a ``timeout`` that
        allows it.

        Raises :class:`NotFoundError` (no such model or version in the repository),
        :class:`FailedPreconditionError` (it failed to load: the message says why),
        :class:`UnauthenticatedError` / :class:`PermissionDeniedError` (no admin rights).

        >>> status = client.load_model("ret", 1, timeout=300)
        >>> status.state, status.version, status.serving
        (<ModelState.READY: 'ready'>, 1, False)
        >>> client.decode(embedding, model="ret", version=1).version
        1
        """
        return self._send(self._core.load_model(model, version), timeout)

    def unload_model(
        self, model: str, version: int = 0, *, timeout: float | None = None
    ) -> list[ModelVersionStatus]:
        """Stop giving ``version`` of ``model`` (0: every loaded version of it) new calls, wait
        for the calls already on it, release it; return the versions released (AVAILABLE).
        Never retried by the client.

        Unloading a model whole also stops a ``--watch`` from loading it again. Raises
        :class:`NotFoundError` when no such version is loaded.

        >>> [row.version for row in client.unload_model("ret", 1)]
        [1]
        """
        return self._send(self._core.unload_model(model, version), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The standard ``grpc.health.v1`` status of ``service`` ("" is the whole server).

        The result is a ``str`` enum: ``client.health() == "SERVING"`` works.
        """
        return self._send(self._core.health(service), timeout)
