"""A fault inside the model step fails only the sequence that caused it: its batch-mates
finish correctly and the daemon keeps serving (the test-only `ret_faulty` model kind raises
while a marked embedding is in the step: `tests.faulty_model`, which the server subprocess
registers by running as `python -m tests.faulty_model`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.model.checkpoint import init_checkpoint, load_checkpoint
from retd.model.generation import SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server
from tests.faulty_model import ARCHITECTURE, FAULT_MARKER

RNG = np.random.default_rng(17)
EMBEDDINGS = RNG.standard_normal((6, 768)).astype(np.float32)
MARKED = EMBEDDINGS[2].copy()
MARKED[0] = FAULT_MARKER


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    folder = tmp_path_factory.mktemp("faulty")
    checkpoint = init_checkpoint(folder / ARCHITECTURE, seed=5, architecture=ARCHITECTURE)
    server = start_server(
        folder,
        ["--checkpoint", str(checkpoint), "--max-batch-size", "8"],
        module="tests.faulty_model",
    )
    yield server, checkpoint
    assert server.stop(signal.SIGTERM) == 0, server.log()


def alone(checkpoint: Path, values: np.ndarray, max_new_tokens: int) -> str:
    loaded = load_checkpoint(checkpoint)
    embedding = torch.from_numpy(values)[None]
    params = [SamplingParams(max_new_tokens)]
    return generate(loaded.model, embedding, params, tokenizer=loaded.tokenizer)[0].text


def test_a_marked_item_fails_alone_in_its_batch(faulty: tuple[RunningServer, Path]) -> None:
    server, checkpoint = faulty
    items = [as_pb(e) for e in EMBEDDINGS]
    items[2] = as_pb(MARKED)
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        reply = stub.DecodeBatch(pb.DecodeBatchRequest(embeddings=items, max_new_tokens=24))
        assert reply.results[2].error.code_name == "INTERNAL"
        assert "injected fault" in reply.results[2].error.message
        for i, result in enumerate(reply.results):
            if i != 2:
                assert result.response.text == alone(checkpoint, EMBEDDINGS[i], 24), i
        # and afterwards, a plain call is served correctly
        again = stub.Decode(pb.DecodeRequest(embedding=items[0], max_new_tokens=24))
        assert again.text == alone(checkpoint, EMBEDDINGS[0], 24)


def test_a_marked_call_fails_with_internal_while_a_stream_runs_on(
    faulty: tuple[RunningServer, Path],
) -> None:
    server, checkpoint = faulty
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        request = pb.GenerateRequest(embedding=as_pb(EMBEDDINGS[1]), max_new_tokens=200)
        request.temperature = 0.0
        stream = stub.GenerateStream(request, timeout=60)
        chunks = [next(stream)]  # the stream is running
        with pytest.raises(grpc.RpcError) as raised:
            stub.Decode(pb.DecodeRequest(embedding=as_pb(MARKED), max_new_tokens=8), timeout=60)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "model step failed" in (raised.value.details() or "")
        chunks += list(stream)
        assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert "".join(c.text for c in chunks) == alone(checkpoint, EMBEDDINGS[1], 200)
