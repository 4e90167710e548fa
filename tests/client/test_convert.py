"""Embeddings to retd.v1 messages and responses to dataclasses, without a server."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retd.client import (
    FinishReason,
    InvalidArgumentError,
    ModelLoad,
    NotFoundError,
    StreamChunk,
    Timing,
    Usage,
    convert,
)
from retd.v1 import decoder_pb2


class ArrayLike:
    """Stands for a CPU torch tensor: only ``__array__``."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values, dtype=dtype)


def raw_values(msg: decoder_pb2.Embedding) -> np.ndarray:
    assert msg.WhichOneof("data") == "raw"
    return np.frombuffer(msg.raw.data, dtype="<f4")


@pytest.mark.parametrize(
    "value",
    [
        np.arange(768, dtype=np.float32),
        np.arange(768, dtype=np.float64),
        np.arange(768, dtype=">f4"),  # big-endian input still goes out little-endian
        np.arange(768, dtype=np.int32),
        list(range(768)),
        tuple(float(i) for i in range(768)),
        ArrayLike([float(i) for i in range(768)]),
        np.arange(768, dtype=np.float32).reshape(1, 768),
        np.arange(768 * 2, dtype=np.float32)[::2] / 2,  # non-contiguous
    ],
    ids=["f32", "f64", "big-endian", "int", "list", "tuple", "__array__", "1xdim", "strided"],
)
def test_raw_encoding_of_every_input_kind(value):
    msg = convert.to_embedding(value)
    assert list(msg.raw.shape) == [768]
    assert len(msg.raw.data) == 4 * 768
    np.testing.assert_array_equal(raw_values(msg), np.arange(768, dtype=np.float32))


def test_vector_encoding():
    msg = convert.to_embedding([0.5, -1.25, 3.0], encoding="vector")
    assert msg.WhichOneof("data") == "vector"
    assert list(msg.vector.values) == [0.5, -1.25, 3.0]


def test_embedding_message_passes_through():
    msg = decoder_pb2.Embedding(vector=decoder_pb2.FloatVector(values=[1.0]))
    assert convert.to_embedding(msg) is msg


