"""Requests for the engines: a Decode (or an item of a batch or stream) and a Generate,
checked, as the `SequenceRequest` an engine of either kind runs."""

from __future__ import annotations

import time
from typing import Protocol

import grpc

from retd.model.checkpoint import PHRASE_BANK_KIND
from retd.model.generation import SamplingParams
from retd.server.config import DecodeDefaults
from retd.server.engine import Engine, SequenceRequest
from retd.server.validation import (
    ModelLimits,
    greedy_params,
    loop_breakers,
    parse_bank_generate,
    parse_embedding,
    parse_generate,
    parse_query,
)
from retd.v1 import decoder_pb2 as pb

# A phrase bank's sequences: one step, no token generated.
BANK_PARAMS = SamplingParams(max_new_tokens=1)


class DecodeOptions(Protocol):
    """What a Decode, a DecodeBatch and a DecodeStream item say about decoding."""

    model: str
    version: int
    max_new_tokens: int
    priority: int
    no_repeat_ngram_size: int
    repetition_penalty: float
    repetition_ngram_size: int

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 (protobuf's name)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """When the call's deadline passes, on the monotonic clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def model_limits(engine: Engine, max_new_tokens_limit: int = 0) -> ModelLimits:
    model = engine.description
    encoder = model.encoder or "sentence encoder"
    if 0 < max_new_tokens_limit < model.max_length:
        return ModelLimits(
            engine.name,
            model.embedding_dim,
            max_new_tokens_limit,
            encoder,
            "the server's max_new_tokens_limit",
        )
    return ModelLimits(engine.name, model.embedding_dim, model.max_length, encoder)


def decode_request(
    engine: Engine,
    embedding: pb.Embedding,
    field: str,
    options: DecodeOptions,
    deadline: float | None,
    max_new_tokens_limit: int,
    defaults: DecodeDefaults,
) -> SequenceRequest:
    """A Decode (or an item of a batch or stream) for `engine`, checked. A phrase bank
    returns its phrase whole: max_new_tokens and the loop breakers do not apply to it
    (the latter are checked all the same)."""
    limits = model_limits(engine, max_new_tokens_limit)
    priority = options.priority
    if engine.kind == PHRASE_BANK_KIND:
        query = parse_query(embedding, field, limits)
        loop_breakers(options, defaults)
        return SequenceRequest(query, BANK_PARAMS, 0, deadline=deadline, priority=priority)
    return SequenceRequest(
        embedding=parse_embedding(embedding, field, limits),
        params=greedy_params(options.max_new_tokens, "max_new_tokens", limits, options, defaults),
        seed=0,
        deadline=deadline,
        priority=priority,
    )


def generate_request(
    request: pb.GenerateRequest,
    engine: Engine,
    stream: bool,
    deadline: float | None,
    max_new_tokens_limit: int,
) -> SequenceRequest:
    """A Generate (or a GenerateStream) for `engine`, checked. A phrase bank returns its
    top_k nearest phrases as candidates."""
    limits = model_limits(engine, max_new_tokens_limit)
    if engine.kind == PHRASE_BANK_KIND:
        query = parse_query(request.embedding, "embedding", limits)
        candidates, seed = parse_bank_generate(request)
        return SequenceRequest(
            query,
            BANK_PARAMS,
            seed,
            stream=stream,
            deadline=deadline,
            priority=request.priority,
            candidates=candidates,
        )
    embedding = parse_embedding(request.embedding, "embedding", limits)
    params, seed = parse_generate(request, limits)
    return SequenceRequest(
        embedding,
        params,
        seed,
        stream=stream,
        deadline=deadline,
        priority=request.priority,
    )
