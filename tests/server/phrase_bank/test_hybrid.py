"""Hybrid decoding against the real daemon serving a RET model and a phrase bank: it picks
the right source (Decode, batches, streams, the async client), and bad hybrid and bank
requests get clear statuses."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retd.client import AnswerSource, AsyncClient, Client, Hybrid
from retd.client.errors import InvalidArgumentError, NotFoundError
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.server.phrase_bank.conftest import (
    BANK,
    MEMBERS,
    RET,
    SERVER_CALLS,
    TEXTS,
    as_pb,
    cosines,
    status_of,
    stranger,
)

# ---- hybrid decoding -----------------------------------------------------------------------------


def test_hybrid_takes_the_bank_above_the_threshold(client: Client) -> None:
    result = client.decode(MEMBERS[11], hybrid=Hybrid(BANK, 0.9), max_new_tokens=8)
    assert result.source is AnswerSource.PHRASE_BANK and result.model == BANK
    assert result.text == TEXTS[11]
    assert result.similarity == pytest.approx(1.0, abs=2e-3)


def test_hybrid_generates_below_the_threshold(
    client: Client, bank_matrix: np.ndarray, ret_alone: object
) -> None:
    query = stranger(5)
    result = client.decode(query, model=RET, hybrid=Hybrid(BANK, 0.9), max_new_tokens=8)
    assert result.source is AnswerSource.GENERATED and result.model == RET
    assert result.text == ret_alone(query, 8)  # type: ignore[operator]
    assert result.similarity == pytest.approx(cosines(bank_matrix, query).max(), abs=1e-5)
    assert result.timing.total_ms >= result.timing.compute_ms > 0


@SERVER_CALLS
@given(seed=st.integers(0, 2**32 - 1), threshold=st.floats(-1.0, 1.0, width=32))
def test_hybrid_source_follows_the_threshold(
    client: Client, bank_matrix: np.ndarray, seed: int, threshold: float
) -> None:
    """Members score about 1, strangers about 0: any threshold splits them the same way."""
    query = MEMBERS[seed % len(TEXTS)] if seed % 2 else stranger(seed)
    result = client.decode(query, hybrid=Hybrid(BANK, threshold), max_new_tokens=4)
    best = cosines(bank_matrix, query).max()
    assert result.similarity == pytest.approx(best, abs=1e-5)
    assert result.similarity is not None
    if result.similarity >= threshold:
        assert result.source is AnswerSource.PHRASE_BANK
        assert result.text == TEXTS[int(cosines(bank_matrix, query).argmax())]
    else:
        assert result.source is AnswerSource.GENERATED and result.model == RET


def test_hybrid_batches_and_streams_answer_each_item_like_a_hybrid_decode(
    stub: pb_grpc.DecoderStub, ret_alone: object
) -> None:
    """Members come from the bank, strangers are generated; a bad item fails alone."""
    queries = [MEMBERS[2], stranger(7), MEMBERS[40], stranger(8)]
    hybrid = pb.Hybrid(phrase_bank=BANK, min_similarity=0.9)
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(
            model=RET, embeddings=[as_pb(q) for q in queries], max_new_tokens=8, hybrid=hybrid
        ),
        timeout=60,
    )
    expected = [
        (pb.ANSWER_SOURCE_PHRASE_BANK, BANK, TEXTS[2]),
        (pb.ANSWER_SOURCE_GENERATED, RET, ret_alone(queries[1], 8)),  # type: ignore[operator]
        (pb.ANSWER_SOURCE_PHRASE_BANK, BANK, TEXTS[40]),
        (pb.ANSWER_SOURCE_GENERATED, RET, ret_alone(queries[3], 8)),  # type: ignore[operator]
    ]
    got = [(r.response.source, r.response.model, r.response.text) for r in batch.results]
    assert got == expected
    assert all(r.response.HasField("similarity") for r in batch.results)
    items = [
        pb.DecodeStreamRequest(
            id=str(i), model=RET, embedding=as_pb(q), max_new_tokens=8, hybrid=hybrid
        )
        for i, q in enumerate(queries)
    ]
    items.append(  # a bank that is not loaded fails this item only
        pb.DecodeStreamRequest(
            id="bad", model=RET, embedding=as_pb(queries[0]),
            hybrid=pb.Hybrid(phrase_bank="faq", min_similarity=0.5),
        )
    )  # fmt: skip
    answers = {a.id: a for a in stub.DecodeStream(iter(items), timeout=60)}
    streamed = [
        (
            answers[str(i)].response.source,
            answers[str(i)].response.model,
            answers[str(i)].response.text,
        )
        for i in range(len(queries))
    ]
    assert streamed == expected
    assert answers["bad"].error.code_name == "NOT_FOUND"
    assert "hybrid.phrase_bank: 'faq' is not loaded" in answers["bad"].error.message


# ---- bad requests --------------------------------------------------------------------------------


def hybrid_request(bank: str, threshold: float | None, **fields: object) -> pb.DecodeRequest:
    hybrid = pb.Hybrid(phrase_bank=bank)
    if threshold is not None:
        hybrid.min_similarity = threshold
    embedding = fields.pop("embedding", as_pb(MEMBERS[0]))
    return pb.DecodeRequest(embedding=embedding, hybrid=hybrid, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            hybrid_request("faq", 0.5),
            grpc.StatusCode.NOT_FOUND,
            "hybrid.phrase_bank: 'faq' is not loaded; expected a phrase_bank model, one of "
            "['bank']",
        ),
        (
            hybrid_request("", 0.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.phrase_bank: empty; expected a phrase_bank model, one of ['bank']",
        ),
        (
            hybrid_request(RET, 0.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.phrase_bank: 'ret' is a 'ret' model; expected a phrase_bank model",
        ),
        (
            hybrid_request(BANK, 0.5, model=BANK),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model: 'bank' is a 'phrase_bank' model; hybrid decoding falls back to a generative "
            "('ret') model, one of ['ret']",
        ),
        (
            hybrid_request(BANK, 0.5, model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "model: 'nope' is not loaded",
        ),
        (
            hybrid_request(BANK, None),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.min_similarity: missing; expected a cosine similarity in [-1, 1]",
        ),
        (
            hybrid_request(BANK, 1.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.min_similarity: 1.5 is outside [-1, 1]",
        ),
        (
            hybrid_request(BANK, -1.01),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.min_similarity: -1.01 is outside [-1, 1]",
        ),
        (
            hybrid_request(BANK, float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "hybrid.min_similarity: nan is outside [-1, 1]",
        ),
        (
            hybrid_request(BANK, 0.5, max_new_tokens=100_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens: 100000 exceeds the max_length of model 'ret'",
        ),
        (
            hybrid_request(BANK, 0.5, embedding=as_pb(np.zeros(768, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "embedding: all zeros",
        ),
    ],
)
def test_bad_hybrid_requests_get_clear_statuses(
    stub: pb_grpc.DecoderStub, request_: pb.DecodeRequest, code: grpc.StatusCode, message: str
) -> None:
    got_code, details = status_of(lambda: stub.Decode(request_, timeout=30))
    assert got_code == code and message in details, details


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda s: s.Decode(pb.DecodeRequest(model=BANK, embedding=as_pb(np.ones(768) * 0))),
            "embedding: all zeros; a phrase bank ranks phrases by cosine similarity",
        ),
        (
            lambda s: s.Decode(
                pb.DecodeRequest(
                    model=BANK, embedding=pb.Embedding(vector=pb.FloatVector(values=[0.1] * 5))
                )
            ),
            "embedding: got 5 values; expected 768 float32 values (a "
            "sentence-transformers/all-mpnet-base-v2 embedding, which model 'bank' decodes)",
        ),
        (
            lambda s: s.Generate(
                pb.GenerateRequest(
                    model=BANK, embedding=as_pb(np.full(768, np.nan, np.float32)), top_k=3
                )
            ),
            "embedding: value 0 is nan; expected finite floats",
        ),
        (
            lambda s: s.Generate(
                pb.GenerateRequest(model=BANK, embedding=as_pb(MEMBERS[0]), top_p=0.0)
            ),
            "top_p: 0.0 is outside (0, 1]",
        ),
    ],
)
def test_bad_bank_requests_get_invalid_argument(
    stub: pb_grpc.DecoderStub, call: object, message: str
) -> None:
    code, details = status_of(lambda: call(stub))  # type: ignore[operator]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


def test_a_bad_item_fails_alone_in_a_bank_batch(stub: pb_grpc.DecoderStub) -> None:
    items = [as_pb(MEMBERS[0]), as_pb(np.zeros(768, np.float32)), as_pb(MEMBERS[2])]
    results = stub.DecodeBatch(pb.DecodeBatchRequest(model=BANK, embeddings=items)).results
    assert [r.response.text for r in results if r.HasField("response")] == [TEXTS[0], TEXTS[2]]
    assert results[1].error.code_name == "INVALID_ARGUMENT"
    assert results[1].error.message.startswith("embeddings[1]: all zeros")


def test_client_side_hybrid_checks(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="hybrid: expected a retd.client.Hybrid"):
        client.decode(MEMBERS[0], hybrid=("bank", 0.5))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="hybrid.min_similarity: expected a number"):
        client.decode(MEMBERS[0], hybrid=Hybrid(BANK, "high"))  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="'faq' is not loaded"):
        client.decode(MEMBERS[0], hybrid=Hybrid("faq", 0.5))


def test_async_client_hybrid_batches_and_streams(served: RunningServer) -> None:
    hybrid = Hybrid(BANK, 0.9)
    queries = [MEMBERS[5], stranger(9)]

    async def call() -> tuple[list, list]:
        async with AsyncClient(served.address, timeout=60) as client:
            batch = await client.decode_batch(queries, model=RET, max_new_tokens=8, hybrid=hybrid)
            pairs = [("m", queries[0]), ("s", queries[1])]
            streamed = [
                item
                async for item in client.decode_stream(
                    pairs, model=RET, max_new_tokens=8, hybrid=hybrid
                )
            ]
        return batch, streamed

    batch, streamed = asyncio.run(call())
    sources = [item.unwrap().source for item in batch]
    assert sources == [AnswerSource.PHRASE_BANK, AnswerSource.GENERATED]
    assert batch[0].unwrap().text == TEXTS[5]
    by_id = {item.id: item.unwrap() for item in streamed}
    assert by_id["m"].source is AnswerSource.PHRASE_BANK and by_id["m"].text == TEXTS[5]
    assert by_id["s"].source is AnswerSource.GENERATED and by_id["s"].text == batch[1].unwrap().text
