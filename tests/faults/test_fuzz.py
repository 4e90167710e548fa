"""Malformed and extreme input through real channels to a real daemon.

Raw-bytes fuzzing: random bytes and mutations (flip / insert / delete / truncate) of valid
serialized requests are sent with `request_serializer=None`, so the daemon parses what it
gets. Every call must end before its deadline with some status; the codes are recorded and
printed. Afterwards the daemon must still decode correctly.

Extreme-value tests send well-formed messages built from the generated classes.

RETD_FUZZ_EXAMPLES sets the examples per method (default 60; `make fuzz` raises it)."""

from __future__ import annotations

import math
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.faults.conftest import (
    Greedy,
    Reference,
    assert_serving_correctly,
    embedding,
    embedding_values,
    wait_idle,
)

EXAMPLES = int(os.environ.get("RETD_FUZZ_EXAMPLES", "60"))
CALL_DEADLINE_S = 10.0
SERVICE = "/retd.v1.Decoder/"
MODEL = "ret_v21"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# ---- valid requests, serialized: the material mutations start from -------------------


def _raw_embedding(index: int) -> pb.Embedding:
    values = embedding_values(index)
    data = struct.pack(f"<{len(values)}f", *values)
    return pb.Embedding(raw=pb.RawTensor(data=data, shape=[1, len(values)]))


def _valid_requests() -> dict[str, list[Message]]:
    sampled = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7, "stop": ["zz", "q"]}
    return {
        "Decode": [
            pb.DecodeRequest(embedding=embedding(0), max_new_tokens=8),
            pb.DecodeRequest(model=MODEL, embedding=_raw_embedding(1), max_new_tokens=8),
            pb.DecodeRequest(embedding=embedding(2), max_new_tokens=8, priority=3),
        ],
        "Generate": [
            pb.GenerateRequest(embedding=embedding(0), max_new_tokens=8, **sampled),
            pb.GenerateRequest(model=MODEL, embedding=_raw_embedding(1), max_new_tokens=8),
        ],
        "GenerateStream": [
            pb.GenerateRequest(embedding=embedding(2), max_new_tokens=8, **sampled),
            pb.GenerateRequest(embedding=_raw_embedding(3), max_new_tokens=8, temperature=0),
        ],
        "DecodeBatch": [
            pb.DecodeBatchRequest(embeddings=[embedding(0), _raw_embedding(1)], max_new_tokens=8),
        ],
        "DecodeStream": [
            pb.DecodeStreamRequest(id="a", embedding=embedding(0), max_new_tokens=8),
            pb.DecodeStreamRequest(id="b", model=MODEL, embedding=_raw_embedding(1)),
        ],
        "ListModels": [pb.ListModelsRequest()],
        "GetModelInfo": [pb.GetModelInfoRequest(), pb.GetModelInfoRequest(model=MODEL)],
    }