def test_unknown_encoding_is_rejected():
    with pytest.raises(ValueError, match="encoding"):
        convert.to_embedding([1.0], encoding="base64")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value, match",
    [
        (np.zeros((2, 768)), r"shape \[2, 768\]"),
        (np.float32(1.0), r"shape \[\]"),
        (np.zeros((1, 1, 768)), r"shape \[1, 1, 768\]"),
        ("not numbers", "expected numbers"),
        ([[1.0, 2.0], [3.0]], "embedding"),
        ([True, False], "expected numbers"),
    ],
)
def test_one_embedding_rejects_what_is_unambiguously_wrong(value, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        convert.to_embedding(value)
    assert isinstance(info.value, ValueError)  # also catchable as a ValueError


def test_values_are_left_to_the_server():
    # A wrong dimension or a NaN is the server's to report, naming the field.
    msg = convert.to_embedding([float("nan"), 1.0, 2.0])
    assert np.isnan(raw_values(msg)[0])
    assert list(msg.raw.shape) == [3]


def test_batch_from_2d_array_and_sequences():
    matrix = np.arange(3 * 768, dtype=np.float32).reshape(3, 768)
    for value in (matrix, list(matrix), [row.tolist() for row in matrix], ArrayLike(matrix)):
        msgs = convert.to_embeddings(value)
        assert len(msgs) == 3
        for row, msg in zip(matrix, msgs, strict=True):
            np.testing.assert_array_equal(raw_values(msg), row)


def test_batch_items_of_different_lengths_go_to_the_server():
    msgs = convert.to_embeddings([np.zeros(768), np.zeros(3)])
    assert [list(m.raw.shape) for m in msgs] == [[768], [3]]


@pytest.mark.parametrize(
    "value, match",
    [
        (np.zeros(768), "2-D array"),
        ([0.0] * 768, "single list of numbers"),
        ([np.zeros(768), np.zeros((2, 768))], r"embeddings\[1\]"),
        ("text", "got one"),
    ],
)
def test_batch_rejects(value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        convert.to_embeddings(value)


def test_empty_batch():
    assert convert.to_embeddings([]) == []
    assert convert.to_embeddings(np.zeros((0, 768))) == []


@given(
    hnp.arrays(
        dtype=np.float32,
        shape=st.integers(min_value=0, max_value=1024),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
def test_raw_bytes_round_trip_bit_identically(array):
    msg = convert.to_embedding(array)
    back = np.frombuffer(msg.raw.data, dtype="<f4")
    assert list(msg.raw.shape) == [array.size]
    assert back.tobytes() == array.astype("<f4").tobytes()
    # the message itself survives the wire
    again = decoder_pb2.Embedding.FromString(msg.SerializeToString())
    assert again.raw.data == msg.raw.data


@given(hnp.arrays(dtype=np.float32, shape=st.integers(1, 64), elements=st.floats(width=32)))
def test_vector_round_trip(array):
    msg = decoder_pb2.Embedding.FromString(
        convert.to_embedding(array, encoding="vector").SerializeToString()
    )
    assert np.array(msg.vector.values, dtype=np.float32).tobytes() == array.tobytes()


# --- every float dtype a caller may hold (torch tensors duck-typed: the client never imports
# torch; these tests do) ---------------------------------------------------------------------

# Values every dtype below holds exactly enough to compare after its own rounding.
FLOAT16_VALUES = st.floats(min_value=-60000, max_value=60000, allow_nan=False, width=16)
NUMPY_FLOATS = st.sampled_from([np.float16, np.float32, np.float64, ">f8", np.int16])
TORCH_FLOATS = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
ONE_OR_ROW = st.booleans()  # shape [dim], or [1, dim]


@given(
    values=st.lists(FLOAT16_VALUES, min_size=1, max_size=64),
    dtype=NUMPY_FLOATS,
    as_row=ONE_OR_ROW,
    encoding=st.sampled_from(["raw", "vector"]),
)
def test_numpy_arrays_of_every_float_dtype_go_out_as_their_float32_values(
    values, dtype, as_row, encoding
):
    array = np.asarray(values).astype(dtype)
    expected = array.astype(np.float32).ravel()
    msg = convert.to_embedding(array.reshape(1, -1) if as_row else array, encoding=encoding)
    got = raw_values(msg) if encoding == "raw" else np.asarray(msg.vector.values, np.float32)
    assert got.tobytes() == expected.tobytes()


@given(
    values=st.lists(FLOAT16_VALUES, min_size=1, max_size=64),
    dtype=TORCH_FLOATS,
    as_row=ONE_OR_ROW,
    requires_grad=st.booleans(),
)
def test_torch_tensors_of_every_float_dtype_go_out_as_their_float32_values(
    values, dtype, as_row, requires_grad
):
    """bfloat16 too, which numpy cannot hold (`tensor.numpy()` raises for it), and tensors
    that require grad (which `numpy()` refuses too)."""
    tensor = torch.tensor(values, dtype=dtype, requires_grad=requires_grad)
    expected = tensor.detach().to(torch.float32).numpy()
    msg = convert.to_embedding(tensor.reshape(1, -1) if as_row else tensor)
    assert list(msg.raw.shape) == [len(values)]
    assert raw_values(msg).tobytes() == expected.tobytes()


@given(rows=st.integers(0, 5), dim=st.integers(1, 32), dtype=TORCH_FLOATS)
def test_batches_of_torch_tensors_of_every_float_dtype(rows, dim, dtype):
    tensor = torch.randn(rows, dim).to(dtype)
    msgs = convert.to_embeddings(tensor)
    assert len(msgs) == rows
    for row, msg in zip(tensor.to(torch.float32).numpy(), msgs, strict=True):
        assert raw_values(msg).tobytes() == row.tobytes()


@given(
    shape=st.lists(st.integers(2, 4), min_size=2, max_size=3) | st.just([]),
    dtype=TORCH_FLOATS,
)
def test_a_tensor_that_is_not_one_embedding_is_named_with_its_shape_and_dtype(shape, dtype):
    tensor = torch.zeros(shape, dtype=dtype)
    with pytest.raises(InvalidArgumentError) as info:
        convert.to_embedding(tensor, name="query")
    assert info.value.details == (
        "query: expected one embedding (shape [dim] or [1, dim]), got a torch.Tensor of "
        f"shape {shape} and dtype {dtype}"
    )


@pytest.mark.parametrize(
    "value, details",
    [
        (torch.ones(4, dtype=torch.complex64), "embedding: expected real numbers, got a "
         "torch.Tensor of shape [4] and dtype torch.complex64"),
        (torch.ones(4, dtype=torch.bool), "embedding: expected real numbers, got a "
         "torch.Tensor of shape [4] and dtype torch.bool"),
        ([True, False], "embedding: expected numbers, got a list of 2 items (numpy reads it "
         "as dtype bool)"),
        ("0.5", "embedding: expected numbers, got a str"),
        (np.zeros((2, 3), np.float16), "embedding: expected one embedding (shape [dim] or "
         "[1, dim]), got a numpy.ndarray of shape [2, 3] and dtype float16"),
        ([[0.5], [1.5]], "embedding: expected one embedding (shape [dim] or [1, dim]), got a "
         "list of 2 items (shape [2, 1])"),
    ],
)  # fmt: skip
def test_errors_say_what_the_caller_passed(value, details):
    with pytest.raises(InvalidArgumentError) as info:
        convert.to_embedding(value)
    assert info.value.details == details


# --- responses -----------------------------------------------------------------------------


def _decode_response(text: str = "hi") -> decoder_pb2.DecodeResponse:
    return decoder_pb2.DecodeResponse(
        text=text,
        finish_reason=decoder_pb2.FINISH_REASON_EOS,
        usage=decoder_pb2.Usage(generated_tokens=3),
        timing=decoder_pb2.Timing(queue_ms=1.0, compute_ms=2.0, total_ms=3.5),
        model="m",
    )


def test_decode_result():
    result = convert.decode_result(_decode_response())
    assert result.text == "hi"
    assert result.finish_reason is FinishReason.EOS
    assert result.usage == Usage(3)
    assert result.timing == Timing(1.0, 2.0, 3.5)
    assert result.model == "m"


def test_generate_result():
    msg = decoder_pb2.GenerateResponse(
        text="ab",
        token_ids=[97, 98, 0],
        finish_reason=decoder_pb2.FINISH_REASON_STOP,
        mean_logprob=-0.5,
        model="m",
        seed=2**63 + 5,
    )
    result = convert.generate_result(msg)
    assert result.token_ids == [97, 98, 0]
    assert result.finish_reason == "stop"
    assert result.seed == 2**63 + 5
    assert result.mean_logprob == -0.5


def test_stream_chunks_carry_the_summary_only_at_the_end():
    middle = convert.stream_chunk(decoder_pb2.GenerateChunk(text="a", token_ids=[97]))
    assert middle == StreamChunk(text="a", token_ids=[97])
    assert not middle.is_last
    last = convert.stream_chunk(
        decoder_pb2.GenerateChunk(
            text="",
            finish_reason=decoder_pb2.FINISH_REASON_LENGTH,
            usage=decoder_pb2.Usage(generated_tokens=1),
            seed=0,
            model="m",
        )
    )
    assert last.is_last
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage == Usage(1)
    assert last.seed == 0
    assert last.mean_logprob == 0.0


def test_batch_and_stream_items():
    ok = convert.batch_item(decoder_pb2.DecodeBatchResult(response=_decode_response("x")))
    assert ok.ok and ok.unwrap().text == "x" and ok.error is None
    bad = convert.batch_item(
        decoder_pb2.DecodeBatchResult(
            error=decoder_pb2.ItemError(code=5, code_name="NOT_FOUND", message="model: nope")
        )
    )
    assert not bad.ok and bad.result is None
    assert bad.error == NotFoundError("model: nope")
    with pytest.raises(NotFoundError, match="model: nope"):
        bad.unwrap()
    item = convert.stream_item(
        decoder_pb2.DecodeStreamResponse(
            id="7", error=decoder_pb2.ItemError(code=3, message="embedding.raw: bad")
        )
    )
    assert item.id == "7"
    assert isinstance(item.error, InvalidArgumentError)


def test_model_info_card_becomes_a_dict():
    card = struct_pb2.Struct()
    card.update({"encoder": {"name": "mpnet", "dim": 768}, "metrics": {}})
    info = convert.model_info(
        decoder_pb2.ModelInfo(name="ret", embedding_dim=768, card=card, trained=True)
    )
    assert info.card == {"encoder": {"name": "mpnet", "dim": 768.0}, "metrics": {}}
    assert info.trained is True
    assert info.embedding_dim == 768


def test_model_load_is_converted():
    load = decoder_pb2.ModelLoad(
        waiting=2, max_queue_size=7, running=3, max_batch_size=4, batching="static", max_wait_ms=5.5
    )
    info = convert.model_info(decoder_pb2.ModelInfo(name="ret", load=load))
    assert info.load == ModelLoad(
        waiting=2, max_queue_size=7, running=3, max_batch_size=4, batching="static", max_wait_ms=5.5
    )
    assert convert.model_info(decoder_pb2.ModelInfo(name="ret")).load == ModelLoad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.load.running = 0  # type: ignore[misc]
