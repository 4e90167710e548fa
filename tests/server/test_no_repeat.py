"""The loop breakers served by the real daemon: Decode, Generate, GenerateStream, DecodeBatch
and DecodeStream give exactly what `generate` gives here with the same setting, whatever else
shares the batch; the decode forms apply the server's default loop breakers when a request
sets none (and none when it sets them off); bad values get INVALID_ARGUMENT."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from retd.server.config import DecodeDefaults
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server

HEAD = load_split(Path(__file__).parents[1] / "data" / "heldout_head", "heldout")
QUERIES = HEAD.embeddings[:24].astype(np.float32)  # real embeddings of held-out sentences
MAX_NEW = 80


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


@pytest.fixture(scope="module")
def expected() -> dict[int, list[str]]:
    """The shipped model's texts for QUERIES, per n-gram size (0: plain greedy), computed here."""
    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = {}
    for n in (0, 3, 6):
        params = [SamplingParams(MAX_NEW, no_repeat_ngram_size=n)] * len(QUERIES)
        texts[n] = [
            r.text for r in generate(model, torch.from_numpy(QUERIES), params, tokenizer=tokenizer)
        ]
    assert texts[0] != texts[6], "the setting must change some answers to be tested"
    default = SamplingParams(MAX_NEW, **dataclasses.asdict(DecodeDefaults().for_card(loaded.card)))
    results = generate(model, torch.from_numpy(QUERIES), [default] * 24, tokenizer=tokenizer)
    texts[-1] = [r.text for r in results]
    assert texts[-1] != texts[0], "the default must change some answers to be tested"
    return texts  # texts[-1]: the server's default loop breakers


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.DecoderStub]:
    server: RunningServer = start_server(
        tmp_path_factory.mktemp("no_repeat"),
        ["--checkpoint", str(DEFAULT_CHECKPOINT)],
        plain_decode=False,  # the server's own default loop breakers
    )
    with server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)
    assert server.stop() == 0, server.log()


def decode(stub: pb_grpc.DecoderStub, index: int, n: int) -> str:
    request = pb.DecodeRequest(
        embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW, no_repeat_ngram_size=n,
        repetition_penalty=1.0, eos_bias=0.0,
    )  # fmt: skip
    return stub.Decode(request, timeout=60).text


def test_decode_calls_with_and_without_it_share_batches_and_get_their_own_answers(
    stub: pb_grpc.DecoderStub, expected: dict[int, list[str]]
) -> None:
    calls = [(index, n) for index in range(len(QUERIES)) for n in (0, 3, 6)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda call: decode(stub, *call), calls))
    for (index, n), text in zip(calls, answers, strict=True):
        assert text == expected[n][index], (index, n)


def test_generate_and_its_stream_honour_it(
    stub: pb_grpc.DecoderStub, expected: dict[int, list[str]]
) -> None:
    for index in range(4):
        request = pb.GenerateRequest(
            embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW, temperature=0.0,
            no_repeat_ngram_size=6,
        )  # fmt: skip
        assert stub.Generate(request, timeout=60).text == expected[6][index]
        streamed = "".join(c.text for c in stub.GenerateStream(request, timeout=60))
        assert streamed == expected[6][index]


def test_batch_and_stream_items_honour_it(
    stub: pb_grpc.DecoderStub, expected: dict[int, list[str]]
) -> None:
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(
            embeddings=[as_pb(q) for q in QUERIES[:8]], max_new_tokens=MAX_NEW,
            no_repeat_ngram_size=3, repetition_penalty=1.0, eos_bias=0.0,
        ),
        timeout=60,
    )  # fmt: skip
    assert [r.response.text for r in batch.results] == expected[3][:8]
    items = [
        pb.DecodeStreamRequest(
            id=f"{i}-{n}", embedding=as_pb(QUERIES[i]), max_new_tokens=MAX_NEW,
            no_repeat_ngram_size=n, repetition_penalty=1.0, eos_bias=0.0,
        )
        for i in range(8) for n in (0, 6)
    ]  # fmt: skip
    answers = {a.id: a.response.text for a in stub.DecodeStream(iter(items), timeout=60)}
    assert answers == {f"{i}-{n}": expected[n][i] for i in range(8) for n in (0, 6)}


