"""Client and AsyncClient against a fake in-process server: every method, errors, streams."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from fake_decoder import DIM, MODEL
from retd.client import (
    AsyncClient,
    Client,
    DecodeResult,
    FinishReason,
    HealthStatus,
    InvalidArgumentError,
    NotFoundError,
    RequestCancelledError,
    StreamItem,
    UnavailableError,
    _health,
)
from retd.v1 import decoder_pb2

E = np.arange(DIM, dtype=np.float32)  # text "8 28"


@pytest.fixture
def client(fake):
    servicer, target = fake
    with Client(target, timeout=10) as c:
        yield c


def test_decode(client, fake):
    result = client.decode(E, max_new_tokens=5)
    assert isinstance(result, DecodeResult)
    assert result.text == "8 28"
    assert result.finish_reason is FinishReason.EOS
    assert result.model == MODEL
    sent = fake[0].requests[-1]
    assert sent.max_new_tokens == 5 and sent.model == ""
    assert np.frombuffer(sent.embedding.raw.data, "<f4").tobytes() == E.tobytes()


def test_decode_vector_encoding(fake):
    with Client(fake[1], encoding="vector") as c:
        assert c.decode(E.tolist()).text == "8 28"
    assert fake[0].requests[-1].embedding.WhichOneof("data") == "vector"


def test_errors_are_typed(client):
    with pytest.raises(InvalidArgumentError, match="embedding: got 3 values"):
        client.decode([1.0, 2.0, 3.0])
    with pytest.raises(NotFoundError, match="model"):
        client.decode(E, model="other")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        client.decode(E, max_new_tokens=-1)


def test_generate_sends_only_what_was_set(client, fake):
    result = client.generate(E, temperature=0.0, seed=7, stop="x", top_k=3)
    assert result.seed == 7 and result.token_ids == [104, 105, 0]
    sent = fake[0].requests[-1]
    assert sent.HasField("temperature") and sent.temperature == 0.0
    assert not sent.HasField("top_p")
    assert list(sent.stop) == ["x"] and sent.top_k == 3
    assert client.generate(E).seed == 42
    sent = fake[0].requests[-1]
    assert not sent.HasField("temperature") and not sent.HasField("seed")


def test_generate_stream(client):
    chunks = list(client.generate_stream(E, max_new_tokens=4, seed=1))
    assert "".join(c.text for c in chunks) == "abcd"
    assert [c.is_last for c in chunks] == [False] * 4 + [True]
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH and last.usage.generated_tokens == 4
    assert last.seed == 1 and last.mean_logprob == -0.25


def test_generate_stream_errors_raise_from_iteration(client):
    stream = client.generate_stream([0.0], max_new_tokens=2)
    with pytest.raises(InvalidArgumentError):
        next(stream)


def test_closing_a_stream_cancels_the_call(client, fake):
    servicer = fake[0]
    servicer.stream_cancelled.clear()
    stream = client.generate_stream(E, max_new_tokens=200, stop=["slow"])
    assert next(stream).text == "a"
    stream.close()
    assert servicer.stream_cancelled.wait(5)


def test_timeout_is_deadline_exceeded(client):
    from retd.client import DeadlineExceededError

    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream(E, max_new_tokens=200, stop=["slow"], timeout=0.2))


def test_decode_batch(client):
    matrix = np.stack([E, E * 2])
    items = client.decode_batch(matrix)
    assert [i.unwrap().text for i in items] == ["8 28", "8 56"]
    items = client.decode_batch([E, np.zeros(3), E])
    assert [i.ok for i in items] == [True, False, True]
    assert isinstance(items[1].error, InvalidArgumentError)
    assert "embeddings[1]" in items[1].error.details
    with pytest.raises(InvalidArgumentError):
        items[1].unwrap()


def test_decode_stream_ids(client):
    items = list(client.decode_stream([E, ("mine", E * 2), np.zeros(2)]))
    by_id = {i.id: i for i in items}
    assert set(by_id) == {"0", "mine", "2"}
    assert by_id["0"].unwrap().text == "8 28"
    assert by_id["mine"].unwrap().text == "8 56"
    assert isinstance(by_id["2"].error, InvalidArgumentError)
    assert all(isinstance(i, StreamItem) for i in items)


def test_decode_stream_reads_a_generator_lazily(client):
    def items():
        for k in range(3):
            yield (f"k{k}", E * k)

    assert [i.id for i in client.decode_stream(items())] == ["k0", "k1", "k2"]


def test_decode_stream_input_failure_is_raised(client):
    def items():
        yield E
        yield np.zeros((2, DIM))  # not one embedding: rejected client-side

    with pytest.raises(InvalidArgumentError, match=r"items\[1\]"):
        list(client.decode_stream(items()))


def test_models_and_info(client):
    [info] = client.list_models()
    assert info.name == MODEL and info.embedding_dim == DIM
    assert info.card == {"encoder": {"name": "fake-encoder", "dim": float(DIM)}}
    assert client.default_model() == MODEL
    assert client.model_info() == info
    with pytest.raises(NotFoundError):
        client.model_info("other")


def test_health(client):
    assert client.health() is HealthStatus.SERVING
    assert client.health("retd.v1.Decoder") == "NOT_SERVING"
    with pytest.raises(NotFoundError):
        client.health("nope")


def test_health_messages_match_grpc_health():
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    ours = _health.HealthCheckRequest(service="retd.v1.Decoder").SerializeToString()
    assert health_pb2.HealthCheckRequest.FromString(ours).service == "retd.v1.Decoder"
    for status in range(4):
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        parsed = _health.HealthCheckResponse.FromString(wire)
        assert _health.health_status(parsed) == health_pb2.HealthCheckResponse.ServingStatus.Name(
            status
        )


def test_unreachable_server():
    with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(UnavailableError):
            c.decode(E)
        with pytest.raises(UnavailableError):
            c.wait_ready(timeout=0.2)


def test_passed_channel_stays_open(fake):
    import grpc

    channel = grpc.insecure_channel(fake[1])
    with Client(channel=channel) as c:
        c.decode(E)
    with Client(channel=channel) as c:  # still usable
        assert c.decode(E).text == "8 28"
    channel.close()


def test_closed_client_cancels(fake):
    c = Client(fake[1])
    stream = c.generate_stream(E, max_new_tokens=200, stop=["slow"])
    next(stream)
    c.close()
    with pytest.raises((RequestCancelledError, UnavailableError)):
        list(stream)


# --- asyncio --------------------------------------------------------------------------------


def test_async_client(fake):
    servicer, target = fake

    async def run() -> None:
        async with AsyncClient(target, timeout=10) as c:
            await c.wait_ready(5)
            assert (await c.decode(E)).text == "8 28"
            assert (await c.generate(E, seed=3)).seed == 3
            chunks = [ch async for ch in c.generate_stream(E, max_new_tokens=3)]
            assert "".join(ch.text for ch in chunks) == "abc" and chunks[-1].is_last
            items = await c.decode_batch([E, [1.0]])
            assert [i.ok for i in items] == [True, False]

            async def agen():
                yield ("x", E)
                yield E

            ids = sorted([i.id async for i in c.decode_stream(agen())])
            assert ids == ["1", "x"]
            assert [i.id async for i in c.decode_stream([E])] == ["0"]
            assert (await c.list_models())[0].name == MODEL
            assert await c.default_model() == MODEL
            assert (await c.model_info()).name == MODEL
            assert await c.health() == "SERVING"
            with pytest.raises(NotFoundError):
                await c.decode(E, model="other")
            with pytest.raises(InvalidArgumentError):
                async for _ in c.generate_stream([1.0]):
                    pass

            servicer.stream_cancelled.clear()
            async with contextlib.aclosing(
                c.generate_stream(E, max_new_tokens=200, stop=["slow"])
            ) as stream:
                async for chunk in stream:
                    assert chunk.text == "a"
                    break
        assert await asyncio.to_thread(servicer.stream_cancelled.wait, 5)

    asyncio.run(run())


def test_async_decode_stream_input_failure(fake):
    async def run() -> None:
        async with AsyncClient(fake[1], timeout=10) as c:
            with pytest.raises(InvalidArgumentError, match=r"items\[1\]"):
                [i async for i in c.decode_stream([E, "bad"])]

    asyncio.run(run())


def test_request_builders_do_not_need_a_server():
    from retd.client import _requests

    req = _requests.generate(
        E,
        model="m",
        max_new_tokens=np.int64(4),
        temperature=None,
        top_k=None,
        top_p=0.9,
        seed=2**64 - 1,
        stop=("a", "b"),
        encoding="raw",
    )
    assert isinstance(req, decoder_pb2.GenerateRequest)
    assert req.max_new_tokens == 4 and req.seed == 2**64 - 1 and list(req.stop) == ["a", "b"]
    assert abs(req.top_p - 0.9) < 1e-6
    with pytest.raises(InvalidArgumentError, match="seed"):
        _requests.generate(
            E,
            model=None,
            max_new_tokens=None,
            temperature=None,
            top_k=None,
            top_p=None,
            seed=-1,
            stop=None,
            encoding="raw",
        )
