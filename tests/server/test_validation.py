"""Every invalid input gets the right status code and a message naming the field and what
was expected; the daemon keeps serving afterwards."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD = np.random.default_rng(0).standard_normal(768).astype(np.float32)


def vector(values: Any) -> pb.Embedding:
    return pb.Embedding(vector=pb.FloatVector(values=list(values)))


def raw(data: bytes, shape: list[int] | None = None) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=data, shape=shape or []))


def le_bytes(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def with_value(index: int, value: float) -> list[float]:
    values = GOOD.tolist()
    values[index] = value
    return values


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[pb_grpc.DecoderStub]:
    with server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


def decode(embedding: pb.Embedding | None, **fields: Any) -> Callable[[Any], Any]:
    fields.setdefault("max_new_tokens", 8)
    return lambda stub: stub.Decode(pb.DecodeRequest(embedding=embedding, **fields), timeout=30)


def generate(**fields: Any) -> Callable[[Any], Any]:
    fields.setdefault("embedding", vector(GOOD))
    fields.setdefault("max_new_tokens", 8)
    return lambda stub: stub.Generate(pb.GenerateRequest(**fields), timeout=30)


def generate_stream(**fields: Any) -> Callable[[Any], Any]:
    fields.setdefault("embedding", vector(GOOD))
    fields.setdefault("max_new_tokens", 8)
    return lambda stub: list(stub.GenerateStream(pb.GenerateRequest(**fields), timeout=30))


# (call, expected code, substrings the message must contain)
CASES: dict[str, tuple[Callable[[Any], Any], grpc.StatusCode, tuple[str, ...]]] = {
    "vector too short": (
        decode(vector(GOOD[:767])), INVALID, ("embedding: got 767 values", "768")
    ),
    "vector too long": (
        decode(vector(np.zeros(769))), INVALID, ("embedding: got 769 values", "768")
    ),
    "raw wrong dimension": (
        decode(raw(le_bytes(np.zeros(512)))), INVALID, ("embedding: got 512 values", "768")
    ),
    "NaN": (
        decode(vector(with_value(5, float("nan")))), INVALID,
        ("embedding: value 5", "nan", "finite"),
    ),
    "Inf": (
        decode(vector(with_value(700, float("inf")))), INVALID,
        ("embedding: value 700", "inf", "finite"),
    ),
    "raw NaN": (
        decode(raw(le_bytes(with_value(0, float("-inf"))))), INVALID,
        ("embedding: value 0", "finite"),
    ),
    "empty vector": (decode(vector([])), INVALID, ("embedding.vector.values", "empty", "768")),
    "empty raw": (decode(raw(b"")), INVALID, ("embedding.raw.data", "empty", "768")),
    "missing embedding": (decode(None), INVALID, ("embedding", "missing", "768")),
    "raw bytes not a multiple of 4": (
        decode(raw(le_bytes(GOOD) + b"\x00\x00")), INVALID,
        ("embedding.raw.data", "3074", "multiple of 4"),
    ),
    "raw shape does not match": (
        decode(raw(le_bytes(GOOD), [2, 384])), INVALID,
        ("embedding.raw.shape", "[2, 384]", "768"),
    ),
    "raw shape too long": (
        decode(raw(le_bytes(GOOD), [769])), INVALID, ("embedding.raw.shape", "769", "768")
    ),
    "decode max_new_tokens beyond max_length": (
        decode(vector(GOOD), max_new_tokens=257),
        INVALID,
        ("max_new_tokens: 257 exceeds the max_length of model 'ret_v21' (256); expected 1..256",),
    ),
    "generate max_new_tokens beyond max_length": (
        generate(max_new_tokens=1000), INVALID, ("max_new_tokens", "1000", "256")
    ),
    "negative temperature": (generate(temperature=-0.5), INVALID, ("temperature", "-0.5", ">= 0")),
    "NaN temperature": (generate(temperature=float("nan")), INVALID, ("temperature", ">= 0")),
    "top_p zero": (generate(top_p=0.0), INVALID, ("top_p", "(0, 1]")),
    "top_p above one": (generate(top_p=1.5), INVALID, ("top_p", "1.5", "(0, 1]")),
    "empty stop string": (
        generate(stop=["ok", ""]), INVALID, ("stop[1]", "empty", "non-empty")
    ),
    "stream negative temperature": (
        generate_stream(temperature=-1.0), INVALID, ("temperature", ">= 0")
    ),
    "stream wrong dimension": (
        generate_stream(embedding=vector([1.0, 2.0])), INVALID, ("embedding", "2", "768")
    ),
    "decode unknown model": (
        decode(vector(GOOD), model="gpt-17"), grpc.StatusCode.NOT_FOUND, ("model", "gpt-17")
    ),
    "generate unknown model": (
        generate(model="gpt-17"), grpc.StatusCode.NOT_FOUND, ("model", "gpt-17")
    ),
    "batch unknown model": (
        lambda stub: stub.DecodeBatch(
            pb.DecodeBatchRequest(model="gpt-17", embeddings=[vector(GOOD)], max_new_tokens=8)
        ),
        grpc.StatusCode.NOT_FOUND, ("model", "gpt-17"),
    ),
    "empty batch": (
        lambda stub: stub.DecodeBatch(pb.DecodeBatchRequest(max_new_tokens=8)),
        INVALID, ("embeddings", "empty"),
    ),
    "model info unknown model": (
        lambda stub: stub.GetModelInfo(pb.GetModelInfoRequest(model="gpt-17")),
        grpc.StatusCode.NOT_FOUND, ("model", "gpt-17"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_input_is_rejected_with_a_clear_message(
    stub: pb_grpc.DecoderStub, case: str
) -> None:
    call, code, substrings = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        call(stub)
    error = raised.value
    assert error.code() == code, error.details()
    for part in substrings:
        assert part.lower() in error.details().lower(), (part, error.details())


def test_unknown_model_message_lists_the_loaded_models(stub: pb_grpc.DecoderStub) -> None:
    name = stub.ListModels(pb.ListModelsRequest()).default_model
    with pytest.raises(grpc.RpcError) as raised:
        decode(vector(GOOD), model="gpt-17")(stub)
    assert name in raised.value.details()


def test_bad_item_in_a_batch_names_its_index(stub: pb_grpc.DecoderStub) -> None:
    bad = [vector(with_value(3, float("nan"))), raw(b"\x00" * 6), pb.Embedding()]
    response = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[vector(GOOD), *bad], max_new_tokens=8), timeout=30
    )
    assert response.results[0].WhichOneof("outcome") == "response"
    for index, result in enumerate(response.results[1:], start=1):
        assert result.WhichOneof("outcome") == "error"
        assert result.error.code == INVALID.value[0]
        assert result.error.code_name == "INVALID_ARGUMENT"
        assert f"embeddings[{index}]" in result.error.message


def test_bad_max_new_tokens_fails_every_batch_item(stub: pb_grpc.DecoderStub) -> None:
    response = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[vector(GOOD)] * 2, max_new_tokens=300), timeout=30
    )
    assert [r.error.code_name for r in response.results] == ["INVALID_ARGUMENT"] * 2
    assert all("max_new_tokens" in r.error.message for r in response.results)


def test_the_daemon_keeps_serving_after_invalid_calls(stub: pb_grpc.DecoderStub) -> None:
    for call, _, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            call(stub)
    answer = stub.Decode(pb.DecodeRequest(embedding=vector(GOOD), max_new_tokens=8), timeout=30)
    assert answer.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert answer.usage.generated_tokens >= 1
    again = stub.Decode(pb.DecodeRequest(embedding=raw(le_bytes(GOOD)), max_new_tokens=8))
    assert again.text == answer.text


def test_an_oversize_message_is_resource_exhausted(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(
        tmp_path, ["--checkpoint", str(checkpoint), "--max-message-bytes", "100000"]
    )
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            big = raw(le_bytes(np.zeros(250_000)))  # 1 MB
            with pytest.raises(grpc.RpcError) as raised:
                stub.Decode(pb.DecodeRequest(embedding=big, max_new_tokens=8), timeout=30)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "100000" in raised.value.details(), raised.value.details()
            ok = stub.Decode(pb.DecodeRequest(embedding=vector(GOOD), max_new_tokens=8))
            assert ok.usage.generated_tokens >= 1
    finally:
        assert server.stop() == 0, server.log()
    # A limit too small for a full DecodeBatch is allowed, with a warning that says so.
    assert "max_message_bytes 100000 cannot hold a DecodeBatch of max_batch_items 1024 " in (
        server.log()
    )


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.one_of(
        st.lists(floats, min_size=0, max_size=1000),
        st.lists(floats, min_size=768, max_size=768),
        st.lists(st.floats(-1e6, 1e6, width=32), min_size=768, max_size=768),
    ),
    as_raw=st.booleans(),
)
def test_random_vectors_succeed_or_are_invalid(
    stub: pb_grpc.DecoderStub, values: list[float], as_raw: bool
) -> None:
    embedding = raw(struct.pack(f"<{len(values)}f", *values)) if as_raw else vector(values)
    # The server refuses non-finite values and magnitudes above 1e6 (float32, as sent).
    as_sent = np.asarray(values, dtype=np.float32)
    valid = len(values) == 768 and bool(np.isfinite(as_sent).all() and (abs(as_sent) <= 1e6).all())
    try:
        answer = stub.Decode(pb.DecodeRequest(embedding=embedding, max_new_tokens=4), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == INVALID, error.details()
        assert not valid, error.details()
        assert "embedding" in error.details()
    else:
        assert valid
        assert 1 <= answer.usage.generated_tokens <= 4
