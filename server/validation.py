"""Request validation: protobuf messages in, checked numpy arrays and sampling parameters
out, or a `ServeError` (server/errors.py) whose message names the field and what was
expected."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retd.model.decoding import SamplingParams
from retd.server.config import (
    MAX_EOS_BIAS,
    MAX_NGRAM_SIZE,
    MAX_REPETITION_PENALTY,
    DecodeDefaults,
)
from retd.server.errors import invalid
from retd.server.requests import SequenceRequest
from retd.v1 import decoder_pb2 as pb

# Below this a temperature overflows the logits (1/t): use 0 for greedy decoding.
MIN_TEMPERATURE = 1e-3
# Larger values overflow the model's float32 bridge into inf/NaN.
MAX_ABS_VALUE = 1e6
# Bounds on stop strings (as OpenAI-style APIs bound them); a longer one could never match
# inside a model's max_length anyway.
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_NO_REPEAT_NGRAM = MAX_NGRAM_SIZE
# A phrase bank's Generate returns top_k candidates: this many when top_k is 0, at most MAX.
DEFAULT_CANDIDATES = 5
MAX_CANDIDATES = 100


@dataclass(frozen=True)
class ModelLimits:
    """What a model accepts, for validation and for messages that explain it."""

    name: str
    embedding_dim: int
    max_length: int  # the most bytes a request may ask for
    encoder: str
    # What sets max_length: the model, or the server's max_new_tokens_limit.
    max_length_source: str = ""

    def __post_init__(self) -> None:
        if not self.max_length_source:
            object.__setattr__(self, "max_length_source", f"the max_length of model {self.name!r}")


def parse_embedding(embedding: pb.Embedding, field: str, limits: ModelLimits) -> np.ndarray:
    """The embedding as a (embedding_dim,) float32 array of finite values.

    Errors of the values (how many, which is not finite) name `field` itself, not the
    encoding a client chose for it (`field.raw`): the caller of a client library passed an
    embedding and never set `raw`; errors of one encoding's own fields name those."""
    expected = (
        f"expected {limits.embedding_dim} float32 values "
        f"(a {limits.encoder} embedding, which model {limits.name!r} decodes)"
    )
    kind = embedding.WhichOneof("data")
    if kind is None:
        raise invalid(f"{field}: missing; set {field}.vector.values or {field}.raw; {expected}")
    if kind == "vector":
        values = np.asarray(embedding.vector.values, dtype=np.float32)
        where = f"{field}.vector.values"
        if values.size == 0:
            raise invalid(f"{where}: empty; {expected}")
    else:
        raw = embedding.raw
        where = f"{field}.raw"
        if len(raw.data) == 0:
            raise invalid(f"{where}.data: empty; {expected}")
        if len(raw.data) % 4:
            raise invalid(
                f"{where}.data: {len(raw.data)} bytes is not a multiple of 4; "
                "expected little-endian float32 values"
            )
        values = np.frombuffer(raw.data, dtype="<f4").astype(np.float32, copy=False)
        shape = list(raw.shape)
        if shape and shape not in ([values.size], [1, values.size]):
            raise invalid(
                f"{where}.shape: {shape} does not match {values.size} values in "
                f"{where}.data; expected [{values.size}] or [1, {values.size}]"
            )
    if values.size != limits.embedding_dim:
        raise invalid(f"{field}: got {values.size} values; {expected}")
    finite = np.isfinite(values)
    if not finite.all():
        index = int(np.argmin(finite))
        raise invalid(f"{field}: value {index} is {values[index]}; expected finite floats")
    too_large = np.abs(values) > MAX_ABS_VALUE
    if too_large.any():
        index = int(np.argmax(too_large))
        raise invalid(
            f"{field}: value {index} is {values[index]:g}; expected magnitudes below "
            f"{MAX_ABS_VALUE:g} (sentence embeddings are about unit length)"
        )
    return values


