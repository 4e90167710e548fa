"""The RETEngine with a real loaded model: a row that fails in the model step or in
sampling fails only its own sequence; its batch-mates get exactly their tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import LoadedModel
from retd.model.generation import SamplingParams
from retd.model.model import RET
from retd.server.engine import SequenceRequest
from retd.server.errors import ErrorKind, ServeError
from retd.server.handles import SequenceResult, TokenDelta
from retd.server.ret_engine import RETEngine
from retd.server.scheduler import SchedulerConfig
from tests.scheduler._engine import (
    RUN_LIMIT_S,
    embedding,
    reference,
    start_engine,
    wait_for,
    wait_idle,
)


class PoisonableRET(torch.nn.Module):
    """A test-only model around the real one whose decode step raises when the batch holds a
    row conditioned on a NaN embedding (its conditioning vector is all NaN). Each step first
    takes a permit from `gate` and counts itself in `entered`, so a test can hold the worker
    inside a step of its choosing."""

    def __init__(self, inner: RET, permits: int = 1_000_000) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.gate = threading.Semaphore(permits)
        self.entered = 0

    def condition(self, emb: torch.Tensor) -> torch.Tensor:
        return self.inner.condition(emb)

    def step(self, cond: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        self.entered += 1
        if not self.gate.acquire(timeout=RUN_LIMIT_S):
            raise RuntimeError("the test never opened the gate")
        if torch.isnan(cond).all(dim=1).any():
            raise RuntimeError("poisoned row in the batch")
        return self.inner.step(cond, *args)


POISON = np.full(768, np.nan, dtype=np.float32)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_good=st.integers(1, 4),
    poison_at=st.integers(0, 4),
    joins_running_batch=st.booleans(),
    lengths=st.lists(st.integers(5, 40), min_size=4, max_size=4),
)
def test_a_failing_row_fails_only_its_sequence_with_internal(
    sharp_model: LoadedModel,
    n_good: int,
    poison_at: int,
    joins_running_batch: bool,
    lengths: list[int],
) -> None:
    # joining a running batch: the good ones take the first step together and the worker is
    # held inside the second, so the poisoned row surely joins sequences mid-generation
    model = PoisonableRET(sharp_model.model, permits=1 if joins_running_batch else 1_000_000)
    poisonable = dataclasses.replace(sharp_model, model=model)
    params = [SamplingParams(max_new_tokens=n) for n in lengths[:n_good]]
    poison_at = min(poison_at, n_good)

    async def main() -> None:
        batch = n_good + 1
        # joining together: the idle model waits (up to a minute) until the batch is full
        wait_ms = 0.0 if joins_running_batch else 60_000.0
        engine = RETEngine(
            "test", poisonable, SchedulerConfig(max_batch_size=batch, max_wait_ms=wait_ms)
        )
        try:
            first = n_good if joins_running_batch else poison_at
            good = [engine.submit(SequenceRequest(embedding(i), params[i])) for i in range(first)]
            engine.start()
            if joins_running_batch:
                await wait_for(lambda: model.entered == 2, "the worker to enter its second step")
                assert engine.stats().running >= 1 and engine.stats().waiting == 0
            bad = engine.submit(SequenceRequest(POISON, SamplingParams(max_new_tokens=5)))
            good += [
                engine.submit(SequenceRequest(embedding(i), params[i]))
                for i in range(first, n_good)
            ]
            model.gate.release(1_000_000)
            with pytest.raises(ServeError) as info:
                await asyncio.wait_for(bad.result(), RUN_LIMIT_S)
            assert info.value.kind is ErrorKind.INTERNAL
            assert "poisoned row" in info.value.message
            results = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in good)), RUN_LIMIT_S
            )
            for i, (p, result) in enumerate(zip(params, results, strict=True)):
                assert list(result.token_ids) == reference(sharp_model, i, p).token_ids
            await wait_idle(engine)
            # the failed sequence's slot serves again (every slot is used by this batch)
            again = [engine.submit(SequenceRequest(embedding(i), params[0])) for i in range(batch)]
            results = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in again)), RUN_LIMIT_S
            )
            for i, result in enumerate(results):
                assert list(result.token_ids) == reference(sharp_model, i, params[0]).token_ids
            await wait_idle(engine)
        finally:
            model.gate.release(1_000_000)  # never leave the worker blocked
            await engine.close()

    asyncio.run(main())


@pytest.mark.parametrize("step_impl", ["eager", "prefix"])
def test_sampled_batch_mates_keep_their_tokens_when_a_row_fails_in_sampling(
    sharp_model: LoadedModel, step_impl: str
) -> None:
    """A NaN embedding makes its sampled row's probabilities NaN, so `sample()` raises after the
    rows before it have drawn from their generators; the engine retries the step in halves.
    The sequences that did not fail must still get exactly their seeded tokens (the engine
    restores their generators' states before sampling row by row)."""
    params = [
        SamplingParams(max_new_tokens=40, temperature=1.5, seed=seed) for seed in (11, 12, 13)
    ]

    async def main() -> list[SequenceResult]:
        engine = start_engine(sharp_model, step_impl, max_batch_size=4)
        try:
            runs = [
                engine.submit(SequenceRequest(embedding(20 + i), p, stream=True))
                for i, p in enumerate(params)
            ]
            progress = [0, 0, 0]

            async def collect(i: int) -> SequenceResult:
                async for event in runs[i].events():
                    if isinstance(event, TokenDelta):
                        progress[i] += 1
                    else:
                        return event
                raise AssertionError("no result")

            tasks = [asyncio.create_task(collect(i)) for i in range(3)]
            await wait_for(lambda: min(progress) >= 3, "the batch to be under way")
            bad = SamplingParams(max_new_tokens=5, temperature=1.0, seed=1)
            handle = engine.submit(SequenceRequest(POISON, bad))
            with pytest.raises(ServeError) as info:
                await asyncio.wait_for(handle.result(), RUN_LIMIT_S)
            assert info.value.kind is ErrorKind.INTERNAL
            results = await asyncio.wait_for(asyncio.gather(*tasks), RUN_LIMIT_S)
            await wait_idle(engine)
            return results
        finally:
            await engine.close()

    results = asyncio.run(main())
    for i, (p, result) in enumerate(zip(params, results, strict=True)):
        expected = reference(sharp_model, 20 + i, p, step_impl)
        assert list(result.token_ids) == expected.token_ids, i


@pytest.mark.parametrize("step_impl", ["eager", "prefix"])
def test_a_batch_whose_sampling_raises_is_sampled_row_by_row_with_the_same_draws(
    sharp_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, step_impl: str
) -> None:
    """If sampling a whole step raises, the engine samples its rows one by one: a row's draws
    depend only on its seed and position, so every sequence still gets exactly its tokens.
    (A static batch: the C++ step draws a batch in Python only once a row has ended and pads
    it.)"""
    from retd.model.sampling import Sampler

    original = Sampler.__call__
    batched_calls = 0

    def fails_batched(self: Sampler, logits: torch.Tensor, *args: object) -> object:
        nonlocal batched_calls
        if logits.shape[0] > 1:
            batched_calls += 1
            raise RuntimeError("injected: a batched sampling step fails")
        return original(self, logits, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Sampler, "__call__", fails_batched)
    params = [
        SamplingParams(max_new_tokens=3, temperature=1.2, top_k=20, seed=31),
        SamplingParams(max_new_tokens=12, no_repeat_ngram_size=2, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=32),
    ]

    async def main() -> list[SequenceResult]:
        # one batch of all three from the first step (the idle model waits until it is full)
        engine = start_engine(
            sharp_model, step_impl, max_batch_size=3, max_wait_ms=60_000.0, batching="static"
        )
        try:
            handles = [
                engine.submit(SequenceRequest(embedding(40 + i), p)) for i, p in enumerate(params)
            ]
            return await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in handles)), RUN_LIMIT_S
            )
        finally:
            await engine.close()

    results = asyncio.run(main())
    assert batched_calls > 0  # the fallback ran
    monkeypatch.undo()
    for i, (p, result) in enumerate(zip(params, results, strict=True)):
        expected = reference(sharp_model, 40 + i, p, step_impl)
        assert list(result.token_ids) == expected.token_ids, i
