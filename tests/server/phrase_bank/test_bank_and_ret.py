"""A RET model and a phrase bank served side by side by the real daemon, called through the
stub generated from decoder.proto and through the retd client: each answers what it should,
and the bank's scores are numpy's cosines."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from retd.client import AnswerSource, AsyncClient, Client, FinishReason
from retd.client.errors import InvalidArgumentError
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer
from tests.server.phrase_bank.conftest import (
    BANK,
    MEMBERS,
    RET,
    SERVER_CALLS,
    TEXTS,
    as_pb,
    cosines,
    stranger,
)

# ---- the bank alone --------------------------------------------------------------------------


def test_top1_of_every_member_is_its_own_phrase(stub: pb_grpc.DecoderStub) -> None:
    request = pb.DecodeBatchRequest(model=BANK, embeddings=[as_pb(e) for e in MEMBERS])
    results = stub.DecodeBatch(request, timeout=60).results
    assert [r.response.text for r in results] == TEXTS
    for result in results:
        response = result.response
        assert response.model == BANK and response.source == pb.ANSWER_SOURCE_PHRASE_BANK
        assert response.similarity == pytest.approx(1.0, abs=2e-3)
        assert response.finish_reason == pb.FINISH_REASON_EOS
        assert response.usage.generated_tokens == 0


@SERVER_CALLS
@given(index=st.integers(0, len(TEXTS) - 1), scale=st.floats(1e-2, 1e2))
def test_decode_returns_the_member_whatever_the_embeddings_length(
    client: Client, index: int, scale: float
) -> None:
    result = client.decode(MEMBERS[index] * scale, model=BANK, max_new_tokens=1)
    assert result.text == TEXTS[index]  # whole: max_new_tokens does not cut a phrase
    assert result.source is AnswerSource.PHRASE_BANK and result.model == BANK
    assert result.finish_reason is FinishReason.EOS


@SERVER_CALLS
@given(seed=st.integers(0, 2**32 - 1), top_k=st.integers(0, 30), member=st.booleans())
def test_generate_candidates_are_numpys_cosines_best_first(
    client: Client, bank_matrix: np.ndarray, seed: int, top_k: int, member: bool
) -> None:
    query = MEMBERS[seed % len(TEXTS)] if member else stranger(seed)
    result = client.generate(query, model=BANK, top_k=top_k)
    wanted = top_k or 5
    assert len(result.candidates) == wanted
    scores = np.array([c.score for c in result.candidates])
    assert np.all(np.diff(scores) <= 0)
    expected = cosines(bank_matrix, query)
    np.testing.assert_allclose(scores, expected[[c.index for c in result.candidates]], atol=1e-5)
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:wanted], atol=1e-5)
    assert [c.text for c in result.candidates] == [TEXTS[c.index] for c in result.candidates]
    assert result.text == result.candidates[0].text
    assert result.token_ids == [] and result.finish_reason is FinishReason.EOS


def test_sampling_fields_are_checked_then_ignored(client: Client) -> None:
    plain = client.generate(MEMBERS[3], model=BANK)
    sampled = client.generate(
        MEMBERS[3], model=BANK, temperature=1.7, top_p=0.5, seed=99, stop=["e"]
    )
    assert sampled.candidates == plain.candidates and sampled.text == TEXTS[3]
    assert sampled.seed == 99 and plain.seed == 0
    with pytest.raises(InvalidArgumentError, match="temperature: -1.0 is invalid"):
        client.generate(MEMBERS[3], model=BANK, temperature=-1.0)
    with pytest.raises(InvalidArgumentError, match=r"top_k: 101 candidates exceed the 100"):
        client.generate(MEMBERS[3], model=BANK, top_k=101)


def test_a_stream_is_the_phrase_then_the_last_chunk(client: Client) -> None:
    chunks = list(client.generate_stream(MEMBERS[7], model=BANK, top_k=3))
    assert [c.text for c in chunks] == [TEXTS[7], ""]
    assert not chunks[0].is_last and chunks[1].is_last
    assert chunks[1].finish_reason is FinishReason.EOS and chunks[1].model == BANK
    assert [c.text for c in chunks[1].candidates][0] == TEXTS[7]
    assert chunks[1].candidates == client.generate(MEMBERS[7], model=BANK, top_k=3).candidates


def test_model_info_describes_the_bank(client: Client) -> None:
    info = client.model_info(BANK)
    assert (info.kind, info.architecture, info.phrase_count) == ("phrase_bank", "phrase_bank", 192)
    assert info.embedding_dim == 768 and info.vocab_size == 0 and info.trained
    assert info.max_length == max(len(t.encode()) for t in TEXTS)
    assert info.parameter_count == 192 * 768
    assert info.encoder == "sentence-transformers/all-mpnet-base-v2"
    assert info.dtype == "float32" and info.card["name"] == "fixture-bank"
    assert info.load.max_batch_size == 16
    ret = client.model_info(RET)
    assert (ret.kind, ret.phrase_count, ret.architecture) == ("ret", 0, "ret_v21")
    assert {m.name: m.kind for m in client.list_models()} == {RET: "ret", BANK: "phrase_bank"}


def test_health_per_model(served: RunningServer) -> None:
    with served.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in (RET, BANK):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- two models at once ------------------------------------------------------------------------


def test_two_models_answer_at_once(served: RunningServer, ret_alone: object) -> None:
    """Interleaved concurrent calls to both models: each gets its own model's answer."""

    async def main() -> list[tuple[str, int, str]]:
        async with AsyncClient(served.address, timeout=60) as client:

            async def call(i: int) -> tuple[str, int, str]:
                if i % 2:
                    return BANK, i, (await client.decode(MEMBERS[i], model=BANK)).text
                result = await client.decode(stranger(i), model=RET, max_new_tokens=8)
                assert result.source is AnswerSource.GENERATED and result.similarity is None
                return RET, i, result.text

            return await asyncio.gather(*(call(i) for i in range(16)))

    for model, i, text in asyncio.run(main()):
        if model == BANK:
            assert text == TEXTS[i]
        else:
            assert text == ret_alone(stranger(i), 8)  # type: ignore[operator]


