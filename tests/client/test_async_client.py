"""AsyncClient against the real retd daemon: the same methods and answers as Client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest

from retd.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FinishReason,
    HealthStatus,
    InvalidArgumentError,
    ModelLoad,
    NotFoundError,
    UnavailableError,
)
from tests._wait import apoll
from tests.client.conftest import DIM, MODEL, embeddings, stop_case

E = embeddings(4, seed=9)  # distinct greedy texts, as in test_client
N = 16
T = TypeVar("T")


def run(test: Callable[[AsyncClient], Awaitable[T]], address: str, **kwargs) -> T:
    async def main() -> T:
        async with AsyncClient(address, timeout=30, **kwargs) as client:
            return await test(client)

    return asyncio.run(main())


@pytest.fixture
def expected(server) -> dict[str, Any]:
    """What the sync client gets for the same calls."""
    with Client(server.address, timeout=30) as c:
        return {
            "decode": [c.decode(e, max_new_tokens=N).text for e in E],
            "generate": c.generate(E[1], max_new_tokens=N, seed=5),
            "stop": stop_case(c, E[1], N),
        }


def test_decode_raw_vector_and_tensor(server, expected):
    async def test(client: AsyncClient) -> None:
        await client.wait_ready(10)
        result = await client.decode(E[0], max_new_tokens=N)
        assert result.text == expected["decode"][0]
        assert result.model == MODEL and result.usage.generated_tokens == N
        assert result.finish_reason is FinishReason.LENGTH
        torch = pytest.importorskip("torch")
        tensor = await client.decode(torch.from_numpy(E[2]), max_new_tokens=N, priority=4)
        assert tensor.text == expected["decode"][2]

    run(test, server.address)

    async def vector(client: AsyncClient) -> list[str]:
        return [(await client.decode(e, max_new_tokens=N)).text for e in E]

    assert run(vector, server.address, encoding="vector") == expected["decode"]


def test_generate_and_stream(server, expected):
    whole = expected["generate"]

    async def test(client: AsyncClient) -> None:
        again = await client.generate(E[1], max_new_tokens=N, seed=5, priority=-2)
        assert (again.text, again.token_ids, again.seed) == (whole.text, whole.token_ids, 5)
        assert again.mean_logprob == pytest.approx(whole.mean_logprob, abs=1e-6)
        greedy = await client.generate(E[1], max_new_tokens=N, temperature=0)
        assert greedy.text == expected["decode"][1]
        chunks = [c async for c in client.generate_stream(E[1], max_new_tokens=N, seed=5)]
        assert "".join(c.text for c in chunks) == whole.text
        assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].usage == whole.usage and chunks[-1].seed == 5
        base, stop, index, seed = expected["stop"]
        stopped = await client.generate(E[1], max_new_tokens=N, seed=seed, stop=[stop])
        assert stopped.finish_reason is FinishReason.STOP
        assert stopped.token_ids == base.token_ids[: index + 1]
        assert stopped.text == base.text[: base.text.index(stop)]

    run(test, server.address)


def test_closing_a_stream_early_cancels_it_on_the_server(server):
    async def test(client: AsyncClient) -> None:
        async with contextlib.aclosing(
            client.generate_stream(E[3], max_new_tokens=256, seed=1)
        ) as stream:
            async for chunk in stream:
                assert not chunk.is_last
                break

        async def idle() -> bool:
            return (await client.model_info()).load.running == 0

        await apoll(idle)

    run(test, server.address)


def test_decode_batch_and_stream(server, expected):
    texts = expected["decode"]

    async def test(client: AsyncClient) -> None:
        items = await client.decode_batch([E[0], E[1][:3], E[2]], max_new_tokens=N, priority=1)
        assert [i.ok for i in items] == [True, False, True]
        assert [items[0].unwrap().text, items[2].unwrap().text] == [texts[0], texts[2]]
        assert isinstance(items[1].error, InvalidArgumentError)
        assert "embeddings[1]: got 3 values" in items[1].error.details
        batch = await client.decode_batch(E, max_new_tokens=N)
        assert [i.unwrap().text for i in batch] == texts

        async def agen():
            yield ("x", E[0])
            yield E[1][:7]
            yield ("z", E[3])

        got = {i.id: i async for i in client.decode_stream(agen(), max_new_tokens=N)}
        assert sorted(got) == ["1", "x", "z"]
        assert got["x"].unwrap().text == texts[0] and got["z"].unwrap().text == texts[3]
        assert isinstance(got["1"].error, InvalidArgumentError)
        plain = [i async for i in client.decode_stream([E[2]], max_new_tokens=N, priority=2)]
        assert [(i.id, i.unwrap().text) for i in plain] == [("0", texts[2])]
        with pytest.raises(InvalidArgumentError, match=r"items\[1\]"):
            [i async for i in client.decode_stream([E[0], "bad"], max_new_tokens=N)]

    run(test, server.address)


def test_models_info_health(server):
    async def test(client: AsyncClient) -> None:
        [info] = await client.list_models()
        assert info.name == MODEL and info.parameter_count == 722944
        assert info.embedding_dim == DIM and info.trained is False
        assert await client.default_model() == MODEL
        one = await client.model_info(MODEL)
        assert one.checkpoint_sha256 == info.checkpoint_sha256
        assert isinstance(one.load, ModelLoad)
        assert (one.load.max_batch_size, one.load.max_queue_size) == (32, 1024)
        assert one.load.batching == "continuous"
        assert await client.health() is HealthStatus.SERVING
        assert await client.health(MODEL) == "SERVING"
        with pytest.raises(NotFoundError):
            await client.health("nope")
        with pytest.raises(NotFoundError, match="model"):
            await client.model_info("nope")

    run(test, server.address)


def test_typed_errors(server):
    async def test(client: AsyncClient) -> None:
        with pytest.raises(InvalidArgumentError) as info:
            await client.decode(np.ones(3))
        assert info.value.details.startswith("embedding: got 3 values; expected 768")
        with pytest.raises(NotFoundError, match="model: 'nope' is not loaded"):
            await client.generate(E[0], model="nope")
        with pytest.raises(InvalidArgumentError, match="embedding"):
            async for _ in client.generate_stream([1.0]):
                pass
        with pytest.raises(DeadlineExceededError):
            await client.decode(E[0], max_new_tokens=256, timeout=1e-6)
        with pytest.raises(DeadlineExceededError):
            async for _ in client.generate_stream(E[0], max_new_tokens=256, timeout=1e-6):
                pass
        with pytest.raises(InvalidArgumentError, match="priority"):
            await client.decode(E[0], priority=2**31)
        with pytest.raises(InvalidArgumentError, match="priority"):
            client.decode_stream([E[0]], priority=True)

    run(test, server.address)


def test_unreachable_server():
    async def test(client: AsyncClient) -> None:
        with pytest.raises(UnavailableError):
            await client.decode(E[0])
        with pytest.raises(UnavailableError):
            await client.wait_ready(timeout=0.2)

    run(test, "127.0.0.1:1")
