"""Extreme input through a real channel to a real daemon: well-formed messages, built from
the generated classes, with extreme values (huge lengths and names, non-finite and denormal
floats, the most stop strings, bad raw tensors). Each gets its clear status or a correct
answer; afterwards the daemon must still decode correctly. (Raw-bytes fuzzing:
test_fuzz.py.)"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator

import grpc
import pytest

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
from tests.faults.test_fuzz import CALL_DEADLINE_S, INVALID, NOT_FOUND, OK


@pytest.fixture(scope="module")
def channel(daemon: RunningServer) -> Iterator[grpc.Channel]:
    with daemon.channel() as opened:
        yield opened


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