VALID = _valid_requests()
REQUEST_TYPES: dict[str, type[Message]] = {
    "Decode": pb.DecodeRequest,
    "Generate": pb.GenerateRequest,
    "GenerateStream": pb.GenerateRequest,
    "DecodeBatch": pb.DecodeBatchRequest,
    "DecodeStream": pb.DecodeStreamRequest,
    "ListModels": pb.ListModelsRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
}
RESPONSE_TYPES: dict[str, type[Message]] = {
    "Decode": pb.DecodeResponse,
    "Generate": pb.GenerateResponse,
    "GenerateStream": pb.GenerateChunk,
    "DecodeBatch": pb.DecodeBatchResponse,
    "DecodeStream": pb.DecodeStreamResponse,
    "ListModels": pb.ListModelsResponse,
    "GetModelInfo": pb.ModelInfo,
}
UNARY = ("Decode", "Generate", "DecodeBatch", "ListModels", "GetModelInfo")


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid serialized request with 1-4 byte-level edits. Positions lean to the first and
    last bytes, where the fields other than the embedding's floats are."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        near = st.one_of(
            st.integers(0, min(size, 24)),
            st.integers(max(0, size - 96), size),
            st.integers(0, size),
        )
        position = draw(near)
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        if operation == "flip" and position < size:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and position < size:
            data[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del data[position:]
    return bytes(data)


def fuzz_input(method: str) -> st.SearchStrategy[bytes]:
    originals = [message.SerializeToString() for message in VALID[method]]
    return st.one_of(st.binary(max_size=512), mutated(originals), st.sampled_from(originals))


def parses(method: str, data: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(data)
    except DecodeError:
        return False
    return True


# ---- calls through a raw channel -----------------------------------------------------


def raw_call(channel: grpc.Channel, method: str, payload: bytes | list[bytes]) -> tuple:
    """(status code, response messages as bytes, seconds, details) of one raw call."""
    path = SERVICE + method
    started = time.monotonic()
    responses: list[bytes] = []
    try:
        if method in UNARY:
            assert isinstance(payload, bytes)
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            responses.append(call(payload, timeout=CALL_DEADLINE_S))
        elif method == "GenerateStream":
            assert isinstance(payload, bytes)
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            responses.extend(call(payload, timeout=CALL_DEADLINE_S))
        else:
            assert isinstance(payload, list)
            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            responses.extend(call(iter(payload), timeout=CALL_DEADLINE_S))
        code, details = OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    return code, responses, time.monotonic() - started, details


CODES: dict[str, Counter[str]] = {}
INTERNAL_DETAILS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def channel(daemon: RunningServer) -> Iterator[grpc.Channel]:
    with daemon.channel() as opened:
        yield opened


@pytest.fixture(scope="module", autouse=True)
def print_codes() -> Iterator[None]:
    yield
    for method, counts in sorted(CODES.items()):
        print(f"\nfuzz {method}: {dict(counts)}", end="")
    for details, count in INTERNAL_DETAILS.most_common(5):
        print(f"\nfuzz INTERNAL x{count}: {details[:160]}", end="")


def check_outcome(
    method: str, parsed: bool, outcome: tuple[grpc.StatusCode, list[bytes], float, str]
) -> None:
    code, responses, s, details = outcome
    CODES.setdefault(method, Counter())[code.name] += 1
    if code == grpc.StatusCode.INTERNAL:
        INTERNAL_DETAILS[f"{method}: {details}"] += 1
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: hung for {s:.1f}s"
    assert s < CALL_DEADLINE_S
    if parsed:
        # A message that parses is the service's to judge: never an unhandled exception.
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED), method
    elif method != "DecodeStream":  # a stream answers a bad item in the item (see below)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: unparseable bytes: {code}"
        assert "not a valid retd.v1." in details, details
    if code == OK:
        for response in responses:
            RESPONSE_TYPES[method].FromString(response)  # well-formed answers only


@pytest.mark.parametrize("method", ["Decode", "Generate", "GenerateStream", "DecodeBatch"])
def test_fuzzed_bytes_end_with_a_status(
    method: str, channel: grpc.Channel, daemon: RunningServer, reference: Reference
) -> None:
    @FUZZ_SETTINGS
    @given(data=fuzz_input(method))
    def run(data: bytes) -> None:
        check_outcome(method, parses(method, data), raw_call(channel, method, data))

    run()
    assert_serving_correctly(daemon, reference)


@pytest.mark.parametrize("method", ["ListModels", "GetModelInfo"])
def test_fuzzed_bytes_to_model_queries_end_with_a_status(
    method: str, channel: grpc.Channel, daemon: RunningServer, reference: Reference
) -> None:
    @FUZZ_SETTINGS
    @given(data=fuzz_input(method))
    def run(data: bytes) -> None:
        check_outcome(method, parses(method, data), raw_call(channel, method, data))

    run()
    assert_serving_correctly(daemon, reference)


def test_fuzzed_decode_stream_items_end_with_a_status(
    channel: grpc.Channel, daemon: RunningServer, reference: Reference
) -> None:
    """Items that parse, random bytes included when they happen to parse. (An item that
    does not parse is answered INVALID_ARGUMENT in its place and the stream goes on: see
    the test below.)"""
    item = fuzz_input("DecodeStream").filter(lambda data: parses("DecodeStream", data))

    @FUZZ_SETTINGS
    @given(items=st.lists(item, min_size=0, max_size=3))
    def run(items: list[bytes]) -> None:
        outcome = raw_call(channel, "DecodeStream", items)
        check_outcome("DecodeStream", True, outcome)
        code, responses = outcome[:2]
        if code == OK:
            assert len(responses) == len(items)

    run()
    assert_serving_correctly(daemon, reference)


@pytest.mark.parametrize("valid_first", [False, True], ids=["corrupt", "valid-then-corrupt"])
def test_decode_stream_with_an_unparseable_item_ends(
    valid_first: bool, channel: grpc.Channel, daemon: RunningServer
) -> None:
    items = [b"\xff\xff\xff"]
    if valid_first:
        items.insert(0, VALID["DecodeStream"][0].SerializeToString())
    path = SERVICE + "DecodeStream"
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    try:
        raw_answers = list(call(iter(items), timeout=3.0))
        code = OK
    except grpc.RpcError as error:
        code = error.code()
    wait_idle(daemon.address)
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"hung {time.monotonic() - started:.1f}s"
    # The unparseable item gets its own INVALID_ARGUMENT answer; the stream ends OK.
    assert code == OK
    answers = [pb.DecodeStreamResponse.FromString(raw) for raw in raw_answers]
    errors = [a.error for a in answers if a.HasField("error")]
    assert [e.code_name for e in errors] == ["INVALID_ARGUMENT"]
    assert "not a valid retd.v1.DecodeStreamRequest" in errors[0].message
    assert len(answers) == len(items)


# ---- well-formed messages with extreme values -----------------------------------------


def call_code(function: Callable[[], object]) -> tuple[grpc.StatusCode, object]:
    try:
        return OK, function()
    except grpc.RpcError as error:
        return error.code(), error.details()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.DecoderStub:
    return pb_grpc.DecoderStub(channel)


HUGE = 2**32 - 1


def test_huge_max_new_tokens_is_invalid_everywhere(stub: pb_grpc.DecoderStub) -> None:
    e = embedding(0)
    for name, function in {
        "Decode": lambda: stub.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=HUGE)),
        "Generate": lambda: stub.Generate(pb.GenerateRequest(embedding=e, max_new_tokens=HUGE)),
        "GenerateStream": lambda: list(
            stub.GenerateStream(pb.GenerateRequest(embedding=e, max_new_tokens=HUGE))
        ),
    }.items():
        code, details = call_code(function)
        assert code == INVALID and "max_new_tokens" in str(details), (name, code, details)
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[e, e], max_new_tokens=HUGE), timeout=CALL_DEADLINE_S
    )
    assert [r.error.code_name for r in batch.results] == ["INVALID_ARGUMENT"] * 2
    items = [pb.DecodeStreamRequest(id="x", embedding=e, max_new_tokens=HUGE)]
    answers = list(stub.DecodeStream(iter(items), timeout=CALL_DEADLINE_S))
    assert [(a.id, a.error.code_name) for a in answers] == [("x", "INVALID_ARGUMENT")]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_embedding_values_are_invalid(stub: pb_grpc.DecoderStub, bad: float) -> None:
    values = embedding_values(0)
    values[100] = bad
    e = pb.Embedding(vector=pb.FloatVector(values=values))
    code, details = call_code(lambda: stub.Decode(pb.DecodeRequest(embedding=e)))
    assert code == INVALID and "value 100" in str(details), (code, details)
    code, details = call_code(lambda: stub.Generate(pb.GenerateRequest(embedding=e, seed=1)))
    assert code == INVALID, (code, details)


