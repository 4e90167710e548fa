"""A RET model and a phrase bank served side by side by the real daemon, called through the
stub generated from decoder.proto and through the retd client: each answers what it should,
the bank's scores are numpy's cosines, hybrid decoding picks the right source, and bad
requests get clear statuses."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.client import AnswerSource, AsyncClient, Client, FinishReason, Hybrid
from retd.client.errors import InvalidArgumentError, NotFoundError
from retd.model.checkpoint import CARD_FILE, init_checkpoint, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from retd.model.phrase_bank import load_phrase_bank, save_phrase_bank
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.test_bench import bench

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
SPLIT = load_split(FIXTURE, "train")
TEXTS = SPLIT.texts  # 192 distinct texts
MEMBERS = SPLIT.embeddings.astype(np.float32)  # their all-mpnet-base-v2 embeddings
RET, BANK = "ret", "bank"
SERVER_CALLS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def stranger(seed: int) -> np.ndarray:
    """A random direction: far from every phrase of the bank (cosine around 0)."""
    return np.random.default_rng(seed).standard_normal(768).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("two_models")
    return {
        RET: init_checkpoint(folder / "ret_v21", seed=21),
        BANK: save_phrase_bank(folder / "bank", TEXTS, MEMBERS, name="fixture-bank"),
    }


@pytest.fixture(scope="module")
def served(checkpoints: dict[str, Path]) -> Iterator[RunningServer]:
    folder = checkpoints[RET].parent
    args = ["--model", f"{RET}={checkpoints[RET]}", "--model", f"{BANK}={checkpoints[BANK]}"]
    server = start_server(folder, [*args, "--max-batch-size", "16", "--access-log", "on"])
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()


@pytest.fixture(scope="module")
def stub(served: RunningServer) -> Iterator[pb_grpc.DecoderStub]:
    with served.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[Client]:
    with Client(served.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def bank_matrix(checkpoints: dict[str, Path]) -> np.ndarray:
    """The bank's rows as the server holds them (float16 on disk, served as float32)."""
    return load_phrase_bank(checkpoints[BANK]).bank.embeddings.float().numpy()


@pytest.fixture(scope="module")
def ret_alone(checkpoints: dict[str, Path]) -> object:
    model = load_checkpoint(checkpoints[RET]).model

    def decode(values: np.ndarray, max_new_tokens: int) -> str:
        embedding = torch.from_numpy(values)[None]
        return generate(model, embedding, [SamplingParams(max_new_tokens)])[0].text

    return decode


def cosines(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    return matrix @ (query / np.linalg.norm(query))


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code(), raised.value.details()


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


# ---- a bank that cannot load -----------------------------------------------------------------


def test_a_broken_bank_stops_the_daemon_with_the_reason(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    broken = save_phrase_bank(tmp_path / "broken", TEXTS[:3], MEMBERS[:3], name="broken")
    card = json.loads((broken / CARD_FILE).read_text())
    (broken / CARD_FILE).write_text(json.dumps({**card, "phrase_count": 4}))
    with pytest.raises(RuntimeError, match="card.json names 4 phrases but phrases.json holds 3"):
        start_server(tmp_path, ["--model", f"{RET}={checkpoints[RET]}", "--model", f"b={broken}"])


# ---- retd bench ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decode", "generate", "decode_batch"])
def test_bench_targets_the_bank(served: RunningServer, mode: str) -> None:
    report = bench(
        "--target", served.address, "--model", BANK, "--mode", mode, "-c", "4", "-n", "12",
        "-b", "3",
    )  # fmt: skip
    assert report["errors"] == {} and report["requests"] == 12
    assert report["tokens_per_s"] == 0  # a bank generates no byte: it returns phrases


def test_bench_raw_times_the_banks_search(checkpoints: dict[str, Path]) -> None:
    raw = bench("--raw", "--checkpoint", str(checkpoints[BANK]), "-b", "4", "-n", "8")
    assert raw["raw"] and raw["sequences"] == 8 and raw["batch_size"] == 4
    assert raw["extra"]["phrases"] == 192 and raw["extra"]["dtype"] == "float32"


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
