"""Graceful shutdown with calls in flight, cancellation, deadlines, refusing to start."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import start_server

VALUES = np.random.default_rng(3).standard_normal(768).astype(np.float32).tolist()
EMBEDDING = pb.Embedding(vector=pb.FloatVector(values=VALUES))
POLL_LIMIT_S = 20.0


def long_stream(stub: pb_grpc.DecoderStub) -> Any:
    request = pb.GenerateRequest(embedding=EMBEDDING, max_new_tokens=256, seed=11)
    return stub.GenerateStream(request, timeout=60)


def wait_until_not_serving(address: str) -> str:
    """Poll health on fresh channels until NOT_SERVING or calls fail; bounded."""

    def not_serving() -> str | None:
        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.RpcError as error:
                return error.code().name
        serving = status.status != health_pb2.HealthCheckResponse.NOT_SERVING
        return None if serving else "NOT_SERVING"

    return poll(not_serving, POLL_LIMIT_S, "health NOT_SERVING after the signal")


def decode_after_stop(address: str) -> grpc.StatusCode:
    """A new call to a stopping server: UNAVAILABLE, once the server stopped accepting
    (health said NOT_SERVING; the listener closes right after)."""

    def refused() -> grpc.StatusCode | None:
        with grpc.insecure_channel(address) as channel:
            try:
                pb_grpc.DecoderStub(channel).Decode(
                    pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=4), timeout=5
                )
            except grpc.RpcError as error:
                return error.code()
        return None

    return poll(refused, POLL_LIMIT_S, "a new call refused after the shutdown signal")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_finishes_the_call_in_flight(
    tmp_path: Path, checkpoint: Path, sig: int
) -> None:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint)])
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            reference = stub.Generate(
                pb.GenerateRequest(embedding=EMBEDDING, max_new_tokens=256, seed=11)
            )
            call_started = time.monotonic()
            stream = long_stream(stub)
            chunks = [next(stream)]  # the call is surely in flight
            signalled = time.monotonic()
            server.process.send_signal(sig)
            # The stream may end (and the listener close) before the first health poll.
            state = wait_until_not_serving(server.address)
            assert state in ("NOT_SERVING", "UNAVAILABLE")
            assert decode_after_stop(server.address) == grpc.StatusCode.UNAVAILABLE
            chunks += list(stream)
        last = chunks[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert "".join(c.text for c in chunks) == reference.text
        assert [t for c in chunks for t in c.token_ids] == list(reference.token_ids)
        # The server answered after the signal: received at or after call_started, and
        # total_ms later it sent the last chunk (both processes share CLOCK_MONOTONIC).
        assert call_started + last.timing.total_ms / 1e3 > signalled
        assert server.process.wait(timeout=60) == 0, server.log()
        assert "shutting down" in server.log()
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[pb_grpc.DecoderStub]:
    with server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


def test_cancelling_a_stream_leaves_the_server_healthy(stub: pb_grpc.DecoderStub) -> None:
    expected = stub.Decode(pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=16))
    stream = long_stream(stub)
    first = next(stream)
    assert first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    stream.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    for _ in range(3):
        again = stub.Decode(pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=16), timeout=30)
        assert again.text == expected.text
        assert again.usage.generated_tokens == expected.usage.generated_tokens
    chunks = list(long_stream(stub))
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_a_deadline_shorter_than_the_generation_is_exceeded(
    stub: pb_grpc.DecoderStub, server: Any
) -> None:
    expected = stub.Decode(pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=16))
    request = pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=256)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Decode(request, timeout=0.005)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    generate = pb.GenerateRequest(embedding=EMBEDDING, max_new_tokens=256, seed=1)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.GenerateStream(generate, timeout=0.005))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    again = stub.Decode(pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=16), timeout=30)
    assert again.text == expected.text
    assert server.process.poll() is None


def test_refuses_to_start_without_its_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(RuntimeError) as raised:
        start_server(tmp_path, ["--checkpoint", str(missing)])
    message = str(raised.value)
    code = re.search(r"server exited with (-?\d+)", message)
    assert code is not None and int(code.group(1)) != 0, message
    assert "cannot start" in message and "does not exist" in message
    assert str(missing) in message
    assert "Traceback" not in message


def failed_start(tmp_path: Path, args: list[str]) -> str:
    """The log of a daemon that must not start (it exits 1)."""
    with pytest.raises(RuntimeError, match="server exited with 1") as raised:
        start_server(tmp_path, args)
    return str(raised.value)


def test_a_model_that_fails_says_so_without_releasing_the_others_first(
    tmp_path: Path, checkpoint: Path
) -> None:
    log = failed_start(
        tmp_path, ["--model", f"good={checkpoint}", "--model", f"bad={tmp_path / 'nothing'}"]
    )
    assert "model good loaded" in log and "cannot start" in log, log
    assert "released" not in log, log  # nothing was served: no release line per model
    assert "Traceback" not in log


def test_a_tls_file_that_fails_stops_the_start_before_any_model_loads(
    tmp_path: Path, checkpoint: Path
) -> None:
    missing = tmp_path / "missing.pem"
    args = ["--checkpoint", str(checkpoint), "--tls-cert", str(missing), "--tls-key", str(missing)]
    log = failed_start(tmp_path, args)
    assert "cannot start" in log and "tls_" in log, log
    assert "loaded" not in log and "released" not in log, log


def test_a_taken_port_stops_the_start_before_any_model_loads(
    tmp_path: Path, checkpoint: Path, server: Any
) -> None:
    log = failed_start(tmp_path, ["--checkpoint", str(checkpoint), "--port", str(server.port)])
    assert f"cannot start on 127.0.0.1:{server.port}" in log, log
    assert "loaded" not in log and "released" not in log, log


def test_draining_server_keeps_health_up_and_turns_new_calls_away(
    tmp_path: Path, checkpoint: Path
) -> None:
    """A DecodeStream whose caller keeps its side open stays in flight for as long as the
    test wants, so every stage of the drain is observed without racing the clock."""
    import queue

    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--grace-period", "30"])
    try:
        items: queue.Queue[pb.DecodeStreamRequest | None] = queue.Queue()

        def requests() -> Iterator[pb.DecodeStreamRequest]:
            while (item := items.get()) is not None:
                yield item

        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            answers = stub.DecodeStream(requests(), timeout=60)
            items.put(pb.DecodeStreamRequest(id="before", embedding=EMBEDDING, max_new_tokens=8))
            before = next(answers)
            assert before.id == "before" and before.HasField("response")

            server.process.send_signal(signal.SIGTERM)
            assert wait_until_not_serving(server.address) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as raised:
                stub.Decode(pb.DecodeRequest(embedding=EMBEDDING, max_new_tokens=8), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (raised.value.details() or "")

            items.put(pb.DecodeStreamRequest(id="after", embedding=EMBEDDING, max_new_tokens=8))
            after = next(answers)
            assert after.id == "after" and after.error.code_name == "UNAVAILABLE"
            assert server.process.poll() is None  # still draining: the stream is open

            items.put(None)  # the caller closes its side: the last call in flight ends
            assert list(answers) == []
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)


def test_health_and_info_answer_while_the_model_is_busy(tmp_path: Path, checkpoint: Path) -> None:
    """Model work runs on the worker thread: while a long batch keeps the model busy (one
    slot, 32 sequences of 256 bytes, seconds of work), health and info calls are answered."""
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--max-batch-size", "1"])
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            batch = stub.DecodeBatch.future(
                pb.DecodeBatchRequest(embeddings=[EMBEDDING] * 32, max_new_tokens=256), timeout=120
            )
            poll(
                lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).load.running == 1,
                POLL_LIMIT_S,
                "the batch started",
            )
            for _ in range(5):
                status = health.Check(health_pb2.HealthCheckRequest(service="ret_v21"), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                assert (
                    stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].load.waiting > 0
                )
            assert not batch.done()  # all of that was answered while the model was busy
            assert len(batch.result().results) == 32
    finally:
        assert server.stop() == 0