def parse_query(embedding: pb.Embedding, field: str, limits: ModelLimits) -> np.ndarray:
    """An embedding to search a phrase bank with: as `parse_embedding`, and not all zeros."""
    values = parse_embedding(embedding, field, limits)
    if not values.any():
        raise invalid(
            f"{field}: all zeros; a phrase bank ranks phrases by cosine similarity, which a "
            f"zero vector does not have; expected a {limits.encoder} embedding"
        )
    return values


def parse_max_new_tokens(value: int, field: str, limits: ModelLimits) -> int:
    if value == 0:
        return limits.max_length
    if value > limits.max_length:
        raise invalid(
            f"{field}: {value} exceeds {limits.max_length_source} ({limits.max_length}); "
            f"expected 1..{limits.max_length} (0 means {limits.max_length})"
        )
    return value


def shorten(text: str, limit: int = 80) -> str:
    """Caller-chosen text quoted in a message, cut so the status stays small."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_no_repeat_ngram_size(value: int) -> int:
    if value > MAX_NO_REPEAT_NGRAM:
        raise invalid(
            f"no_repeat_ngram_size: {value} is too large; expected 0 (off) to "
            f"{MAX_NO_REPEAT_NGRAM} tokens"
        )
    return int(value)


def parse_number_in(name: str, value: float, low: float, high: float, off: float) -> float:
    """A float field of a request in [low, high]; `off` is its value that turns it off."""
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid(
            f"{name}: {value:g} is invalid; expected a number in [{low:g}, {high:g}] "
            f"({off:g} = off; unset = the server's default)"
        )
    return float(value)


def parse_repetition_ngram_size(value: int) -> int:
    if not 1 <= value <= MAX_NGRAM_SIZE:
        raise invalid(
            f"repetition_ngram_size: {value} is invalid; expected 1 (every token generated) to "
            f"{MAX_NGRAM_SIZE} tokens (unset = the server's default)"
        )
    return int(value)


class DecodeFields(Protocol):
    """The loop breakers and EOS bias of a Decode, a DecodeBatch or a DecodeStream item (proto3
    optional)."""

    no_repeat_ngram_size: int
    repetition_penalty: float
    repetition_ngram_size: int
    eos_bias: float

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 (protobuf's name)


class DecodeOptions(DecodeFields, Protocol):
    """What a Decode, a DecodeBatch and a DecodeStream item say about decoding."""

    model: str
    version: int
    max_new_tokens: int
    priority: int


def loop_breakers(options: DecodeFields, defaults: DecodeDefaults) -> dict[str, int | float]:
    """The request's loop breakers and EOS bias, checked; an unset field takes the server's
    default."""

    def given(name: str) -> int | float:
        value: int | float = getattr(options if options.HasField(name) else defaults, name)
        return value

    return {
        "no_repeat_ngram_size": parse_no_repeat_ngram_size(int(given("no_repeat_ngram_size"))),
        "repetition_penalty": parse_number_in(
            "repetition_penalty",
            float(given("repetition_penalty")),
            1,
            MAX_REPETITION_PENALTY,
            off=1,
        ),
        "repetition_ngram_size": parse_repetition_ngram_size(int(given("repetition_ngram_size"))),
        "eos_bias": parse_number_in(
            "eos_bias", float(given("eos_bias")), -MAX_EOS_BIAS, MAX_EOS_BIAS, off=0
        ),
    }


def greedy_params(
    max_new_tokens: int, field: str, limits: ModelLimits, options: DecodeFields,
    defaults: DecodeDefaults,
) -> SamplingParams:  # fmt: skip
    """A Decode's parameters: greedy, with the loop breakers the request (or the server) sets."""
    return SamplingParams(
        max_new_tokens=parse_max_new_tokens(max_new_tokens, field, limits),
        **loop_breakers(options, defaults),  # type: ignore[arg-type]
    )


def parse_generate(request: pb.GenerateRequest, limits: ModelLimits) -> SamplingParams:
    """The sampling parameters of a Generate / GenerateStream request, its seed (drawn at
    random when unset) among them."""
    temperature, top_p, stops = _sampling_fields(request)
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    params = SamplingParams(
        max_new_tokens=parse_max_new_tokens(request.max_new_tokens, "max_new_tokens", limits),
        temperature=float(temperature),
        top_k=int(request.top_k),
        top_p=float(top_p),
        seed=seed,
        stop=stops,
        no_repeat_ngram_size=parse_no_repeat_ngram_size(request.no_repeat_ngram_size),
    )
    return params


