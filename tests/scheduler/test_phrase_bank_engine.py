"""The PhraseBankEngine driven from asyncio: queries that wait together are answered by one
search, with the scheduler's priorities, deadlines and cancellation, and a search that fails
fails only its own rows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retd.model.generation import FinishReason
from retd.model.phrase_bank import LoadedPhraseBank, PhraseBank
from retd.server.engine import SequenceRequest
from retd.server.errors import ErrorKind, ServeError
from retd.server.handles import SequenceResult, TokenDelta
from retd.server.phrase_bank_engine import PhraseBankEngine
from retd.server.requests import SearchParams
from retd.server.scheduler import SchedulerConfig

RUN_LIMIT_S = 30.0
PHRASES = [f"phrase number {i}" for i in range(40)]
ROWS = np.random.default_rng(3).standard_normal((len(PHRASES), 768)).astype(np.float32)
ROWS /= np.linalg.norm(ROWS, axis=1, keepdims=True)
FAULT = 12345.0  # a query whose first value is this makes FaultyBank.search raise


class FaultyBank(PhraseBank):
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (queries[:, 0] == FAULT).any():
            raise RuntimeError("injected fault")
        return super().search(queries, k)


def loaded_bank(bank_class: type[PhraseBank] = PhraseBank) -> LoadedPhraseBank:
    card = {"version": "test", "encoder": {"name": "test-encoder", "dim": 768}}
    return LoadedPhraseBank(bank_class(PHRASES, torch.from_numpy(ROWS)), card, "0" * 64, Path("."))


def query(row: int, candidates: int = 1, **fields: object) -> SequenceRequest:
    return SequenceRequest(ROWS[row] * 3.0, SearchParams(candidates), **fields)  # type: ignore[arg-type]


async def outcome(engine: PhraseBankEngine, request: SequenceRequest) -> object:
    handle = engine.submit(request)
    try:
        return await asyncio.wait_for(handle.result(), RUN_LIMIT_S)
    except ServeError as error:
        return error


def run_queued(engine: PhraseBankEngine, requests: list[SequenceRequest]) -> list[object]:
    """Submit every request before the worker starts (so they wait together), then start
    it and collect the outcomes in request order."""

    async def main() -> list[object]:
        tasks = [asyncio.create_task(outcome(engine, r)) for r in requests]
        await asyncio.sleep(0)  # every task submits before the worker runs
        engine.start()
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            await engine.close()

    return asyncio.run(main())


def test_queries_waiting_together_share_one_search() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(), SchedulerConfig(max_batch_size=8))
    results = run_queued(engine, [query(i) for i in range(12)])
    assert all(isinstance(r, SequenceResult) for r in results)
    assert [r.text for r in results] == PHRASES[:12]  # type: ignore[union-attr]
    assert [r.batch_max for r in results] == [8] * 8 + [4] * 4  # type: ignore[union-attr]
    for result in results:
        assert isinstance(result, SequenceResult)
        assert result.finish_reason is FinishReason.EOS and result.token_ids == ()
        assert result.candidates[0].score == pytest.approx(1.0, abs=1e-5)


def test_each_query_gets_its_own_number_of_candidates() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(), SchedulerConfig(max_batch_size=4))
    results = run_queued(engine, [query(0, 1), query(1, 7), query(2, 100)])
    counts = [len(r.candidates) for r in results]  # type: ignore[attr-defined]
    assert counts == [1, 7, len(PHRASES)]
    for row, result in enumerate(results):
        assert isinstance(result, SequenceResult)
        expected = np.sort(ROWS @ ROWS[row])[::-1][: len(result.candidates)]
        np.testing.assert_allclose([c.score for c in result.candidates], expected, atol=1e-5)
        assert [c.text for c in result.candidates] == [PHRASES[c.index] for c in result.candidates]


def test_priority_deadline_and_cancellation_are_the_schedulers() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(), SchedulerConfig(max_batch_size=1))
    past = time.monotonic() - 1.0

    async def main() -> list[object]:
        low = asyncio.create_task(outcome(engine, query(0, priority=0)))
        high = asyncio.create_task(outcome(engine, query(1, priority=5)))
        late = asyncio.create_task(outcome(engine, query(2, deadline=past)))
        await asyncio.sleep(0)
        cancelled = engine.submit(query(3))
        cancelled.cancel()
        engine.start()
        try:
            done = await asyncio.gather(low, high, late)
            try:
                await asyncio.wait_for(cancelled.result(), RUN_LIMIT_S)
            except ServeError as error:
                return [*done, error]
            return [*done, None]
        finally:
            await engine.close()

    low, high, late, cancelled = asyncio.run(main())
    assert isinstance(low, SequenceResult) and isinstance(high, SequenceResult)
    assert high.queue_s < low.queue_s  # the higher priority went first
    assert isinstance(late, ServeError) and late.kind is ErrorKind.DEADLINE
    assert isinstance(cancelled, ServeError) and cancelled.kind is ErrorKind.CANCELLED
    assert engine.stats().waiting == engine.stats().running == 0


def test_a_failing_search_fails_only_its_row() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(FaultyBank), SchedulerConfig(max_batch_size=8))
    marked = query(2)
    marked.embedding[0] = FAULT
    results = run_queued(engine, [query(0), query(1), marked, query(3)])
    assert isinstance(results[2], ServeError)
    assert results[2].kind is ErrorKind.INTERNAL and "injected fault" in results[2].message
    assert [r.text for r in results if isinstance(r, SequenceResult)] == [
        PHRASES[0],
        PHRASES[1],
        PHRASES[3],
    ]


def test_a_stream_gets_the_whole_phrase_then_the_result() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(), SchedulerConfig(max_batch_size=2))

    async def main() -> list[object]:
        engine.start()
        try:
            handle = engine.submit(query(5, 3, stream=True))
            return [event async for event in handle.events()]
        finally:
            await engine.close()

    delta, result = asyncio.run(main())
    assert delta == TokenDelta(PHRASES[5], ())
    assert isinstance(result, SequenceResult) and result.tail_text == ""
    assert result.text == PHRASES[5] and len(result.candidates) == 3


def test_description_and_warm_up() -> None:
    engine = PhraseBankEngine("bank", loaded_bank(), SchedulerConfig(max_batch_size=4))
    engine.warm_up()
    model = engine.description
    assert engine.kind == model.architecture == "phrase_bank" and model.phrase_count == 40
    assert model.max_length == len("phrase number 39") and model.vocab_size == 0
    assert model.parameter_count == 40 * 768 and model.encoder == "test-encoder"
