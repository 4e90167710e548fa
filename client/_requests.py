"""Request messages, built the same way for :class:`Client` and :class:`AsyncClient`."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from retd.v1 import decoder_pb2

from .convert import EmbeddingEncoding, EmbeddingLike, to_embedding, to_embeddings
from .errors import InvalidArgumentError
from .types import Hybrid

__all__ = [
    "check_priority",
    "decode",
    "decode_batch",
    "generate",
    "split_stream_item",
    "stream_item",
]


def _uint(name: str, value: int | None) -> int:
    if value is None:
        return 0
    try:
        number = operator.index(value)
    except TypeError:
        number = -1
    if isinstance(value, bool) or number < 0:
        raise InvalidArgumentError(f"{name}: expected an integer >= 0, got {value!r}")
    return number


def check_priority(value: int | None) -> int:
    """``priority`` as an int32; ``None`` means 0 (the server's default)."""
    if value is None:
        return 0
    try:
        number = operator.index(value)
    except TypeError:
        number = 2**31  # out of range: refused below
    if isinstance(value, bool) or not -(2**31) <= number < 2**31:
        raise InvalidArgumentError(
            f"priority: expected an integer in [-2**31, 2**31 - 1], got {value!r}"
        )
    return number


def _hybrid(value: Hybrid | None) -> decoder_pb2.Hybrid | None:
    """The request's hybrid message; the server checks the bank and the range."""
    if value is None:
        return None
    if not isinstance(value, Hybrid):
        raise InvalidArgumentError(
            f"hybrid: expected a retd.client.Hybrid(phrase_bank=..., min_similarity=...), "
            f"got {value!r}"
        )
    try:
        min_similarity = float(value.min_similarity)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"hybrid.min_similarity: expected a number, got {value.min_similarity!r}"
        ) from None
    return decoder_pb2.Hybrid(phrase_bank=value.phrase_bank, min_similarity=min_similarity)


def decode(
    embedding: EmbeddingLike,
    *,
    model: str | None,
    max_new_tokens: int | None,
    encoding: EmbeddingEncoding,
    priority: int | None = None,
    hybrid: Hybrid | None = None,
) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
        hybrid=_hybrid(hybrid),
    )


def generate(
    embedding: EmbeddingLike,
    *,
    model: str | None,
    max_new_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    encoding: EmbeddingEncoding,
    priority: int | None = None,
) -> decoder_pb2.GenerateRequest:
    """Unset (``None``) optional fields stay unset, so the server applies its defaults."""
    request = decoder_pb2.GenerateRequest(
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        top_k=_uint("top_k", top_k),
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        priority=check_priority(priority),
    )
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = _uint("seed", seed)
    return request


def decode_batch(
    embeddings: Iterable[EmbeddingLike],
    *,
    model: str | None,
    max_new_tokens: int | None,
    encoding: EmbeddingEncoding,
    priority: int | None = None,
) -> decoder_pb2.DecodeBatchRequest:
    return decoder_pb2.DecodeBatchRequest(
        model=model or "",
        embeddings=to_embeddings(embeddings, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
    )


def split_stream_item(index: int, item: object) -> tuple[str, EmbeddingLike]:
    """``(id, embedding)`` of one :meth:`Client.decode_stream` input; the id defaults to the index.

    An item is an embedding, or a pair ``(id, embedding)`` whose id is a ``str``.
    """
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    return str(index), item


def stream_item(
    index: int,
    item: object,
    *,
    model: str | None,
    max_new_tokens: int | None,
    encoding: EmbeddingEncoding,
    priority: int | None = None,
) -> decoder_pb2.DecodeStreamRequest:
    item_id, embedding = split_stream_item(index, item)
    return decoder_pb2.DecodeStreamRequest(
        id=item_id,
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding, name=f"items[{index}]"),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
    )
