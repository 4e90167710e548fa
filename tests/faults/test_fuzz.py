"""Malformed input through real channels to a real daemon.

Raw-bytes fuzzing: random bytes and mutations (flip / insert / delete / truncate) of valid
serialized requests are sent with `request_serializer=None`, so the daemon parses what it
gets. Every call must end before its deadline with some status; the codes are recorded and
printed. Afterwards the daemon must still decode correctly.

(Well-formed messages with extreme values: test_extreme_values.py.)

RETD_FUZZ_EXAMPLES sets the examples per method (default 60; `make fuzz` raises it)."""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.v1 import decoder_pb2 as pb
from tests.conftest import RunningServer
from tests.faults.conftest import (
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