@pytest.mark.parametrize(
    "values",
    [
        [-0.0] * 768,
        [1e-45] * 768,  # the smallest float32 denormal
        [1.1754942e-38 if i % 2 else -1e-40 for i in range(768)],
    ],
    ids=["minus-zero", "denormal", "mixed-denormal"],
)
def test_finite_extreme_embeddings_decode_like_generate_alone(
    stub: pb_grpc.DecoderStub, greedy: Greedy, values: list[float]
) -> None:
    e = pb.Embedding(vector=pb.FloatVector(values=values))
    response = stub.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=16), timeout=10)
    assert response.text == greedy(values, 16)


@pytest.mark.parametrize(
    "values",
    [
        [3.4028235e38 if i % 2 else -3.4028235e38 for i in range(768)],
        [3.4028235e38] * 768,
        [0.0] * 767 + [2e6],
    ],
    ids=["max-float-alternating", "max-float", "one-huge"],
)
def test_huge_embedding_values_are_refused_naming_the_bound(
    stub: pb_grpc.DecoderStub, values: list[float]
) -> None:
    """Values that would overflow the model into inf/NaN get INVALID_ARGUMENT, not INTERNAL."""
    e = pb.Embedding(vector=pb.FloatVector(values=values))
    for call in (
        lambda: stub.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=16), timeout=10),
        lambda: stub.Generate(pb.GenerateRequest(embedding=e, max_new_tokens=8, seed=1)),
    ):
        code, details = call_code(call)
        assert code == INVALID and "magnitudes below" in str(details), (code, details)


