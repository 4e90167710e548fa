from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class AnswerSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_SOURCE_UNSPECIFIED: _ClassVar[AnswerSource]
    ANSWER_SOURCE_GENERATED: _ClassVar[AnswerSource]
    ANSWER_SOURCE_PHRASE_BANK: _ClassVar[AnswerSource]
    ANSWER_SOURCE_EDITED: _ClassVar[AnswerSource]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
ANSWER_SOURCE_UNSPECIFIED: AnswerSource
ANSWER_SOURCE_GENERATED: AnswerSource
ANSWER_SOURCE_PHRASE_BANK: AnswerSource
ANSWER_SOURCE_EDITED: AnswerSource

class FloatVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class RawTensor(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("vector", "raw")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    vector: FloatVector
    raw: RawTensor
    def __init__(self, vector: _Optional[_Union[FloatVector, _Mapping]] = ..., raw: _Optional[_Union[RawTensor, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("generated_tokens",)
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    generated_tokens: int
    def __init__(self, generated_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "embedding", "max_new_tokens", "priority", "hybrid", "version", "no_repeat_ngram_size", "repetition_penalty", "repetition_ngram_size", "eos_bias")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HYBRID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_BIAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    embedding: Embedding
    max_new_tokens: int
    priority: int
    hybrid: Hybrid
    version: int
    no_repeat_ngram_size: int
    repetition_penalty: float
    repetition_ngram_size: int
    eos_bias: float
    def __init__(self, model: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., hybrid: _Optional[_Union[Hybrid, _Mapping]] = ..., version: _Optional[int] = ..., no_repeat_ngram_size: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., repetition_ngram_size: _Optional[int] = ..., eos_bias: _Optional[float] = ...) -> None: ...

class Hybrid(_message.Message):
    __slots__ = ("phrase_bank", "min_similarity")
    PHRASE_BANK_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    phrase_bank: str
    min_similarity: float
    def __init__(self, phrase_bank: _Optional[str] = ..., min_similarity: _Optional[float] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "timing", "model", "source", "similarity", "version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    model: str
    source: AnswerSource
    similarity: float
    version: int
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model: _Optional[str] = ..., source: _Optional[_Union[AnswerSource, str]] = ..., similarity: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "embedding", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "priority", "version", "no_repeat_ngram_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    embedding: Embedding
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    version: int
    no_repeat_ngram_size: int
    def __init__(self, model: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., version: _Optional[int] = ..., no_repeat_ngram_size: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "timing", "mean_logprob", "model", "seed", "candidates", "version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    mean_logprob: float
    model: str
    seed: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    version: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., mean_logprob: _Optional[float] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "score", "index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    index: int
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "timing", "mean_logprob", "model", "seed", "candidates", "version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    mean_logprob: float
    model: str
    seed: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    version: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., mean_logprob: _Optional[float] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class DecodeBatchRequest(_message.Message):
    __slots__ = ("model", "embeddings", "max_new_tokens", "priority", "version", "no_repeat_ngram_size", "repetition_penalty", "repetition_ngram_size", "eos_bias", "hybrid")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_BIAS_FIELD_NUMBER: _ClassVar[int]
    HYBRID_FIELD_NUMBER: _ClassVar[int]
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    max_new_tokens: int
    priority: int
    version: int
    no_repeat_ngram_size: int
    repetition_penalty: float
    repetition_ngram_size: int
    eos_bias: float
    hybrid: Hybrid
    def __init__(self, model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., version: _Optional[int] = ..., no_repeat_ngram_size: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., repetition_ngram_size: _Optional[int] = ..., eos_bias: _Optional[float] = ..., hybrid: _Optional[_Union[Hybrid, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DecodeBatchResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: DecodeResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[DecodeResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class DecodeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DecodeBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DecodeBatchResult, _Mapping]]] = ...) -> None: ...

class DecodeStreamRequest(_message.Message):
    __slots__ = ("id", "model", "embedding", "max_new_tokens", "priority", "version", "no_repeat_ngram_size", "hybrid", "repetition_penalty", "repetition_ngram_size", "eos_bias")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_REPEAT_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    HYBRID_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_NGRAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_BIAS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    embedding: Embedding
    max_new_tokens: int
    priority: int
    version: int
    no_repeat_ngram_size: int
    hybrid: Hybrid
    repetition_penalty: float
    repetition_ngram_size: int
    eos_bias: float
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., version: _Optional[int] = ..., no_repeat_ngram_size: _Optional[int] = ..., hybrid: _Optional[_Union[Hybrid, _Mapping]] = ..., repetition_penalty: _Optional[float] = ..., repetition_ngram_size: _Optional[int] = ..., eos_bias: _Optional[float] = ...) -> None: ...

class DecodeStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: DecodeResponse
    error: ItemError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[DecodeResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "parameter_count", "embedding_dim", "vocab_size", "max_length", "dtype", "device", "checkpoint_sha256", "card", "trained", "encoder", "load", "kind", "phrase_count", "repository_version", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PHRASE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    parameter_count: int
    embedding_dim: int
    vocab_size: int
    max_length: int
    dtype: str
    device: str
    checkpoint_sha256: str
    card: _struct_pb2.Struct
    trained: bool
    encoder: str
    load: ModelLoad
    kind: str
    phrase_count: int
    repository_version: int
    serving: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., parameter_count: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_length: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., card: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., trained: _Optional[bool] = ..., encoder: _Optional[str] = ..., load: _Optional[_Union[ModelLoad, _Mapping]] = ..., kind: _Optional[str] = ..., phrase_count: _Optional[int] = ..., repository_version: _Optional[int] = ..., serving: _Optional[bool] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("waiting", "max_queue_size", "running", "max_batch_size", "batching", "max_wait_ms")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    max_queue_size: int
    running: int
    max_batch_size: int
    batching: str
    max_wait_ms: float
    def __init__(self, waiting: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., running: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., batching: _Optional[str] = ..., max_wait_ms: _Optional[float] = ...) -> None: ...
