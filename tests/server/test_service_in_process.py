"""`DecoderService` in this process: the real servicer, a real registry of the small seeded
checkpoint (tests/conftest.py), on a grpc.aio server bound to an ephemeral loopback port and
called through a real channel. No daemon process, no interceptors, no health: each RPC's
answer and its validation, fast. (The daemon's own behaviour is tested against
`python -m retd.server` elsewhere.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from retd.server.app import load_engine
from retd.server.calls import add_service
from retd.server.config import ModelSettings, ModelSpec, SchedulerConfig
from retd.server.repository import ModelRegistry
from retd.server.service import DecoderService
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

MODEL = "ret_v21"
DIM = 768
TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0


@dataclass
class InProcessService:
    service: DecoderService
    stub: pb_grpc.DecoderStub
    port: int


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[InProcessService]:
    """The servicer on its own event loop (a thread), the test's calls on a real channel."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="in-process-service", daemon=True)
    thread.start()
    models = ModelRegistry(
        [
            ModelSpec(
                MODEL,
                checkpoint,
                ModelSettings(device="cpu", scheduler=SchedulerConfig(max_batch_size=8)),
            )
        ],
        load_engine,
    )
    service = DecoderService(models)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_service(service, server, pb, "Decoder")
        port = server.add_insecure_port("127.0.0.1:0")
        await models.start()
        await server.start()
        return server, port

    def run(coroutine, timeout: float = START_TIMEOUT_S):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    server, port = run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield InProcessService(service, pb_grpc.DecoderStub(channel), port)
    finally:
        try:
            run(server.stop(None))
            run(models.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()


@pytest.fixture
def stub(served: InProcessService) -> pb_grpc.DecoderStub:
    return served.stub


def embedding(seed: int, dim: int = DIM) -> pb.Embedding:
    values = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return pb.Embedding(vector=pb.FloatVector(values=values.tolist()))


def invalid(call) -> str:  # type: ignore[no-untyped-def]
    """The details of the INVALID_ARGUMENT that `call()` must raise."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    return caught.value.details() or ""


# ---- Decode ----------------------------------------------------------------------------------


def test_decode_answers_with_text_usage_and_the_model(stub: pb_grpc.DecoderStub) -> None:
    request = pb.DecodeRequest(embedding=embedding(0), max_new_tokens=8)
    response = stub.Decode(request, timeout=TIMEOUT_S)
    assert 1 <= response.usage.generated_tokens <= 8
    assert response.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert (response.model, response.version) == (MODEL, 1)
    assert response.source == pb.ANSWER_SOURCE_GENERATED
    assert response.timing.total_ms >= response.timing.compute_ms > 0
    assert stub.Decode(request, timeout=TIMEOUT_S).text == response.text  # greedy


def test_decode_of_a_wrong_sized_embedding_is_invalid_naming_the_field(
    stub: pb_grpc.DecoderStub,
) -> None:
    request = pb.DecodeRequest(embedding=embedding(0, dim=5), max_new_tokens=8)
    details = invalid(lambda: stub.Decode(request, timeout=TIMEOUT_S))
    assert details.startswith("embedding") and f"expected {DIM} float32 values" in details


# ---- Generate and GenerateStream ---------------------------------------------------------------


def sampled(seed: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        embedding=embedding(1), max_new_tokens=12, temperature=0.8, top_k=40, seed=seed
    )


def test_generate_with_a_seed_repeats_and_reports_it(stub: pb_grpc.DecoderStub) -> None:
    first = stub.Generate(sampled(7), timeout=TIMEOUT_S)
    again = stub.Generate(sampled(7), timeout=TIMEOUT_S)
    assert first.seed == 7 and first.text == again.text
    assert 1 <= first.usage.generated_tokens <= 12 and first.model == MODEL


def test_generate_with_a_bad_temperature_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    request = pb.GenerateRequest(embedding=embedding(1), temperature=-1)
    assert "temperature" in invalid(lambda: stub.Generate(request, timeout=TIMEOUT_S))


def test_generate_stream_streams_what_generate_returns(stub: pb_grpc.DecoderStub) -> None:
    unary = stub.Generate(sampled(3), timeout=TIMEOUT_S)
    chunks = list(stub.GenerateStream(sampled(3), timeout=TIMEOUT_S))
    assert "".join(chunk.text for chunk in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage.generated_tokens == unary.usage.generated_tokens
    assert all(chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED for chunk in chunks[:-1])


def test_generate_stream_with_a_bad_top_p_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    request = pb.GenerateRequest(embedding=embedding(1), top_p=1.5)
    details = invalid(lambda: list(stub.GenerateStream(request, timeout=TIMEOUT_S)))
    assert "top_p" in details


# ---- DecodeBatch and DecodeStream --------------------------------------------------------------


def test_decode_batch_answers_in_order_as_decode_does(stub: pb_grpc.DecoderStub) -> None:
    batch = pb.DecodeBatchRequest(embeddings=[embedding(i) for i in range(3)], max_new_tokens=6)
    results = stub.DecodeBatch(batch, timeout=TIMEOUT_S).results
    alone = [
        stub.Decode(pb.DecodeRequest(embedding=embedding(i), max_new_tokens=6), timeout=TIMEOUT_S)
        for i in range(3)
    ]
    assert [r.WhichOneof("outcome") for r in results] == ["response"] * 3
    assert [r.response.text for r in results] == [a.text for a in alone]


def test_decode_batch_fails_a_bad_item_alone(stub: pb_grpc.DecoderStub) -> None:
    batch = pb.DecodeBatchRequest(embeddings=[embedding(0), embedding(1, dim=3)], max_new_tokens=4)
    first, bad = stub.DecodeBatch(batch, timeout=TIMEOUT_S).results
    assert first.WhichOneof("outcome") == "response"
    assert bad.error.code_name == "INVALID_ARGUMENT" and "embeddings[1]" in bad.error.message


def test_an_empty_decode_batch_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    empty = pb.DecodeBatchRequest(embeddings=[], max_new_tokens=4)
    assert "embeddings" in invalid(lambda: stub.DecodeBatch(empty, timeout=TIMEOUT_S))


def test_decode_stream_answers_every_item_by_id(stub: pb_grpc.DecoderStub) -> None:
    items = [
        pb.DecodeStreamRequest(id="a", embedding=embedding(0), max_new_tokens=4),
        pb.DecodeStreamRequest(id="b", embedding=embedding(1, dim=3), max_new_tokens=4),
        pb.DecodeStreamRequest(id="c", embedding=embedding(2), max_new_tokens=4),
    ]
    answers = {a.id: a for a in stub.DecodeStream(iter(items), timeout=TIMEOUT_S)}
    assert sorted(answers) == ["a", "b", "c"]
    assert answers["a"].response.usage.generated_tokens >= 1
    assert answers["c"].WhichOneof("outcome") == "response"
    assert answers["b"].error.code_name == "INVALID_ARGUMENT"
    assert "embedding" in answers["b"].error.message


# ---- ListModels and GetModelInfo ---------------------------------------------------------------


def test_list_models_and_model_info_describe_the_checkpoint(stub: pb_grpc.DecoderStub) -> None:
    listing = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S)
    assert listing.default_model == MODEL
    assert [m.name for m in listing.models] == [MODEL]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    assert (info.name, info.embedding_dim, info.kind) == (MODEL, DIM, "ret")
    assert (info.repository_version, info.serving, info.trained) == (1, True, False)
    assert info.load.max_batch_size == 8 and info.device == "cpu"
    assert listing.models[0].checkpoint_sha256 == info.checkpoint_sha256


def test_model_info_of_an_unknown_model_is_not_found(stub: pb_grpc.DecoderStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"), timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (caught.value.details() or "")


def test_model_info_of_an_unloaded_version_is_not_found(stub: pb_grpc.DecoderStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL, version=9), timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unparseable_request_is_invalid_naming_its_type(served: InProcessService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        call = channel.unary_unary("/retd.v1.Decoder/Decode")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff", timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid retd.v1.DecodeRequest" in (caught.value.details() or "")
