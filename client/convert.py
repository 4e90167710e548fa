"""Conversions between Python values and retd.v1 messages.

Embeddings go out as :class:`decoder_pb2.Embedding`: by default as a ``RawTensor`` of
little-endian float32 bytes (the fast path), or with ``encoding="vector"`` as a
``FloatVector``. Anything :func:`numpy.asarray` understands is accepted: numpy arrays, lists
and tuples of numbers, and objects with ``__array__``; and torch tensors of any float dtype
(float16, bfloat16, float32, float64), on any device, requiring grad or not, recognised by
their methods (this module never imports torch). Every float dtype goes out as float32.

>>> import numpy as np
>>> msg = to_embedding(np.ones(768, dtype=np.float32))
>>> msg.WhichOneof("data"), list(msg.raw.shape), len(msg.raw.data)
('raw', [768], 3072)
>>> to_embedding([0.5, 1.0], encoding="vector").vector.values
[0.5, 1.0]

Only what is unambiguous is checked here (one embedding is 1-D, or 2-D with one row); the
server checks the dimension and the values and names the offending field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeAlias

import numpy as np
from google.protobuf import json_format

from retd.v1 import decoder_pb2, repository_pb2

from .errors import InvalidArgumentError, error_from_code
from .types import (
    AnswerSource,
    Candidate,
    DecodeBatchItem,
    DecodeResult,
    FinishReason,
    GenerateResult,
    ModelInfo,
    ModelLoad,
    ModelState,
    ModelVersionStatus,
    RepositoryListing,
    StreamChunk,
    StreamItem,
    Timing,
    Usage,
)

__all__ = [
    "EmbeddingEncoding",
    "EmbeddingLike",
    "candidate",
    "decode_result",
    "generate_result",
    "model_info",
    "model_load",
    "model_state",
    "repository_listing",
    "stream_chunk",
    "to_array",
    "to_embedding",
    "to_embeddings",
    "version_status",
]

#: One embedding: a 1-D numpy array, a list of floats, a tensor, or a ready ``Embedding``.
EmbeddingLike: TypeAlias = Any
#: How embeddings travel: ``"raw"`` float32 bytes (default, fast) or a ``"vector"`` of floats.
EmbeddingEncoding: TypeAlias = Literal["raw", "vector"]

_LITTLE_F32 = np.dtype("<f4")


def _is_tensor(value: Any) -> bool:
    """A torch tensor (or one like it), told by its methods: the client never imports torch."""
    return all(callable(getattr(value, m, None)) for m in ("detach", "cpu", "float", "numpy"))


def describe(value: Any) -> str:
    """What a caller passed, for error messages: its type, and its shape and dtype if any.

    >>> describe([0.5, "x"]), describe(np.zeros((2, 3), np.float16))
    ('a list of 2 items', 'a numpy.ndarray of shape [2, 3] and dtype float16')
    """
    kind = type(value)
    where = "" if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}."
    what = f"a {where}{kind.__qualname__}"
    if isinstance(value, list | tuple):
        return f"{what} of {len(value)} items"
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{what} of shape {list(shape)} and dtype {dtype}"
    return what


def _tensor_as_numpy(value: Any, name: str) -> np.ndarray:
    """A torch tensor's values as float32 numpy: detached, on the CPU, and as float32 first,
    since numpy has no bfloat16 (``tensor.numpy()`` raises for it)."""
    dtype = str(getattr(value, "dtype", ""))
    if "complex" in dtype or "bool" in dtype:
        raise InvalidArgumentError(f"{name}: expected real numbers, got {describe(value)}")
    try:
        return np.asarray(value.detach().cpu().float().numpy())
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentError(f"{name}: cannot read {describe(value)} ({err})") from err


def to_array(value: EmbeddingLike, *, name: str = "embedding") -> np.ndarray:
    """``value`` as a 1-D little-endian float32 array; raise if it cannot be one embedding.

    A ``(1, dim)`` array is accepted and flattened. Float16, bfloat16 (torch) and float64
    values are converted to float32. Errors start with ``name`` and say what was passed.

    >>> to_array(np.array([[0.5, 1.5]], dtype=np.float16)).tolist()
    [0.5, 1.5]
    """
    if _is_tensor(value):
        array = _tensor_as_numpy(value, name)
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidArgumentError(
                f"{name}: expected an array of numbers, got {describe(value)} ({err})"
            ) from err
    if array.dtype.kind not in "fiu":
        got = describe(value)
        if isinstance(value, list | tuple):
            got += f" (numpy reads it as dtype {array.dtype})"
        raise InvalidArgumentError(f"{name}: expected numbers, got {got}")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise InvalidArgumentError(
            f"{name}: expected one embedding (shape [dim] or [1, dim]), got {describe(value)}"
            + ("" if hasattr(value, "shape") else f" (shape {list(array.shape)})")
        )
    return array.astype(_LITTLE_F32, copy=False)


def to_embedding(
    value: EmbeddingLike, *, encoding: EmbeddingEncoding = "raw", name: str = "embedding"
) -> decoder_pb2.Embedding:
    """One embedding as a ``retd.v1.Embedding`` message (an ``Embedding`` passes through)."""
    if isinstance(value, decoder_pb2.Embedding):
        return value
    array = to_array(value, name=name)
    if encoding == "raw":
        raw = decoder_pb2.RawTensor(data=array.tobytes(), shape=[array.shape[0]])
        return decoder_pb2.Embedding(raw=raw)
    if encoding == "vector":
        return decoder_pb2.Embedding(vector=decoder_pb2.FloatVector(values=array.tolist()))
    raise ValueError(f"encoding must be 'raw' or 'vector', not {encoding!r}")


def to_embeddings(
    values: Iterable[EmbeddingLike] | np.ndarray,
    *,
    encoding: EmbeddingEncoding = "raw",
    name: str = "embeddings",
) -> list[decoder_pb2.Embedding]:
    """Several embeddings: a 2-D array ``(N, dim)`` or a sequence of 1-D embeddings.

    Items of a sequence are converted one by one, so items of different lengths still go to
    the server, which reports each bad item in that item's own answer.
    """
    if isinstance(values, decoder_pb2.Embedding | str | bytes):
        raise InvalidArgumentError(f"{name}: expected several embeddings, got one")
    if not isinstance(values, list | tuple) and (
        _is_tensor(values) or hasattr(values, "__array__")
    ):
        array = _tensor_as_numpy(values, name) if _is_tensor(values) else np.asarray(values)
        if array.ndim != 2:
            raise InvalidArgumentError(
                f"{name}: expected a 2-D array (N, dim) or a sequence of embeddings, "
                f"got {describe(values)}"
            )
        values = list(array)
    items = list(values)
    if items and all(isinstance(v, int | float | np.number) for v in items):
        raise InvalidArgumentError(
            f"{name}: expected a sequence of embeddings, got a single list of numbers"
        )
    return [to_embedding(v, encoding=encoding, name=f"{name}[{i}]") for i, v in enumerate(items)]


# --- responses -----------------------------------------------------------------------------

_FINISH: dict[int, FinishReason] = {
    decoder_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    decoder_pb2.FINISH_REASON_EOS: FinishReason.EOS,
    decoder_pb2.FINISH_REASON_STOP: FinishReason.STOP,
}


def finish_reason(value: int) -> FinishReason:
    """The proto enum number as a :class:`FinishReason`."""
    return _FINISH.get(value, FinishReason.UNSPECIFIED)


def usage(msg: decoder_pb2.Usage) -> Usage:
    return Usage(generated_tokens=msg.generated_tokens)


def timing(msg: decoder_pb2.Timing) -> Timing:
    return Timing(queue_ms=msg.queue_ms, compute_ms=msg.compute_ms, total_ms=msg.total_ms)


_SOURCE = {
    decoder_pb2.ANSWER_SOURCE_GENERATED: AnswerSource.GENERATED,
    decoder_pb2.ANSWER_SOURCE_PHRASE_BANK: AnswerSource.PHRASE_BANK,
    decoder_pb2.ANSWER_SOURCE_EDITED: AnswerSource.EDITED,
}


def decode_result(msg: decoder_pb2.DecodeResponse) -> DecodeResult:
    return DecodeResult(
        text=msg.text,
        finish_reason=finish_reason(msg.finish_reason),
        usage=usage(msg.usage),
        timing=timing(msg.timing),
        model=msg.model,
        source=_SOURCE.get(msg.source, AnswerSource.UNSPECIFIED),
        similarity=msg.similarity if msg.HasField("similarity") else None,
        version=msg.version,
    )


def candidate(msg: decoder_pb2.Candidate) -> Candidate:
    return Candidate(text=msg.text, score=msg.score, index=msg.index)


def _generation_summary(
    msg: decoder_pb2.GenerateResponse | decoder_pb2.GenerateChunk,
) -> dict[str, Any]:
    """The fields a GenerateResponse and a stream's last GenerateChunk share."""
    return {
        "finish_reason": finish_reason(msg.finish_reason),
        "usage": usage(msg.usage),
        "timing": timing(msg.timing),
        "mean_logprob": msg.mean_logprob,
        "model": msg.model,
        "seed": msg.seed,
        "candidates": [candidate(c) for c in msg.candidates],
        "version": msg.version,
    }


