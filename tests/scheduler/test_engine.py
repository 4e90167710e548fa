"""The RETEngine with a real loaded model, driven from asyncio: continuous batching must give
every sequence exactly what it would get alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import LoadedModel
from retd.model.generation import GenerationResult, SamplingParams, generate
from retd.model.model import RET
from retd.server.engine import (
    SequenceHandle,
    SequenceRequest,
    SequenceResult,
    TokenDelta,
)
from retd.server.errors import ErrorKind, ServeError
from retd.server.ret_engine import RETEngine
from retd.server.scheduler import SchedulerConfig
from tests._wait import apoll

RUN_LIMIT_S = 60.0
POLL_LIMIT_S = 20.0
HYPOTHESIS = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def embedding(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(768).astype(np.float32)


def run_alone(model: RET, emb: np.ndarray, params: SamplingParams) -> GenerationResult:
    return generate(model, torch.from_numpy(emb)[None], [params])[0]


_REFERENCES: dict[int, object] = {}


def reference(loaded: LoadedModel, emb_seed: int, params: SamplingParams) -> GenerationResult:
    """generate() alone, memoised per model, embedding and params."""
    cached = _REFERENCES.setdefault(id(loaded.model), {})
    assert isinstance(cached, dict)
    key = (emb_seed, params)
    if key not in cached:
        cached[key] = run_alone(loaded.model, embedding(emb_seed), params)
    return cached[key]


def start_engine(loaded: LoadedModel, **config: object) -> RETEngine:
    engine = RETEngine("test", loaded, SchedulerConfig(**config))  # type: ignore[arg-type]
    engine.start()
    return engine


async def wait_idle(engine: RETEngine) -> None:
    """Bounded poll until the engine holds nothing: no waiting, no running sequence."""
    stats = await apoll(
        lambda: (s := engine.stats()).waiting == 0 and s.running == 0 and s,
        POLL_LIMIT_S,
        lambda: f"engine idle (now {engine.stats()})",
        interval=0.002,
    )
    assert stats.free_slots == engine.scheduler_config.max_batch_size


async def wait_for(condition: Callable[[], object], what: str) -> None:
    await apoll(condition, POLL_LIMIT_S, what, interval=0.001)


@dataclass
class Plan:
    emb_seed: int
    params: SamplingParams
    seed: int = 0
    cancel_after: int | None = None  # cancel once this many tokens were streamed
    after: tuple[int, int] | None = None  # submit once plan j streamed k tokens (or ended)


@dataclass
class Run:
    handle: SequenceHandle
    tokens: int = 0
    done: bool = False
    outcome: SequenceResult | ServeError | None = None


async def serve(engine: RETEngine, plans: list[Plan], order: list[int]) -> dict[int, Run]:
    """Submit the plans in `order` (each after its `after` condition), stream them all and
    cancel those that ask for it; return every run once all have ended."""
    runs: dict[int, Run] = {}

    async def consume(i: int) -> None:
        run, plan = runs[i], plans[i]
        try:
            if plan.cancel_after == 0:
                run.handle.cancel()
            async for event in run.handle.events():
                if isinstance(event, TokenDelta):
                    run.tokens += len(event.token_ids)
                    if plan.cancel_after is not None and run.tokens >= plan.cancel_after:
                        run.handle.cancel()
                else:
                    run.outcome = event
        except ServeError as error:
            run.outcome = error
        finally:
            run.done = True

    async def submit_all() -> list[asyncio.Task[None]]:
        tasks = []
        for i in order:
            plan = plans[i]
            if plan.after is not None and plan.after[0] in runs:
                j, k = plan.after
                await wait_for(lambda j=j, k=k: runs[j].tokens >= k or runs[j].done, "progress")
            request = SequenceRequest(embedding(plan.emb_seed), plan.params, stream=True)
            runs[i] = Run(engine.submit(request))
            tasks.append(asyncio.create_task(consume(i)))
        return tasks

    tasks = await asyncio.wait_for(submit_all(), RUN_LIMIT_S)
    await asyncio.wait_for(asyncio.gather(*tasks), RUN_LIMIT_S)
    return runs


def plans_strategy(sampled: bool) -> st.SearchStrategy[list[Plan]]:
    @st.composite
    def plans(draw: st.DrawFn) -> list[Plan]:
        n = draw(st.integers(1, 7))
        result = []
        for i in range(n):
            if sampled and draw(st.booleans()):
                seed = draw(st.integers(0, 2**32))
                params = SamplingParams(
                    max_new_tokens=draw(st.integers(1, 40)),
                    temperature=0.9,
                    top_k=draw(st.sampled_from([0, 1, 5, 40])),
                    top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
                    seed=seed,
                )
            else:
                seed, params = 0, SamplingParams(max_new_tokens=draw(st.integers(1, 40)))
            cancel = None if sampled else draw(st.sampled_from([None, None, None, 0, 1, 5]))
            after = None
            if i and draw(st.booleans()):
                after = (draw(st.integers(0, i - 1)), draw(st.integers(1, 10)))
            result.append(Plan(draw(st.integers(0, 50)), params, seed, cancel, after))
        return result

    return plans()


def engine_config() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {
            "max_batch_size": st.integers(1, 4),
            "batching": st.sampled_from(["continuous", "continuous", "static"]),
            "max_wait_ms": st.sampled_from([0.0, 0.0, 5.0]),
        }
    )


@HYPOTHESIS
@given(plans=plans_strategy(sampled=False), config=engine_config(), data=st.data())
def test_greedy_results_equal_generate_alone_whatever_the_batching(
    sharp_model: LoadedModel, plans: list[Plan], config: dict[str, object], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(plans))), label="order")

    async def main() -> dict[int, Run]:
        engine = start_engine(sharp_model, **config)
        try:
            runs = await serve(engine, plans, order)
            await wait_idle(engine)
            return runs
        finally:
            await engine.close()

    runs = asyncio.run(main())
    for i, plan in enumerate(plans):
        outcome = runs[i].outcome
        expected = reference(sharp_model, plan.emb_seed, plan.params)
        if plan.cancel_after is not None and isinstance(outcome, ServeError):
            assert outcome.kind is ErrorKind.CANCELLED, outcome.message
            continue
        assert isinstance(outcome, SequenceResult), (i, outcome)
        assert list(outcome.token_ids) == expected.token_ids, (i, plan)
        assert outcome.finish_reason == expected.finish_reason
        assert outcome.text == expected.text


@HYPOTHESIS
@given(plans=plans_strategy(sampled=True), config=engine_config(), data=st.data())
def test_seeded_sampling_does_not_depend_on_the_batch_around_it(
    sharp_model: LoadedModel, plans: list[Plan], config: dict[str, object], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(plans))), label="order")

    async def main() -> tuple[dict[int, Run], dict[int, SequenceResult]]:
        engine = start_engine(sharp_model, **config)
        try:
            runs = await serve(engine, plans, order)
            alone = {}
            for i, plan in enumerate(plans):  # the same requests, each alone in the engine
                await wait_idle(engine)
                request = SequenceRequest(embedding(plan.emb_seed), plan.params)
                alone[i] = await asyncio.wait_for(engine.submit(request).result(), RUN_LIMIT_S)
            return runs, alone
        finally:
            await engine.close()

    runs, alone = asyncio.run(main())
    for i, plan in enumerate(plans):
        outcome = runs[i].outcome
        assert isinstance(outcome, SequenceResult), (i, outcome)
        expected = reference(sharp_model, plan.emb_seed, plan.params)
        assert list(alone[i].token_ids) == expected.token_ids, (i, plan)
        assert list(outcome.token_ids) == expected.token_ids, (i, plan)
        assert outcome.seed == plan.seed


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


def test_sampled_batch_mates_keep_their_tokens_when_a_row_fails_in_sampling(
    sharp_model: LoadedModel,
) -> None:
    """A NaN embedding makes its sampled row's probabilities NaN, so `sample()` raises after the
    rows before it have drawn from their generators; the engine retries the step in halves.
    The sequences that did not fail must still get exactly their seeded tokens (the engine
    restores their generators' states before sampling row by row)."""
    params = [
        SamplingParams(max_new_tokens=40, temperature=1.5, seed=seed) for seed in (11, 12, 13)
    ]

    async def main() -> list[SequenceResult]:
        engine = start_engine(sharp_model, max_batch_size=4)
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
        assert list(result.token_ids) == reference(sharp_model, 20 + i, p).token_ids, i


def test_a_batch_whose_sampling_raises_is_sampled_row_by_row_with_the_same_draws(
    sharp_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If sampling a whole step raises, the engine samples its rows one by one: a row's draws
    depend only on its seed and position, so every sequence still gets exactly its tokens."""
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
        SamplingParams(max_new_tokens=12, temperature=1.2, top_k=20, seed=31),
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=32),
    ]

    async def main() -> list[SequenceResult]:
        # one batch of all three from the first step (the idle model waits until it is full)
        engine = start_engine(sharp_model, max_batch_size=3, max_wait_ms=60_000.0)
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
        assert list(result.token_ids) == reference(sharp_model, 40 + i, p).token_ids, i