def test_a_stream_of_items_for_both_models(stub: pb_grpc.DecoderStub, ret_alone: object) -> None:
    items = [
        pb.DecodeStreamRequest(id=f"b{i}", model=BANK, embedding=as_pb(MEMBERS[i]))
        for i in range(5)
    ] + [
        pb.DecodeStreamRequest(
            id=f"r{i}", model=RET, embedding=as_pb(stranger(i)), max_new_tokens=6
        )
        for i in range(3)
    ]
    answers = {a.id: a.response for a in stub.DecodeStream(iter(items), timeout=60)}
    assert {answers[f"b{i}"].text for i in range(5)} == set(TEXTS[:5])
    for i in range(5):
        assert answers[f"b{i}"].text == TEXTS[i]
    for i in range(3):
        assert answers[f"r{i}"].text == ret_alone(stranger(i), 6)  # type: ignore[operator]
        assert answers[f"r{i}"].source == pb.ANSWER_SOURCE_GENERATED


def test_ret_generate_has_no_candidates(client: Client) -> None:
    result = client.generate(stranger(1), model=RET, max_new_tokens=4, seed=1)
    assert result.candidates == [] and len(result.token_ids) >= 1


def test_the_access_log_names_the_bank(served: RunningServer, client: Client) -> None:
    client.generate(MEMBERS[0], model=BANK)
    line = re.compile(r"retd\.access: Generate OK [\d.]+ms 0 tokens bank$", re.MULTILINE)
    # Written as the call ends, a moment after the reply.
    poll(lambda: line.search(served.log()), 10, lambda: f"the line in {served.log()[-2000:]}")