def test_max_float_embedding_generate_is_not_internal(stub: pb_grpc.DecoderStub) -> None:
    e = pb.Embedding(vector=pb.FloatVector(values=[3.4028235e38] * 768))
    code, details = call_code(
        lambda: stub.Generate(pb.GenerateRequest(embedding=e, max_new_tokens=8, seed=1))
    )
    assert code in (OK, INVALID), (code, details)


def generate(stub: pb_grpc.DecoderStub, **fields: object) -> tuple[grpc.StatusCode, object]:
    request = pb.GenerateRequest(embedding=embedding(4), max_new_tokens=16, **fields)
    return call_code(lambda: stub.Generate(request, timeout=CALL_DEADLINE_S))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"temperature": NAN}, INVALID),
        ({"temperature": INF}, INVALID),
        ({"temperature": -INF}, INVALID),
        ({"temperature": -1e-45}, INVALID),
        ({"temperature": 3.4028235e38, "seed": 1}, OK),
        ({"top_p": NAN}, INVALID),
        ({"top_p": INF}, INVALID),
        ({"top_p": -0.0}, INVALID),
        ({"top_p": 1e-45, "seed": 1}, OK),
        ({"top_k": HUGE, "seed": 1}, OK),
        ({"seed": 2**64 - 1}, OK),
        ({"seed": 0}, OK),
        ({"priority": -(2**31)}, OK),
        ({"priority": 2**31 - 1}, OK),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else value.name,
)
def test_extreme_sampling_values(
    stub: pb_grpc.DecoderStub, fields: dict[str, object], expected: grpc.StatusCode
) -> None:
    code, answer = generate(stub, **fields)
    assert code == expected, (code, answer)
    if code == OK:
        assert isinstance(answer, pb.GenerateResponse)
        assert answer.usage.generated_tokens >= 1
        if "seed" in fields:  # the same seed, the same text
            assert generate(stub, **fields)[1].text == answer.text  # type: ignore[union-attr]


def test_minus_zero_temperature_is_greedy(stub: pb_grpc.DecoderStub, reference: Reference) -> None:
    code, answer = generate(stub, temperature=-0.0)
    assert code == OK, answer
    assert answer.text == reference(4, 16)  # type: ignore[union-attr]


@pytest.mark.parametrize("temperature", [1e-45, 1e-40], ids=["1e-45", "1e-40"])
def test_denormal_temperature_is_refused_clearly(
    stub: pb_grpc.DecoderStub, temperature: float
) -> None:
    """1/t would overflow the logits: the request is refused, naming the field, rather than
    failing inside the model."""
    code, answer = generate(stub, temperature=temperature, seed=3)
    assert code == INVALID, (code, answer)
    assert "temperature" in str(answer), answer


@pytest.mark.parametrize("priority", [-(2**31), 2**31 - 1])
def test_priority_extremes_decode_correctly(
    stub: pb_grpc.DecoderStub, reference: Reference, priority: int
) -> None:
    request = pb.DecodeRequest(embedding=embedding(6), max_new_tokens=16, priority=priority)
    assert stub.Decode(request, timeout=CALL_DEADLINE_S).text == reference(6, 16)


