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

A server with a model repository (``retd serve --model-repo DIR``) serves versions of its
models: ``version=`` picks one on every call (0, the default, means the newest loaded), and
the admin calls list, load and unload them::

    >>> with Client("127.0.0.1:50051", token="s3cret") as client:  # doctest: +SKIP
    ...     for row in client.list_versions():
    ...         print(row.name, row.version, row.state.value, row.serving)
    ...     client.load_model("ret", 1)                 # pin version 1 beside the newest
    ...     print(client.decode(embedding, model="ret", version=1).version)   # 1
    ...     client.unload_model("ret", 1)

:class:`AsyncClient` has the same methods for asyncio. Failures raise a
:class:`RetdError` subclass per status code (:class:`InvalidArgumentError`,
:class:`NotFoundError`, ...). The ``retd`` command line (``retd --help``) wraps this client.
"""

from .async_client import AsyncClient
from .client import DEFAULT_TARGET, Client
from .errors import (
    DeadlineExceededError,
    FailedPreconditionError,
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
    ModelState,
    ModelVersionStatus,
    RepositoryListing,
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
    "FailedPreconditionError",
    "FinishReason",
    "GenerateResult",
    "HealthStatus",
    "Hybrid",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelLoad",
    "ModelState",
    "ModelVersionStatus",
    "NotFoundError",
    "PermissionDeniedError",
    "RepositoryListing",
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
