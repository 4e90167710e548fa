"""The RETEngine with a real loaded model: cancellation frees slots and queue places, and a
full queue refuses at once while every accepted sequence finishes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from retd.model.checkpoint import LoadedModel
from retd.model.generation import SamplingParams
from retd.model.model import RET
from retd.server.engine import SequenceRequest
from retd.server.errors import ErrorKind, ServeError
from retd.server.handles import TokenDelta
from retd.server.ret_engine import RETEngine
from retd.server.scheduler import SchedulerConfig
from tests.scheduler._engine import (
    RUN_LIMIT_S,
    Run,
    embedding,
    reference,
    start_engine,
    wait_for,
    wait_idle,
)


class GatedRET(torch.nn.Module):
    """A test-only model around the real one whose every decode step first takes a permit
    from `gate`: the test decides how far generation gets, so nothing races the worker."""

    def __init__(self, inner: RET) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.gate = threading.Semaphore(0)

    def condition(self, emb: torch.Tensor) -> torch.Tensor:
        return self.inner.condition(emb)

    def step(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.gate.acquire(timeout=RUN_LIMIT_S):
            raise RuntimeError("the test never opened the gate")
        return self.inner.step(*args)


def test_cancellation_frees_running_and_queued_slots(sharp_model: LoadedModel) -> None:
    long = SamplingParams(max_new_tokens=200)
    gated = GatedRET(sharp_model.model)

    async def main() -> None:
        # Started only after all four are queued, so the first step takes two of them.
        loaded = dataclasses.replace(sharp_model, model=gated)
        engine = RETEngine("test", loaded, SchedulerConfig(max_batch_size=2))
        try:
            runs: dict[int, Run] = {}

            async def consume(i: int) -> None:
                run = runs[i]
                try:
                    async for event in run.handle.events():
                        if isinstance(event, TokenDelta):
                            run.tokens += 1
                        else:
                            run.outcome = event
                except ServeError as error:
                    run.outcome = error
                finally:
                    run.done = True

            tasks = []
            for i in range(4):
                request = SequenceRequest(embedding(100 + i), long, stream=True)
                runs[i] = Run(engine.submit(request))
                tasks.append(asyncio.create_task(consume(i)))
            engine.start()
            gated.gate.release(2)  # two steps, then the worker blocks inside the third
            await wait_for(lambda: runs[0].tokens >= 2 and runs[1].tokens >= 2, "two running")
            assert engine.stats().waiting == 2 and engine.stats().running == 2
            for run in runs.values():
                run.handle.cancel()
            gated.gate.release(10_000)  # from now on the model runs freely
            await asyncio.wait_for(asyncio.gather(*tasks), RUN_LIMIT_S)
            await wait_idle(engine)
            stages = []
            for run in runs.values():
                assert isinstance(run.outcome, ServeError), run.outcome
                assert run.outcome.kind is ErrorKind.CANCELLED
                stages.append(run.outcome.message.rsplit(" ", 1)[-1])
            assert sorted(stages) == ["generating", "generating", "queued", "queued"]
            assert runs[2].tokens == runs[3].tokens == 0
            assert 2 <= runs[0].tokens <= 3 and 2 <= runs[1].tokens <= 3  # left at once
            # the freed slots serve new sequences correctly
            params = SamplingParams(max_new_tokens=30)
            handles = [engine.submit(SequenceRequest(embedding(s), params)) for s in (7, 8, 9)]
            results = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in handles)), RUN_LIMIT_S
            )
            for s, result in zip((7, 8, 9), results, strict=True):
                assert list(result.token_ids) == reference(sharp_model, s, params).token_ids
            await wait_idle(engine)
        finally:
            gated.gate.release(10_000)  # never leave the worker blocked
            await engine.close()

    asyncio.run(main())


def test_queue_full_is_refused_at_once_and_accepted_sequences_all_finish(
    sharp_model: LoadedModel,
) -> None:
    long = SamplingParams(max_new_tokens=200)
    short = SamplingParams(max_new_tokens=20)
    assert len(reference(sharp_model, 100, long).token_ids) > 100  # it holds the slot a while

    async def main() -> None:
        gated = GatedRET(sharp_model.model)  # holds the first inside its first step
        engine = start_engine(
            dataclasses.replace(sharp_model, model=gated), max_batch_size=1, max_queue_size=2
        )
        try:
            first = engine.submit(SequenceRequest(embedding(100), long))
            await wait_for(lambda: engine.stats().running == 1, "the first to run")
            queued = [engine.submit(SequenceRequest(embedding(s), short)) for s in (1, 2)]
            started = time.monotonic()
            with pytest.raises(ServeError) as info:
                engine.submit(SequenceRequest(embedding(3), short))
            assert time.monotonic() - started < 0.5  # refused at once, not after waiting
            assert info.value.kind is ErrorKind.EXHAUSTED
            assert "full" in info.value.message and "2" in info.value.message
            assert engine.stats().waiting == 2  # the refusal dropped nothing
            gated.gate.release(10_000)
            results = await asyncio.wait_for(
                asyncio.gather(first.result(), *(h.result() for h in queued)), RUN_LIMIT_S
            )
            assert list(results[0].token_ids) == reference(sharp_model, 100, long).token_ids
            for s, result in zip((1, 2), results[1:], strict=True):
                assert list(result.token_ids) == reference(sharp_model, s, short).token_ids
            await wait_idle(engine)
        finally:
            gated.gate.release(10_000)  # never leave the worker blocked
            await engine.close()

    asyncio.run(main())