def test_a_too_large_size_is_invalid_and_names_the_field(stub: pb_grpc.DecoderStub) -> None:
    for call in (
        lambda: stub.Decode(
            pb.DecodeRequest(embedding=as_pb(QUERIES[0]), no_repeat_ngram_size=257), timeout=30
        ),
        lambda: stub.Generate(
            pb.GenerateRequest(embedding=as_pb(QUERIES[0]), no_repeat_ngram_size=1000), timeout=30
        ),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no_repeat_ngram_size:" in raised.value.details()
        assert "expected 0 (off) to 256 tokens" in raised.value.details()


def test_decode_forms_apply_the_default_loop_breakers_unless_set(
    stub: pb_grpc.DecoderStub, expected: dict[int, list[str]]
) -> None:
    for index in range(6):
        bare = pb.DecodeRequest(embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW)
        assert not bare.HasField("no_repeat_ngram_size")  # what a grpcurl caller sends
        assert stub.Decode(bare, timeout=60).text == expected[-1][index]
        off = pb.DecodeRequest(
            embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW, no_repeat_ngram_size=0,
            repetition_penalty=1.0, eos_bias=0.0,
        )  # fmt: skip
        assert stub.Decode(off, timeout=60).text == expected[0][index]
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[as_pb(q) for q in QUERIES[:8]], max_new_tokens=MAX_NEW),
        timeout=60,
    )
    assert [r.response.text for r in batch.results] == expected[-1][:8]
    items = [
        pb.DecodeStreamRequest(id=str(i), embedding=as_pb(QUERIES[i]), max_new_tokens=MAX_NEW)
        for i in range(8)
    ]
    answers = {a.id: a.response.text for a in stub.DecodeStream(iter(items), timeout=60)}
    assert answers == {str(i): expected[-1][i] for i in range(8)}
    # Generate keeps its defaults: greedy Generate that sets nothing is plain greedy.
    plain = pb.GenerateRequest(embedding=as_pb(QUERIES[0]), max_new_tokens=MAX_NEW, temperature=0.0)
    assert stub.Generate(plain, timeout=60).text == expected[0][0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"repetition_penalty": 0.5},
            "repetition_penalty: 0.5 is invalid; expected a number in [1, 10]",
        ),
        ({"repetition_penalty": 11.0}, "repetition_penalty: 11 is invalid"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty: nan is invalid"),
        ({"repetition_ngram_size": 0}, "repetition_ngram_size: 0 is invalid; expected 1"),
        ({"repetition_ngram_size": 257}, "repetition_ngram_size: 257 is invalid"),
        ({"eos_bias": 21.0}, "eos_bias: 21 is invalid; expected a number in [-20, 20]"),
        ({"eos_bias": float("-inf")}, "eos_bias: -inf is invalid"),
    ],
)
def test_bad_loop_breakers_are_invalid_and_name_the_field(
    stub: pb_grpc.DecoderStub, fields: dict[str, float], message: str
) -> None:
    embedding = as_pb(QUERIES[0])
    with pytest.raises(grpc.RpcError) as raised:
        stub.Decode(pb.DecodeRequest(embedding=embedding, **fields), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    batch = stub.DecodeBatch(pb.DecodeBatchRequest(embeddings=[embedding], **fields), timeout=30)
    assert batch.results[0].error.code_name == "INVALID_ARGUMENT"
    assert message in batch.results[0].error.message


def test_eos_bias_lengthens_and_shortens_answers_in_every_decode_form(
    stub: pb_grpc.DecoderStub,
) -> None:
    """A strong bias against EOS runs every answer to its length; one for it ends each at
    once; 0 (the server's default here) is what `generate` gives with the default breakers."""
    embedding = as_pb(QUERIES[0])
    longest = stub.Decode(pb.DecodeRequest(embedding=embedding, max_new_tokens=40, eos_bias=-20))
    assert longest.finish_reason == pb.FINISH_REASON_LENGTH
    assert longest.usage.generated_tokens == 40
    ended = stub.Decode(pb.DecodeRequest(embedding=embedding, eos_bias=20))
    assert (ended.text, ended.finish_reason) == ("", pb.FINISH_REASON_EOS)
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[embedding] * 2, max_new_tokens=40, eos_bias=-20)
    )
    assert [r.response.text for r in batch.results] == [longest.text] * 2
    (streamed,) = stub.DecodeStream(
        iter([pb.DecodeStreamRequest(id="a", embedding=embedding, eos_bias=20)])
    )
    assert streamed.response.finish_reason == pb.FINISH_REASON_EOS
