"""Request messages, built the same way for :class:`Client` and :class:`AsyncClient`."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from retd.v1 import decoder_pb2, repository_pb2

from .convert import EmbeddingEncoding, EmbeddingLike, to_embedding, to_embeddings
from .errors import InvalidArgumentError
from .types import Hybrid

__all__ = [
    "MAX_NO_REPEAT_NGRAM_SIZE",
    "check_no_repeat_ngram_size",
    "check_priority",
    "check_version",
    "decode",
    "loop_breakers",
    "decode_batch",
    "generate",
    "list_versions",
    "load_model",
    "model_info",
    "split_stream_item",
    "stream_item",
    "unload_model",
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


def check_version(value: int | None) -> int:
    """``version`` as a uint64; ``None`` and 0 mean the model's newest loaded version."""
    number = _uint("version", value)
    if number >= 2**64:
        raise InvalidArgumentError(f"version: expected an integer < 2**64, got {value!r}")
    return number


#: The largest ``no_repeat_ngram_size`` the server takes (tokens).
MAX_NO_REPEAT_NGRAM_SIZE = 256


def check_no_repeat_ngram_size(value: int | None) -> int:
    """``no_repeat_ngram_size`` as a uint32; ``None`` and 0 mean off."""
    number = _uint("no_repeat_ngram_size", value)
    if number > MAX_NO_REPEAT_NGRAM_SIZE:
        raise InvalidArgumentError(
            f"no_repeat_ngram_size: {number} is too large; expected 0 (off) to "
            f"{MAX_NO_REPEAT_NGRAM_SIZE} tokens"
        )
    return number


#: The largest ``repetition_penalty`` the server takes.
MAX_REPETITION_PENALTY = 10.0
#: The largest ``abs(eos_bias)`` the server takes.
MAX_EOS_BIAS = 20.0


def loop_breakers(
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    repetition_ngram_size: int | None = None,
    eos_bias: float | None = None,
) -> dict[str, int | float]:
    """The decode forms' loop breakers and EOS bias as request fields, checked: only those
    given, so that the server applies its default to the others (``None``: the server's
    default)."""
    fields: dict[str, int | float] = {}
    if no_repeat_ngram_size is not None:
        fields["no_repeat_ngram_size"] = check_no_repeat_ngram_size(no_repeat_ngram_size)
    if repetition_penalty is not None:
        fields["repetition_penalty"] = _number_in(
            "repetition_penalty", repetition_penalty, 1, MAX_REPETITION_PENALTY, off=1
        )
    if repetition_ngram_size is not None:
        size = _uint("repetition_ngram_size", repetition_ngram_size)
        if not 1 <= size <= MAX_NO_REPEAT_NGRAM_SIZE:
            raise InvalidArgumentError(
                f"repetition_ngram_size: expected 1 (every token generated) to "
                f"{MAX_NO_REPEAT_NGRAM_SIZE} tokens, got {repetition_ngram_size!r}"
            )
        fields["repetition_ngram_size"] = size
    if eos_bias is not None:
        fields["eos_bias"] = _number_in("eos_bias", eos_bias, -MAX_EOS_BIAS, MAX_EOS_BIAS, off=0)
    return fields


def _number_in(name: str, value: object, low: float, high: float, off: float) -> float:
    """`value` as a float in [low, high] (a bool or a string is not a number here)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool | str | bytes) or not low <= number <= high:
        raise InvalidArgumentError(
            f"{name}: expected a number in [{low:g}, {high:g}] ({off:g} = off), got {value!r}"
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
    version: int | None = 0,
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    repetition_ngram_size: int | None = None,
    eos_bias: float | None = None,
) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
        hybrid=_hybrid(hybrid),
        version=check_version(version),
        **loop_breakers(no_repeat_ngram_size, repetition_penalty, repetition_ngram_size, eos_bias),  # type: ignore[arg-type]
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
    version: int | None = 0,
    no_repeat_ngram_size: int | None = None,
) -> decoder_pb2.GenerateRequest:
    """Unset (``None``) optional fields stay unset, so the server applies its defaults."""
    request = decoder_pb2.GenerateRequest(
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        top_k=_uint("top_k", top_k),
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        priority=check_priority(priority),
        version=check_version(version),
        no_repeat_ngram_size=check_no_repeat_ngram_size(no_repeat_ngram_size),
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
    version: int | None = 0,
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    repetition_ngram_size: int | None = None,
    eos_bias: float | None = None,
    hybrid: Hybrid | None = None,
) -> decoder_pb2.DecodeBatchRequest:
    return decoder_pb2.DecodeBatchRequest(
        model=model or "",
        embeddings=to_embeddings(embeddings, encoding=encoding),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
        version=check_version(version),
        **loop_breakers(no_repeat_ngram_size, repetition_penalty, repetition_ngram_size, eos_bias),  # type: ignore[arg-type]
        hybrid=_hybrid(hybrid),
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
    version: int | None = 0,
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    repetition_ngram_size: int | None = None,
    eos_bias: float | None = None,
    hybrid: Hybrid | None = None,
) -> decoder_pb2.DecodeStreamRequest:
    item_id, embedding = split_stream_item(index, item)
    return decoder_pb2.DecodeStreamRequest(
        id=item_id,
        model=model or "",
        embedding=to_embedding(embedding, encoding=encoding, name=f"items[{index}]"),
        max_new_tokens=_uint("max_new_tokens", max_new_tokens),
        priority=check_priority(priority),
        version=check_version(version),
        **loop_breakers(no_repeat_ngram_size, repetition_penalty, repetition_ngram_size, eos_bias),  # type: ignore[arg-type]
        hybrid=_hybrid(hybrid),
    )


def model_info(model: str | None, version: int | None = 0) -> decoder_pb2.GetModelInfoRequest:
    return decoder_pb2.GetModelInfoRequest(
        model=_model_name(model, required=False), version=check_version(version)
    )


# --- the admin service ---------------------------------------------------------------------


def _model_name(model: str | None, *, required: bool) -> str:
    """``model`` as the request's string; the server checks that it names a model."""
    if model is None and not required:
        return ""
    if not isinstance(model, str):
        raise InvalidArgumentError(f"model: expected a model name (str), got {model!r}")
    return model


def list_versions(model: str | None) -> repository_pb2.RepositoryListRequest:
    return repository_pb2.RepositoryListRequest(model=_model_name(model, required=False))


def load_model(model: str, version: int | None) -> repository_pb2.LoadModelRequest:
    return repository_pb2.LoadModelRequest(
        model=_model_name(model, required=True), version=check_version(version)
    )


def unload_model(model: str, version: int | None) -> repository_pb2.UnloadModelRequest:
    return repository_pb2.UnloadModelRequest(
        model=_model_name(model, required=True), version=check_version(version)
    )
