"""Batching through the real daemon: dedicated servers with small batches and queues."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.model.checkpoint import LoadedModel
from retd.model.generation import GenerationResult, SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server

POLL_LIMIT_S = 30.0
CALL_TIMEOUT_S = 120.0


def values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(768).astype(np.float32)


def emb(seed: int) -> pb.Embedding:
    return pb.Embedding(vector=pb.FloatVector(values=values(seed).tolist()))


def alone(loaded: LoadedModel, seed: int, max_new_tokens: int) -> GenerationResult:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return generate(loaded.model, torch.from_numpy(values(seed))[None], [params])[0]


def load(stub: pb_grpc.DecoderStub) -> pb.ModelLoad:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).load


def wait_for_load(stub: pb_grpc.DecoderStub, waiting: int, running: int) -> None:
    """Bounded poll until the model's load is exactly (waiting, running)."""
    poll(
        lambda: (now := load(stub)).waiting == waiting and now.running == running,
        POLL_LIMIT_S,
        lambda: f"load (waiting, running) == ({waiting}, {running}); now {load(stub)}",
    )


def serve(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, *args: str) -> RunningServer:
    return start_server(
        tmp_path_factory.mktemp("batching"), ["--checkpoint", str(checkpoint), *args]
    )


@pytest.fixture(scope="module")
def tight(
    tmp_path_factory: pytest.TempPathFactory, sharp_checkpoint: Path
) -> Iterator[RunningServer]:
    """One slot, a queue of two."""
    running = serve(
        tmp_path_factory, sharp_checkpoint, "--max-batch-size", "1", "--max-queue-size", "2"
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def held(
    tmp_path_factory: pytest.TempPathFactory, sharp_checkpoint: Path
) -> Iterator[RunningServer]:
    """An idle model that holds a lone call up to a minute, hoping for a fuller batch of 4."""
    running = serve(
        tmp_path_factory, sharp_checkpoint, "--max-batch-size", "4", "--max-wait-ms", "60000"
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module", params=["continuous", "static"])
def batching(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sharp_checkpoint: Path,
) -> Iterator[RunningServer]:
    running = serve(
        tmp_path_factory,
        sharp_checkpoint,
        "--max-batch-size",
        "4",
        "--max-queue-size",
        "64",
        "--batching",
        request.param,
    )
    yield running
    assert running.stop() == 0, running.log()


def test_cancelled_running_stream_gives_its_slot_back(tight: RunningServer) -> None:
    with tight.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        wait_for_load(stub, 0, 0)
        request = pb.GenerateRequest(embedding=emb(1), max_new_tokens=256, temperature=0.0)
        call = stub.GenerateStream(request, timeout=CALL_TIMEOUT_S)
        assert len(next(call).token_ids) == 1  # it runs
        if call.cancel():  # False only if all 256 tokens came already: nothing to free then
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        wait_for_load(stub, 0, 0)
        # the slot serves the next caller
        reply = stub.Generate(
            pb.GenerateRequest(embedding=emb(2), max_new_tokens=8, temperature=0.0), timeout=30
        )
        assert reply.usage.generated_tokens == len(reply.token_ids) > 0
        wait_for_load(stub, 0, 0)


def test_cancelled_queued_stream_leaves_the_queue_without_running(held: RunningServer) -> None:
    with held.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        wait_for_load(stub, 0, 0)
        request = pb.GenerateRequest(embedding=emb(3), max_new_tokens=256, temperature=0.0)
        call = stub.GenerateStream(request, timeout=CALL_TIMEOUT_S)
        wait_for_load(stub, 1, 0)  # held: the idle model waits for a fuller batch
        assert call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        wait_for_load(stub, 0, 0)


def test_queue_full_refuses_some_and_every_accepted_call_completes(
    tight: RunningServer, sharp_model: LoadedModel
) -> None:
    n = 12
    with tight.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        wait_for_load(stub, 0, 0)

        def call(i: int) -> grpc.Future:
            request = pb.GenerateRequest(embedding=emb(i), max_new_tokens=256, temperature=0.0)
            return stub.Generate.future(request, timeout=CALL_TIMEOUT_S)

        # The first call takes the slot before the others come (else two could wait in the
        # queue while the worker has not yet moved the first into the slot: only 2 served).
        futures = [call(0)]
        poll(
            lambda: futures[0].done() or load(stub).running == 1,
            POLL_LIMIT_S,
            lambda: f"the first call neither runs nor ended; load {load(stub)}",
        )
        futures += [call(i) for i in range(1, n)]
        refused, served = [], {}
        for i, future in enumerate(futures):
            try:
                served[i] = future.result()
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused.append(error.details())
        assert refused, "12 long calls against 1 slot and a queue of 2: some must be refused"
        assert len(served) >= 3  # the slot and the queue were used
        assert 0 in served
        for message in refused:
            assert "full" in message and "2" in message, message
        for i, reply in served.items():
            expected = alone(sharp_model, i, 256)
            assert list(reply.token_ids) == expected.token_ids, i
            assert reply.text == expected.text
        wait_for_load(stub, 0, 0)


def test_deadline_passed_while_queued_never_runs_and_leaves_the_queue(
    held: RunningServer,
) -> None:
    with held.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        wait_for_load(stub, 0, 0)
        call = stub.Decode.future(pb.DecodeRequest(embedding=emb(5), max_new_tokens=8), timeout=1.5)
        seen_queued = False
        while not call.done():  # bounded by the call's own deadline
            now = load(stub)
            assert now.running == 0, now
            seen_queued |= now.waiting == 1
            time.sleep(0.01)
        assert seen_queued
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_load(stub, 0, 0)


def test_decode_batch_equals_single_decodes(
    batching: RunningServer, sharp_model: LoadedModel
) -> None:
    n, max_new = 40, 16
    with batching.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.load.max_batch_size == 4 and info.load.max_queue_size == 64
        batch = stub.DecodeBatch(
            pb.DecodeBatchRequest(embeddings=[emb(i) for i in range(n)], max_new_tokens=max_new),
            timeout=CALL_TIMEOUT_S,
        )
        singles = [
            stub.Decode(pb.DecodeRequest(embedding=emb(i), max_new_tokens=max_new), timeout=60)
            for i in range(n)
        ]
        assert len(batch.results) == n
        for i, (item, single) in enumerate(zip(batch.results, singles, strict=True)):
            assert item.WhichOneof("outcome") == "response", item
            expected = alone(sharp_model, i, max_new)
            assert item.response.text == single.text == expected.text, i
            assert item.response.usage.generated_tokens == len(expected.token_ids)
        wait_for_load(stub, 0, 0)


def test_concurrent_generates_are_correct_under_either_policy(
    batching: RunningServer, sharp_model: LoadedModel
) -> None:
    lengths = [3, 40, 7, 25, 1, 33, 12, 18, 5, 40]
    with batching.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        policy = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).load.batching
        assert policy in ("continuous", "static")
        futures = [
            stub.Generate.future(
                pb.GenerateRequest(embedding=emb(50 + i), max_new_tokens=m, temperature=0.0),
                timeout=CALL_TIMEOUT_S,
            )
            for i, m in enumerate(lengths)
        ]
        for i, (m, future) in enumerate(zip(lengths, futures, strict=True)):
            reply = future.result()
            assert list(reply.token_ids) == alone(sharp_model, 50 + i, m).token_ids, (policy, i)
        wait_for_load(stub, 0, 0)