def parse_bank_generate(request: pb.GenerateRequest) -> tuple[int, int]:
    """How many candidates a Generate / GenerateStream request to a phrase bank wants, and
    the seed it echoes (0 when unset). The sampling fields are checked as for a generative
    model, so one request suits either kind, and then ignored: a bank's answer is exact."""
    _sampling_fields(request)
    parse_no_repeat_ngram_size(request.no_repeat_ngram_size)
    candidates = request.top_k or DEFAULT_CANDIDATES
    if candidates > MAX_CANDIDATES:
        raise invalid(
            f"top_k: {candidates} candidates exceed the {MAX_CANDIDATES} a phrase bank returns "
            f"at most; expected 1..{MAX_CANDIDATES} (0 means {DEFAULT_CANDIDATES})"
        )
    return candidates, request.seed if request.HasField("seed") else 0


def parse_min_similarity(hybrid: pb.Hybrid) -> float:
    """The threshold of a hybrid Decode: a cosine similarity, required."""
    expected = "expected a cosine similarity in [-1, 1], the least at which the bank answers"
    if not hybrid.HasField("min_similarity"):
        raise invalid(f"hybrid.min_similarity: missing; {expected}")
    value = hybrid.min_similarity
    if not (math.isfinite(value) and -1 <= value <= 1):
        raise invalid(f"hybrid.min_similarity: {value:g} is outside [-1, 1]; {expected}")
    return value


def _sampling_fields(request: pb.GenerateRequest) -> tuple[float, float, tuple[str, ...]]:
    """temperature, top_p and stop strings, checked."""
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        raise invalid(
            f"temperature: {temperature} is invalid; expected 0 (greedy) or a number >= "
            f"{MIN_TEMPERATURE}"
        )
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise invalid(f"top_p: {top_p} is outside (0, 1]; expected 0 < top_p <= 1")
    return temperature, top_p, _parse_stops(request.stop)


def _parse_stops(stops: Sequence[str]) -> tuple[str, ...]:
    """Stop strings are checked after every generated byte, under the model's lock: their
    number and length are bounded so one request cannot slow every caller of the model."""
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop: {len(stops)} strings; expected at most {MAX_STOP_STRINGS}")
    for index, stop in enumerate(stops):
        if not stop:
            raise invalid(f"stop[{index}]: empty; expected a non-empty string")
        if len(stop.encode()) > MAX_STOP_BYTES:
            raise invalid(
                f"stop[{index}]: {len(stop.encode())} bytes; expected at most {MAX_STOP_BYTES}"
            )
    return tuple(stops)


# ---- a RET model's requests (the thread engine's and an engine process's front end) ----


class _Limited(Protocol):
    def limits(self, max_new_tokens_limit: int = 0) -> ModelLimits: ...


class RETRequests:
    """What a RET model is asked, checked against its `limits()`: the requests of the thread
    engine (`RETEngine`) and of an engine process's front end (`EngineProcess`)."""

    def build_request(
        self: _Limited,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        defaults: DecodeDefaults,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """A greedy decode, with the loop breakers the request (or `defaults`) sets; errors
        name `field`."""
        limits = self.limits(max_new_tokens_limit)
        return SequenceRequest(
            embedding=parse_embedding(embedding, field, limits),
            params=greedy_params(
                options.max_new_tokens, "max_new_tokens", limits, options, defaults
            ),
            deadline=deadline,
            priority=options.priority,
        )

    def build_generate_request(
        self: _Limited,
        request: pb.GenerateRequest,
        stream: bool,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """A Generate (or a GenerateStream), checked."""
        limits = self.limits(max_new_tokens_limit)
        embedding = parse_embedding(request.embedding, "embedding", limits)
        params = parse_generate(request, limits)
        return SequenceRequest(
            embedding, params, stream=stream, deadline=deadline, priority=request.priority
        )
