"""The thin retd client: sentence embeddings in, text out, over gRPC.

Needs only ``grpcio``, ``protobuf`` and ``numpy`` (never torch). Start a server with
``retd serve``, then::

    >>> import numpy as np
    >>> from retd.client import Client
    >>> embedding = np.random.default_rng(0).standard_normal(768).astype(np.float32)
    >>> with Client("127.0.0.1:50051", timeout=30) as client:  # doctest: +SKIP
    ...     print(client.health())                      # SERVING
    ...     print(client.decode(embedding).text)        # greedy
    ...     result = client.generate(embedding, temperature=0.8, seed=7)
    ...     for chunk in client.generate_stream(embedding, seed=result.seed):
    ...         print(chunk.text, end="", flush=True)   # the same text, streamed
    ...     for item in client.decode_batch(np.stack([embedding, embedding])):
    ...         print(item.unwrap().text if item.ok else item.error)

:class:`AsyncClient` has the same methods for asyncio. Failures raise a
:class:`RetdError` subclass per status code (:class:`InvalidArgumentError`,
:class:`NotFoundError`, ...). The ``retd`` command line (``retd --help``) wraps this client.
"""

from .async_client import AsyncClient
from .client import DEFAULT_TARGET, Client
from .errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    RetdError,
    UnauthenticatedError,
    UnavailableError,
    UnknownError,
    from_rpc_error,
)
from .types import (
    AnswerSource,
    Candidate,
    DecodeBatchItem,
    DecodeResult,
    FinishReason,
    GenerateResult,
    HealthStatus,
    Hybrid,
    ModelInfo,
    ModelLoad,
    StreamChunk,
    StreamItem,
    Timing,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AnswerSource",
    "AsyncClient",
    "Candidate",
    "Client",
    "DecodeBatchItem",
    "DecodeResult",
    "DeadlineExceededError",
    "FinishReason",
    "GenerateResult",
    "HealthStatus",
    "Hybrid",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelLoad",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetdError",
    "StreamChunk",
    "StreamItem",
    "Timing",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownError",
    "Usage",
    "from_rpc_error",
]
