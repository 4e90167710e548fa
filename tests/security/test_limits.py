"""Per-call and per-connection limits of the daemon: items per DecodeBatch and DecodeStream,
the server-wide max_new_tokens cap, concurrent streams per connection, and keepalive ping
enforcement. Real daemons with small limits, real channels."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.security.conftest import CALL_TIMEOUT_S, decode_request, embedding

#: How long a call that must stay queued is watched: a 4-token Decode takes milliseconds.
QUEUED_FOR_S = 1.0
#: A GOAWAY for too many pings came after about 3 s in trials (three strikes, the client
#: pinging about once a second); this bounds it generously.
GOAWAY_WITHIN_S = 20.0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    """Every limit small; keepalive strict (only clients that ping mind)."""
    args = [
        "--checkpoint", str(checkpoint),
        "--max-batch-items", "4", "--max-stream-items", "3", "--max-new-tokens-limit", "16",
        "--max-concurrent-streams", "2", "--keepalive-min-ping-ms", "60000",
    ]  # fmt: skip
    running = start_server(tmp_path_factory.mktemp("limits"), args)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def stub(limited: RunningServer) -> Iterator[pb_grpc.DecoderStub]:
    with limited.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


def invalid(call) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    return caught.value.details()


# --- max_batch_items -----------------------------------------------------------------------


def batch(n: int, max_new_tokens: int = 3) -> pb.DecodeBatchRequest:
    return pb.DecodeBatchRequest(
        embeddings=[embedding(i) for i in range(n)], max_new_tokens=max_new_tokens
    )


def test_batch_over_max_batch_items_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    details = invalid(lambda: stub.DecodeBatch(batch(5), timeout=CALL_TIMEOUT_S))
    assert "max_batch_items 4" in details and "5 items" in details, details


def test_batch_at_max_batch_items_works(stub: pb_grpc.DecoderStub) -> None:
    response = stub.DecodeBatch(batch(4), timeout=CALL_TIMEOUT_S)
    assert len(response.results) == 4
    assert all(r.WhichOneof("outcome") == "response" for r in response.results)
    assert all(r.response.usage.generated_tokens == 3 for r in response.results)


def test_batch_items_obey_max_new_tokens_limit(stub: pb_grpc.DecoderStub) -> None:
    """The cap holds per item: 17 fails every item (the call itself succeeds), 0 means 16."""
    over = stub.DecodeBatch(batch(2, max_new_tokens=17), timeout=CALL_TIMEOUT_S)
    assert [r.WhichOneof("outcome") for r in over.results] == ["error", "error"]
    assert all("max_new_tokens_limit" in r.error.message for r in over.results)
    assert all(r.error.code_name == "INVALID_ARGUMENT" for r in over.results)
    default = stub.DecodeBatch(batch(2, max_new_tokens=0), timeout=CALL_TIMEOUT_S)
    assert all(0 < r.response.usage.generated_tokens <= 16 for r in default.results)


# --- max_stream_items ----------------------------------------------------------------------


def stream_items(n: int, max_new_tokens: int = 3) -> Iterator[pb.DecodeStreamRequest]:
    for i in range(n):
        yield pb.DecodeStreamRequest(
            id=f"item-{i + 1}", embedding=embedding(i), max_new_tokens=max_new_tokens
        )


def test_stream_past_max_stream_items(stub: pb_grpc.DecoderStub) -> None:
    call = stub.DecodeStream(stream_items(5), timeout=CALL_TIMEOUT_S)
    answers = {answer.id: answer for answer in call}  # iteration raises on a failed call
    assert call.code() == grpc.StatusCode.OK
    assert sorted(answers) == [f"item-{i}" for i in range(1, 6)]
    for served in ("item-1", "item-2", "item-3"):
        assert answers[served].WhichOneof("outcome") == "response", answers[served]
        assert answers[served].response.usage.generated_tokens == 3
    for refused in ("item-4", "item-5"):
        error = answers[refused].error
        assert answers[refused].WhichOneof("outcome") == "error"
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert error.code_name == "RESOURCE_EXHAUSTED"
        assert "max_stream_items 3" in error.message, error.message


def test_stream_at_max_stream_items_is_all_served(stub: pb_grpc.DecoderStub) -> None:
    answers = list(stub.DecodeStream(stream_items(3), timeout=CALL_TIMEOUT_S))
    assert sorted(a.id for a in answers) == ["item-1", "item-2", "item-3"]
    assert all(a.WhichOneof("outcome") == "response" for a in answers)


def test_the_item_count_is_per_stream(stub: pb_grpc.DecoderStub) -> None:
    """A new stream starts from zero."""
    for _ in range(2):
        answers = list(stub.DecodeStream(stream_items(3), timeout=CALL_TIMEOUT_S))
        assert all(a.WhichOneof("outcome") == "response" for a in answers)


# --- max_new_tokens_limit ------------------------------------------------------------------


def test_decode_over_max_new_tokens_limit_is_invalid(stub: pb_grpc.DecoderStub) -> None:
    details = invalid(lambda: stub.Decode(decode_request(0, 17), timeout=CALL_TIMEOUT_S))
    assert "exceeds the server's max_new_tokens_limit (16)" in details, details
    assert "max_new_tokens: 17" in details, details


def test_decode_at_max_new_tokens_limit_works(stub: pb_grpc.DecoderStub) -> None:
    response = stub.Decode(decode_request(0, 16), timeout=CALL_TIMEOUT_S)
    assert 0 < response.usage.generated_tokens <= 16


def test_decode_zero_means_the_limit(stub: pb_grpc.DecoderStub) -> None:
    for seed in range(3):
        response = stub.Decode(decode_request(seed, 0), timeout=CALL_TIMEOUT_S)
        assert 0 < response.usage.generated_tokens <= 16, response


def generate_request(max_new_tokens: int, seed: int = 5) -> pb.GenerateRequest:
    return pb.GenerateRequest(embedding=embedding(seed), max_new_tokens=max_new_tokens, seed=seed)


def test_generate_obeys_max_new_tokens_limit(stub: pb_grpc.DecoderStub) -> None:
    details = invalid(lambda: stub.Generate(generate_request(17), timeout=CALL_TIMEOUT_S))
    assert "exceeds the server's max_new_tokens_limit (16)" in details, details
    response = stub.Generate(generate_request(0), timeout=CALL_TIMEOUT_S)
    assert 0 < response.usage.generated_tokens <= 16
    assert len(response.token_ids) == response.usage.generated_tokens


def test_generate_stream_obeys_max_new_tokens_limit(stub: pb_grpc.DecoderStub) -> None:
    details = invalid(
        lambda: list(stub.GenerateStream(generate_request(17), timeout=CALL_TIMEOUT_S))
    )
    assert "exceeds the server's max_new_tokens_limit (16)" in details, details
    chunks = list(stub.GenerateStream(generate_request(0), timeout=CALL_TIMEOUT_S))
    assert 0 < chunks[-1].usage.generated_tokens <= 16
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.generated_tokens


def test_stream_items_obey_max_new_tokens_limit(stub: pb_grpc.DecoderStub) -> None:
    answers = {a.id: a for a in stub.DecodeStream(stream_items(2, 17), timeout=CALL_TIMEOUT_S)}
    assert all(a.WhichOneof("outcome") == "error" for a in answers.values())
    assert all("max_new_tokens_limit" in a.error.message for a in answers.values())


def test_without_the_limit_the_model_max_length_applies(server: RunningServer) -> None:
    """The control: the shared server has no cap, so 17 is fine and 0 may run past 16."""
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        assert stub.Decode(decode_request(0, 17), timeout=CALL_TIMEOUT_S).usage
        response = stub.Decode(decode_request(0, 0), timeout=CALL_TIMEOUT_S)
        assert response.usage.generated_tokens > 16


# --- max_concurrent_streams ----------------------------------------------------------------


class HeldStream:
    """A DecodeStream kept open: one item answered (so the server holds the stream), then
    no more requests until `close()`."""

    def __init__(self, stub: pb_grpc.DecoderStub, name: str) -> None:
        self._requests: queue.Queue[pb.DecodeStreamRequest | None] = queue.Queue()
        self.call = stub.DecodeStream(self._iterate(), timeout=CALL_TIMEOUT_S)
        self._requests.put(pb.DecodeStreamRequest(id=name, embedding=embedding(), max_new_tokens=2))
        first = next(self.call)
        assert first.id == name and first.WhichOneof("outcome") == "response"

    def _iterate(self) -> Iterator[pb.DecodeStreamRequest]:
        while (item := self._requests.get()) is not None:
            yield item

    def release(self) -> None:
        """End the request stream (lets its sending thread finish)."""
        self._requests.put(None)

    def close(self) -> None:
        self.release()
        assert list(self.call) == []
        assert self.call.code() == grpc.StatusCode.OK


#: A connection of the test's own, not one shared with other channels to the same server.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def test_third_stream_waits_for_a_free_slot(limited: RunningServer) -> None:
    held: list[HeldStream] = []
    try:
        with grpc.insecure_channel(limited.address, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.DecoderStub(channel)
            held = [HeldStream(stub, "first"), HeldStream(stub, "second")]
            third = stub.Decode.future(decode_request(), timeout=CALL_TIMEOUT_S)
            with pytest.raises(grpc.FutureTimeoutError):
                third.result(timeout=QUEUED_FOR_S)
            assert not third.done()
            # Meanwhile the server answers on another connection: the limit is per
            # connection, and the server is not merely busy.
            with grpc.insecure_channel(limited.address, options=OWN_CONNECTION) as other:
                elsewhere = pb_grpc.DecoderStub(other).Decode(
                    decode_request(1), timeout=CALL_TIMEOUT_S
                )
                assert elsewhere.usage.generated_tokens == 4
            assert not third.done()
            held.pop(0).close()
            assert third.result(timeout=CALL_TIMEOUT_S).usage.generated_tokens == 4
            # With one stream still held, there is room for one more call at a time.
            assert stub.Decode(decode_request(2), timeout=CALL_TIMEOUT_S).usage
            held.pop(0).close()
    finally:
        for stream in held:
            stream.release()


def test_control_without_the_tight_limit_the_third_call_runs_at_once(
    server: RunningServer,
) -> None:
    """The shared server has the default limit (100): the same third call runs at once."""
    with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.DecoderStub(channel)
        held = [HeldStream(stub, "first"), HeldStream(stub, "second")]
        try:
            third = stub.Decode.future(decode_request(), timeout=CALL_TIMEOUT_S)
            assert third.result(timeout=CALL_TIMEOUT_S).usage.generated_tokens == 4
            for stream in held:
                stream.close()
        finally:
            for stream in held:
                stream.release()


# --- keepalive enforcement -----------------------------------------------------------------

PINGING = [
    ("grpc.keepalive_time_ms", 100),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    *OWN_CONNECTION,
]


def test_too_many_pings_get_the_connection_closed(
    limited: RunningServer, tmp_path: Path, checkpoint: Path
) -> None:
    """Clients pinging every 100 ms. Against --keepalive-min-ping-ms 60000 the server
    answers GOAWAY (ENHANCE_YOUR_CALM, too_many_pings), seen two ways at once: a stream held
    open with no data ends UNAVAILABLE "Too many pings", and an idle connection goes from
    READY to IDLE (grpc's client then backs off its keepalive and reconnects on the next
    call). The control, watched over the same time: a server with --keepalive-min-ping-ms
    100 keeps its held stream, which then ends OK. (An idle connection has no such control:
    grpc servers refuse pings on connections without calls whatever this setting.)"""
    strict = limited
    lenient = start_server(
        tmp_path, ["--checkpoint", str(checkpoint), "--keepalive-min-ping-ms", "100"]
    )
    channels = [grpc.insecure_channel(s.address, options=PINGING) for s in (strict, strict)]
    channels.append(grpc.insecure_channel(lenient.address, options=PINGING))
    held: list[HeldStream] = []
    try:
        streamed, idle, control = channels
        states: list[grpc.ChannelConnectivity] = []
        idle.subscribe(states.append, try_to_connect=True)
        assert pb_grpc.DecoderStub(idle).Decode(decode_request(), timeout=CALL_TIMEOUT_S).usage
        poll(lambda: states[-1] == grpc.ChannelConnectivity.READY, what="the idle one READY")
        held = [HeldStream(pb_grpc.DecoderStub(c), "held") for c in (streamed, control)]
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(held[0].call)
        assert time.monotonic() - started < GOAWAY_WITHIN_S
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
        assert "ping" in (caught.value.details() or "").lower(), caught.value.details()
        poll(
            lambda: (
                states[-1]
                in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
            ),
            timeout=GOAWAY_WITHIN_S,
            what="the idle connection closed",
        )
        # Watch the control stream while a second strict stream, opened now, pings its way to
        # its own GOAWAY: the control, pinging as often since the start, has then outlived two
        # strict streams in a row, so without the setting it would have had its GOAWAY by then
        # (tried: it does). The window ends on the server's event, not on a clock.
        again = grpc.insecure_channel(strict.address, options=PINGING)
        channels.append(again)
        held.append(HeldStream(pb_grpc.DecoderStub(again), "again"))
        with pytest.raises(grpc.RpcError) as caught_again:
            list(held[-1].call)
        assert caught_again.value.code() == grpc.StatusCode.UNAVAILABLE, caught_again.value
        assert "ping" in (caught_again.value.details() or "").lower()
        assert not held[1].call.done(), held[1].call
        held.pop(1).close()
        assert strict.process.poll() is None  # the server itself is fine
        assert pb_grpc.DecoderStub(idle).Decode(decode_request(), timeout=CALL_TIMEOUT_S).usage
    finally:
        for stream in held:
            stream.release()
        for channel in channels:
            channel.close()
        assert lenient.stop() == 0, lenient.log()
