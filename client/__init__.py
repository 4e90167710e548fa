"""The thin retd client: sentence embeddings in, text out, over gRPC.

Needs only ``grpcio``, ``protobuf`` and ``numpy`` (never torch). Start a server with
``retd serve``, then::

    >>> import numpy as np
    >>> from retd.client import Client
    >>> embedding = np.random.default_rng(0).standard_normal(768).astype(np.float32)
    >>> with Client(address, timeout=30) as client:  # address: "127.0.0.1:50051"
    ...     print(client.health())
    ...     print("greedy:", client.decode(embedding).text)
    ...     result = client.generate(embedding, temperature=0.8, seed=7)
    ...     streamed = client.generate_stream(embedding, temperature=0.8, seed=result.seed)
    ...     print("".join(chunk.text for chunk in streamed) == result.text)  # the same text
    ...     for item in client.decode_batch([embedding, np.zeros(3)]):
    ...         print(item.unwrap().finish_reason.value if item.ok else item.error)
    SERVING
    greedy: ...
    True
    length
    INVALID_ARGUMENT: ...

A server with a model repository (``retd serve --model-repo DIR``) serves versions of its
models: ``version=`` picks one on every call (0, the default, means the newest loaded), and
the admin calls list, load and unload them (with an admin token when the server asks for
one)::

    >>> with Client(address, token="s3cret") as client:
    ...     for row in client.list_versions("ret"):
    ...         print(row.name, row.version, row.state.value, row.serving)
    ...     status = client.load_model("ret", 1, timeout=300)  # pin version 1 beside the newest
    ...     print(client.decode(embedding, model="ret", version=1).version)
    ...     released = client.unload_model("ret", 1)
    ret 1 available False
    ret 2 ready True
    1

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
