"""ModelInfo.load through a dedicated real daemon with its own scheduler flags.

`--max-wait-ms 600000` makes an idle model hold fewer than `--max-batch-size` waiting
sequences for ten minutes: a stream started here stays in `load.waiting` until it is
cancelled, which makes server-side cancellation observable without any race.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
from collections.abc import Iterator

import pytest

from retd.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    HealthStatus,
    ModelLoad,
    RequestCancelledError,
    UnavailableError,
    cli,
)
from tests._wait import poll
from tests.client.conftest import embeddings
from tests.conftest import RunningServer, start_server

E = embeddings(2, seed=9)
FLAGS = ["--max-batch-size", "4", "--max-queue-size", "7", "--max-wait-ms", "600000"]
EXPECTED = ModelLoad(
    waiting=0,
    max_queue_size=7,
    running=0,
    max_batch_size=4,
    batching="continuous",
    max_wait_ms=600000.0,
)


@pytest.fixture(scope="module")
def held(tmp_path_factory, checkpoint) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("held"), ["--checkpoint", str(checkpoint), *FLAGS]
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def observer(held) -> Iterator[Client]:
    """A second client that watches the model's load."""
    with Client(held.address, timeout=30) as c:
        yield c


def waiting(observer: Client, n: int) -> None:
    poll(lambda: observer.model_info().load.waiting == n, what=f"load.waiting == {n}")


def test_load_equals_the_server_flags(observer):
    assert observer.model_info().load == EXPECTED
    [listed] = observer.list_models()
    assert listed.load == EXPECTED


def test_closing_a_waiting_stream_cancels_it_on_the_server(held, observer):
    with Client(held.address, timeout=30) as c:
        stream = c.generate_stream(E[0], max_new_tokens=8, priority=3)  # starts at once
        waiting(observer, 1)
        load = observer.model_info().load
        assert (load.waiting, load.running) == (1, 0)
        stream.close()
        waiting(observer, 0)
    assert observer.model_info().load == EXPECTED


def test_closing_a_decode_stream_cancels_its_items(held, observer):
    with Client(held.address, timeout=30) as c:
        stream = c.decode_stream([("a", E[0]), ("b", E[1])], max_new_tokens=8)
        waiting(observer, 2)
        stream.close()
        waiting(observer, 0)


def test_closing_the_client_cancels_its_calls(held, observer):
    c = Client(held.address, timeout=30)
    stream = c.generate_stream(E[0], max_new_tokens=8)
    waiting(observer, 1)
    c.close()
    with pytest.raises((RequestCancelledError, UnavailableError)):
        list(stream)
    waiting(observer, 0)


def test_a_deadline_passing_in_the_queue_is_deadline_exceeded(held, observer):
    with Client(held.address) as c, pytest.raises(DeadlineExceededError):
        c.decode(E[0], max_new_tokens=8, timeout=0.3)
    waiting(observer, 0)


def test_async_load_and_cancellation(held):
    async def load_is(client: AsyncClient, n: int) -> None:
        async with asyncio.timeout(15):
            while (await client.model_info()).load.waiting != n:
                await asyncio.sleep(0.01)

    async def main() -> None:
        async with AsyncClient(held.address, timeout=30) as client:
            assert (await client.model_info()).load == EXPECTED
            assert [m.load for m in await client.list_models()] == [EXPECTED]
            async with contextlib.aclosing(
                client.generate_stream(E[0], max_new_tokens=8, priority=-1)
            ) as stream:
                first = asyncio.ensure_future(anext(stream))  # starts the call; never answered
                await load_is(client, 1)
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
            await load_is(client, 0)

    asyncio.run(main())


def test_a_draining_server_is_not_serving(tmp_path, checkpoint):
    """SIGTERM with a call in flight: health says NOT_SERVING (`retd health` exits 1) and new
    calls get UnavailableError until the call in flight ends; then the daemon exits 0."""
    draining = start_server(tmp_path, ["--checkpoint", str(checkpoint), *FLAGS])
    try:
        with Client(draining.address, timeout=30) as c:
            stream = c.generate_stream(E[0], max_new_tokens=8)  # held in the queue
            poll(lambda: c.model_info().load.waiting == 1, what="load.waiting == 1")
            draining.process.send_signal(signal.SIGTERM)
            poll(lambda: c.health() is HealthStatus.NOT_SERVING, what="health NOT_SERVING")
            out = io.StringIO()
            assert cli.main(["health", "--target", draining.address], out=out) == 1
            assert out.getvalue() == "NOT_SERVING\n"
            with pytest.raises(UnavailableError):
                c.decode(E[1], max_new_tokens=8)
            stream.close()
        assert draining.process.wait(timeout=30) == 0, draining.log()
    finally:
        draining.stop(signal.SIGKILL)
