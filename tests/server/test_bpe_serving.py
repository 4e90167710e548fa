"""A checkpoint with its own BPE tokenizer, served by the real daemon: every form answers the
text `generate()` gives here with that tokenizer (tokens of several bytes turned into text,
streams rejoined, stop strings cut), and ModelInfo tells the vocabulary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.model.checkpoint import save_checkpoint
from retd.model.generation import FinishReason, SamplingParams, generate
from retd.model.model import RET, config_for
from retd.model.tokenizer import Tokenizer, train_bpe
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
QUERIES = np.load(FIXTURE / "embeddings" / "heldout" / "shard-00000.npy")[:12].astype(np.float32)
MAX_NEW = 40


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    texts = (FIXTURE / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    return train_bpe(texts, 320)


@pytest.fixture(scope="module")
def model(bpe: Tokenizer) -> RET:
    # One wide block of random weights: it answers each embedding differently.
    model = RET(config_for("ret_v21_wide", {"vocab_size": 320, "max_length": 64}))
    model.init_weights(generator=torch.Generator().manual_seed(5))
    return model.eval()


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory, model: RET, bpe: Tokenizer
) -> Iterator[pb_grpc.DecoderStub]:
    folder = tmp_path_factory.mktemp("bpe")
    checkpoint = save_checkpoint(
        model, folder / "ck", architecture="ret_v21_wide", card={"trained": True}, tokenizer=bpe
    )
    server: RunningServer = start_server(folder, ["--checkpoint", str(checkpoint)])
    with server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)
    assert server.stop() == 0, server.log()


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def local(model: RET, bpe: Tokenizer, params: list[SamplingParams]) -> list[str]:
    results = generate(model, torch.from_numpy(QUERIES[: len(params)]), params, tokenizer=bpe)
    return [r.text for r in results]


def test_model_info_tells_the_vocabulary(stub: pb_grpc.DecoderStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.vocab_size == 320 and info.max_length == 64
    assert info.card["tokenizer"]["kind"] == "bpe"


def test_decode_and_batches_answer_what_generate_gives_with_the_tokenizer(
    stub: pb_grpc.DecoderStub, model: RET, bpe: Tokenizer
) -> None:
    expected = local(model, bpe, [SamplingParams(MAX_NEW)] * len(QUERIES))
    answers = [
        stub.Decode(pb.DecodeRequest(embedding=as_pb(q), max_new_tokens=MAX_NEW), timeout=60)
        for q in QUERIES
    ]
    assert [a.text for a in answers] == expected
    assert any(len(a.text.encode()) > a.usage.generated_tokens for a in answers)  # merged tokens
    batch = stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[as_pb(q) for q in QUERIES], max_new_tokens=MAX_NEW),
        timeout=60,
    )
    assert [r.response.text for r in batch.results] == expected


def test_sampled_generate_and_its_stream_match_and_rejoin(
    stub: pb_grpc.DecoderStub, model: RET, bpe: Tokenizer
) -> None:
    params = [SamplingParams(MAX_NEW, temperature=1.0, seed=100 + i) for i in range(6)]
    expected = local(model, bpe, params)
    for i, text in enumerate(expected):
        request = pb.GenerateRequest(
            embedding=as_pb(QUERIES[i]), max_new_tokens=MAX_NEW, temperature=1.0, seed=100 + i
        )
        answer = stub.Generate(request, timeout=60)
        assert answer.text == text == bpe.decode(t for t in answer.token_ids if t != 0)
        assert "".join(c.text for c in stub.GenerateStream(request, timeout=60)) == text


def test_a_stop_string_inside_a_token_cuts_the_text_there(
    stub: pb_grpc.DecoderStub, model: RET, bpe: Tokenizer
) -> None:
    results = generate(
        model, torch.from_numpy(QUERIES), [SamplingParams(MAX_NEW)] * len(QUERIES), tokenizer=bpe
    )
    # a stop that begins inside a merged token of some answer: that token's bytes but the first
    index, stop = next(
        (i, bpe.pieces[t][1:].decode())
        for i, r in enumerate(results)
        for t in r.token_ids
        if t >= 256 and bpe.pieces[t].isascii()
    )
    text = results[index].text
    assert stop in text
    request = pb.GenerateRequest(
        embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW, temperature=0.0, stop=[stop]
    )
    answer = stub.Generate(request, timeout=60)
    assert answer.finish_reason == pb.FINISH_REASON_STOP
    assert answer.text == text[: text.find(stop)]
    params = SamplingParams(MAX_NEW, stop=(stop,))
    result = generate(model, torch.from_numpy(QUERIES[index : index + 1]), [params], tokenizer=bpe)
    assert result[0].finish_reason is FinishReason.STOP and result[0].text == answer.text
    streamed = "".join(c.text for c in stub.GenerateStream(request, timeout=60))
    assert streamed == answer.text
