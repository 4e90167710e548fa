"""The request size limit and the DecodeBatch item limit agree at their defaults: a batch of
max_batch_items raw float32 embeddings is served, and a batch over it (up to twice as long)
gets INVALID_ARGUMENT naming max_batch_items, not RESOURCE_EXHAUSTED from the transport's
message limit. A real daemon at default limits, called through the generated stub."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from retd.server.config import (
    BATCH_ITEM_WIRE_BYTES,
    EMBEDDING_DIM,
    MiB,
    ServerConfig,
    ServiceLimits,
    message_bytes_for,
)
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

DEFAULTS = ServerConfig()
MAX_ITEMS = DEFAULTS.limits.max_batch_items
ROW = np.random.default_rng(5).standard_normal(EMBEDDING_DIM).astype("<f4")


def raw_item() -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=ROW.tobytes(), shape=[EMBEDDING_DIM]))


def vector_item() -> pb.Embedding:
    return pb.Embedding(vector=pb.FloatVector(values=ROW.tolist()))


def batch(count: int, item: Any = raw_item) -> pb.DecodeBatchRequest:
    one = item()
    return pb.DecodeBatchRequest(embeddings=[one] * count, max_new_tokens=1)


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[pb_grpc.DecoderStub]:
    with server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


def test_the_default_message_limit_is_sized_from_the_item_limit() -> None:
    assert (DEFAULTS.max_message_bytes, MAX_ITEMS) == (0, 1024)
    assert DEFAULTS.message_limit == message_bytes_for(MAX_ITEMS) == 8 * MiB
    for item in (raw_item, vector_item):
        # The declared per-item size covers what protobuf really writes, either encoding.
        per_item = len(batch(100, item).SerializeToString()) / 100
        assert EMBEDDING_DIM * 4 < per_item <= BATCH_ITEM_WIRE_BYTES, item
        assert len(batch(2 * MAX_ITEMS, item).SerializeToString()) < DEFAULTS.message_limit
    assert (
        ServerConfig(limits=ServiceLimits(max_batch_items=4096)).message_limit
        >= 2 * 4096 * BATCH_ITEM_WIRE_BYTES
    )
    assert ServerConfig(max_message_bytes=100_000).message_limit == 100_000  # set: as set


def test_a_batch_at_the_item_limit_is_served(stub: pb_grpc.DecoderStub) -> None:
    response = stub.DecodeBatch(batch(MAX_ITEMS), timeout=300)
    assert len(response.results) == MAX_ITEMS
    assert all(r.WhichOneof("outcome") == "response" for r in response.results)
    assert {r.response.text for r in response.results} == {response.results[0].response.text}


@pytest.mark.parametrize("count", [MAX_ITEMS + 1, 2_000, 2 * MAX_ITEMS])
@pytest.mark.parametrize("item", [raw_item, vector_item], ids=["raw", "vector"])
def test_a_batch_over_the_item_limit_is_invalid_argument_naming_it(
    stub: pb_grpc.DecoderStub, count: int, item: Any
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.DecodeBatch(batch(count, item), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert raised.value.details() == (
        f"embeddings: {count} items exceed the server's max_batch_items {MAX_ITEMS}; "
        "split the batch"
    )