def test_long_model_names_are_not_found(stub: pb_grpc.DecoderStub) -> None:
    name = "m" * 4_000  # the next test sends 100,000 (NOT_FOUND quotes at most 80 of them)
    code, details = call_code(
        lambda: stub.Decode(pb.DecodeRequest(model=name, embedding=embedding(0)), timeout=10)
    )
    assert code == NOT_FOUND, (code, details)
    code, details = call_code(
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model=name), timeout=10)
    )
    assert code == NOT_FOUND, (code, details)
    items = [pb.DecodeStreamRequest(id="n", model=name, embedding=embedding(0))]
    answers = list(stub.DecodeStream(iter(items), timeout=10))
    assert [a.error.code_name for a in answers] == ["NOT_FOUND"]


@pytest.mark.parametrize("method", ["Decode", "GetModelInfo", "DecodeBatch"])
def test_very_long_model_name_is_not_found(stub: pb_grpc.DecoderStub, method: str) -> None:
    name = "m" * 100_000
    calls = {
        "Decode": lambda: stub.Decode(pb.DecodeRequest(model=name, embedding=embedding(0))),
        "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model=name)),
        "DecodeBatch": lambda: stub.DecodeBatch(
            pb.DecodeBatchRequest(model=name, embeddings=[embedding(0)])
        ),
    }
    code, details = call_code(calls[method])
    assert code == NOT_FOUND, (code, str(details)[:200])


def many_stops(count: int) -> list[str]:
    # Distinct, 6..12 bytes, unlikely to occur in 64 bytes of output.
    return [f"\x01stop{i:05d}" + "~" * (i % 7) for i in range(count)]


def test_the_most_stop_strings_work_and_more_are_refused(
    stub: pb_grpc.DecoderStub, daemon: RunningServer
) -> None:
    stops = many_stops(16)
    request = pb.GenerateRequest(embedding=embedding(7), max_new_tokens=64, seed=5, stop=stops)
    unary = stub.Generate(request, timeout=CALL_DEADLINE_S)
    chunks = list(stub.GenerateStream(request, timeout=CALL_DEADLINE_S))
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason
    assert not any(stop in unary.text for stop in stops)
    for too_many in (many_stops(17), many_stops(10_000)):
        code, details = call_code(
            lambda stops=too_many: stub.Generate(
                pb.GenerateRequest(embedding=embedding(7), stop=stops), timeout=10
            )
        )
        assert code == INVALID and "at most 16" in str(details), (code, details)
    code, details = call_code(
        lambda: stub.Generate(pb.GenerateRequest(embedding=embedding(7), stop=["x" * 257]))
    )
    assert code == INVALID and "stop[0]: 257 bytes" in str(details), (code, details)
    code, details = call_code(
        lambda: stub.Generate(pb.GenerateRequest(embedding=embedding(7), stop=[*stops[:15], ""]))
    )
    assert code == INVALID and "stop[15]" in str(details), (code, details)
    wait_idle(daemon.address)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (pb.RawTensor(data=b"\x00" * 3071, shape=[768]), "multiple of 4"),
        (pb.RawTensor(data=b"\x00" * 3072, shape=[HUGE]), "shape"),
        (pb.RawTensor(data=b"\x00" * 3072, shape=[1, 1, 768]), "shape"),
        (pb.RawTensor(data=b"", shape=[768]), "empty"),
        (pb.RawTensor(data=struct.pack("<f", math.nan) * 768), "finite"),
    ],
    ids=["odd-bytes", "huge-shape", "3d-shape", "empty", "nan"],
)
def test_bad_raw_tensors_are_invalid(
    stub: pb_grpc.DecoderStub, raw: pb.RawTensor, field: str
) -> None:
    code, details = call_code(
        lambda: stub.Decode(pb.DecodeRequest(embedding=pb.Embedding(raw=raw)), timeout=10)
    )
    assert code == INVALID and field in str(details), (code, details)


def test_empty_batch_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    code, details = call_code(lambda: stub.DecodeBatch(pb.DecodeBatchRequest(), timeout=10))
    assert code == INVALID and "embeddings" in str(details), (code, details)


def test_daemon_serves_correctly_after_the_fuzzing(
    daemon: RunningServer, reference: Reference
) -> None:
    assert_serving_correctly(daemon, reference)
