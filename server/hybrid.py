"""Hybrid decoding: a phrase bank answers first, and a generative model when the bank's
nearest phrase is not similar enough (`hybrid.min_similarity`)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator

from retd.model.kinds import PHRASE_BANK_KIND, RET_KIND
from retd.server.config import DecodeDefaults
from retd.server.engine import SequenceRequest, ServingEngine
from retd.server.errors import ErrorKind, ServeError, invalid
from retd.server.handles import SequenceResult
from retd.server.repository import ModelRegistry
from retd.server.requests import SearchParams
from retd.server.responses import decode_response
from retd.server.validation import (
    DecodeOptions,
    greedy_params,
    parse_min_similarity,
    parse_query,
    shorten,
)
from retd.server.versions import ModelVersion
from retd.v1 import decoder_pb2 as pb

# Runs one sequence on a leased model version and returns its result.
Runner = Callable[[ModelVersion, SequenceRequest], Awaitable[SequenceResult]]


def hybrid_of(
    request: pb.DecodeRequest | pb.DecodeBatchRequest | pb.DecodeStreamRequest,
) -> pb.Hybrid | None:
    """The request's hybrid settings when it asks for hybrid decoding."""
    return request.hybrid if request.HasField("hybrid") else None


class HybridDecoder:
    """Answers hybrid Decodes (and items of batches and streams) from `models`, running
    each sequence with `run`."""

    def __init__(
        self,
        models: ModelRegistry,
        run: Runner,
        max_new_tokens_limit: int,
        decode_defaults: Callable[[ServingEngine], DecodeDefaults],
    ) -> None:
        self.models = models
        self._run = run
        self._max_new_tokens_limit = max_new_tokens_limit
        self._decode_defaults = decode_defaults  # a model's, from the servicer

    async def decode(
        self,
        options: DecodeOptions,
        hybrid: pb.Hybrid,
        embedding: pb.Embedding,
        field: str,
        deadline: float | None,
        received_at: float,
    ) -> pb.DecodeResponse:
        """The bank's nearest phrase when its similarity reaches min_similarity, else the
        generative model's text. Everything is checked before the bank is asked."""
        with self._leased(options, hybrid) as (generator, bank):
            min_similarity = parse_min_similarity(hybrid)
            limits = generator.ready_engine.limits(self._max_new_tokens_limit)
            query = parse_query(embedding, field, limits)
            defaults = self._decode_defaults(generator.ready_engine)
            params = greedy_params(
                options.max_new_tokens, "max_new_tokens", limits, options, defaults
            )
            priority = options.priority
            found = await self._run(
                bank, SequenceRequest(query, SearchParams(), deadline=deadline, priority=priority)
            )
            similarity = found.candidates[0].score
            if similarity >= min_similarity:
                return decode_response(found, bank, received_at)
            generated = await self._run(
                generator, SequenceRequest(query, params, deadline=deadline, priority=priority)
            )
            return decode_response(generated, generator, received_at, similarity, earlier=[found])

    @contextlib.contextmanager
    def _leased(
        self, options: DecodeOptions, hybrid: pb.Hybrid
    ) -> Iterator[tuple[ModelVersion, ModelVersion]]:
        """(the generative model, the phrase bank) a hybrid Decode names, checked and leased."""
        name = hybrid.phrase_bank
        banks = self.models.names(PHRASE_BANK_KIND)
        if not name:
            raise invalid(
                f"hybrid.phrase_bank: empty; expected a phrase_bank model, one of {banks}"
            )
        with contextlib.ExitStack() as leases:
            generator = leases.enter_context(self.models.lease(options.model, options.version))
            try:
                bank = leases.enter_context(self.models.lease(name))
            except ServeError as error:
                if error.kind is ErrorKind.NOT_FOUND:
                    raise ServeError(
                        error.kind,
                        f"hybrid.phrase_bank: {shorten(name)!r} is not loaded; expected a "
                        f"phrase_bank model, one of {banks}",
                    ) from None
                raise ServeError(error.kind, f"hybrid.phrase_bank: {error.message}") from None
            self._check(generator, bank, banks)
            yield generator, bank

    def _check(self, generator: ModelVersion, bank: ModelVersion, banks: list[str]) -> None:
        if bank.kind != PHRASE_BANK_KIND:
            raise invalid(
                f"hybrid.phrase_bank: {bank.name!r} is a {bank.kind!r} model; expected a "
                f"phrase_bank model, one of {banks}"
            )
        if generator.kind != RET_KIND:
            raise invalid(
                f"model: {generator.name!r} is a {generator.kind!r} model; hybrid decoding falls "
                f"back to a generative ({RET_KIND!r}) model, one of {self.models.names(RET_KIND)}"
            )
        ours, theirs = bank.ready_engine.description, generator.ready_engine.description
        if (ours.encoder, ours.embedding_dim) != (theirs.encoder, theirs.embedding_dim):
            raise invalid(
                f"hybrid.phrase_bank: {bank.name!r} holds {ours.encoder} embeddings "
                f"({ours.embedding_dim} values) but model {generator.name!r} decodes "
                f"{theirs.encoder} ones ({theirs.embedding_dim}); both must read the same "
                "encoder's embeddings"
            )