def generate_result(msg: decoder_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(text=msg.text, token_ids=list(msg.token_ids), **_generation_summary(msg))


def stream_chunk(msg: decoder_pb2.GenerateChunk) -> StreamChunk:
    last = msg.finish_reason != decoder_pb2.FINISH_REASON_UNSPECIFIED
    if not last:
        return StreamChunk(text=msg.text, token_ids=list(msg.token_ids))
    return StreamChunk(text=msg.text, token_ids=list(msg.token_ids), **_generation_summary(msg))


def batch_item(msg: decoder_pb2.DecodeBatchResult) -> DecodeBatchItem:
    if msg.WhichOneof("outcome") == "response":
        return DecodeBatchItem(result=decode_result(msg.response))
    return DecodeBatchItem(error=error_from_code(msg.error.code, msg.error.message))


def stream_item(msg: decoder_pb2.DecodeStreamResponse) -> StreamItem:
    if msg.WhichOneof("outcome") == "response":
        return StreamItem(id=msg.id, result=decode_result(msg.response))
    return StreamItem(id=msg.id, error=error_from_code(msg.error.code, msg.error.message))


def model_info(msg: decoder_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=msg.name,
        version=msg.version,
        architecture=msg.architecture,
        parameter_count=msg.parameter_count,
        embedding_dim=msg.embedding_dim,
        vocab_size=msg.vocab_size,
        max_length=msg.max_length,
        dtype=msg.dtype,
        device=msg.device,
        checkpoint_sha256=msg.checkpoint_sha256,
        card=whole_numbers_as_ints(json_format.MessageToDict(msg.card)),
        trained=msg.trained,
        encoder=msg.encoder,
        load=model_load(msg.load),
        kind=msg.kind or "ret",  # a server older than phrase banks serves RET only
        phrase_count=msg.phrase_count,
        repository_version=msg.repository_version,
        serving=msg.serving,
    )


_EXACT_INTS = 2**53  # beyond it a double no longer holds every integer


def whole_numbers_as_ints(value: Any) -> Any:
    """JSON-like data with its whole floats as ints: a protobuf ``Struct`` (a model's card)
    holds every number as a double, so a card's ``"n_head": 2`` arrives as ``2.0``.

    >>> whole_numbers_as_ints({"n_head": 2.0, "lr": 0.0003, "sizes": [1.0, 2.5]})
    {'n_head': 2, 'lr': 0.0003, 'sizes': [1, 2.5]}
    """
    if isinstance(value, dict):
        return {key: whole_numbers_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers_as_ints(item) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INTS:
        return int(value)
    return value


def model_load(msg: decoder_pb2.ModelLoad) -> ModelLoad:
    return ModelLoad(
        waiting=msg.waiting,
        max_queue_size=msg.max_queue_size,
        running=msg.running,
        max_batch_size=msg.max_batch_size,
        batching=msg.batching,
        max_wait_ms=msg.max_wait_ms,
    )


# --- the admin service ---------------------------------------------------------------------

_STATE: dict[int, ModelState] = {
    repository_pb2.MODEL_STATE_AVAILABLE: ModelState.AVAILABLE,
    repository_pb2.MODEL_STATE_LOADING: ModelState.LOADING,
    repository_pb2.MODEL_STATE_READY: ModelState.READY,
    repository_pb2.MODEL_STATE_UNLOADING: ModelState.UNLOADING,
    repository_pb2.MODEL_STATE_FAILED: ModelState.FAILED,
}


def model_state(value: int) -> ModelState:
    """The proto enum number as a :class:`ModelState`."""
    return _STATE.get(value, ModelState.UNSPECIFIED)


def version_status(msg: repository_pb2.ModelVersionStatus) -> ModelVersionStatus:
    return ModelVersionStatus(
        name=msg.name,
        version=msg.version,
        state=model_state(msg.state),
        reason=msg.reason,
        kind=msg.kind,
        path=msg.path,
        serving=msg.serving,
        active_calls=msg.active_calls,
    )


def repository_listing(msg: repository_pb2.RepositoryListResponse) -> RepositoryListing:
    return RepositoryListing(
        versions=[version_status(m) for m in msg.models],
        repository=msg.repository,
        default_model=msg.default_model,
    )
