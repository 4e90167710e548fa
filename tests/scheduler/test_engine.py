"""The RETEngine with a real loaded model, driven from asyncio: continuous batching must give
every sequence exactly what it would get alone, with the eager step and with the C++ prefix
step (whose all-greedy batches run up to `steps_per_call` steps a call), speculating on n-gram
drafts or not ("prefix+draft")."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retd.model.checkpoint import LoadedModel
from retd.model.cpp_step import Draft
from retd.server.engine import SequenceRequest
from retd.server.errors import ErrorKind, ServeError
from retd.server.handles import SequenceResult
from tests.scheduler._engine import (
    HYPOTHESIS,
    RUN_LIMIT_S,
    Plan,
    Run,
    embedding,
    engine_config,
    plans_strategy,
    reference,
    serve,
    start_engine,
    wait_idle,
)


def with_draft(step_impl: str, data: st.DataObject) -> tuple[str, Draft | None]:
    """ "prefix+draft": the prefix step and a Draft drawn from `data`."""
    impl, _, drafted = step_impl.partition("+")
    if not drafted:
        return impl, None
    return impl, data.draw(st.builds(Draft, st.integers(1, 4), st.integers(1, 3)), label="draft")


@pytest.mark.parametrize("step_impl", ["eager", "prefix", "prefix+draft"])
@HYPOTHESIS
@given(plans=plans_strategy(sampled=False), config=engine_config(), data=st.data())
def test_greedy_results_equal_generate_alone_whatever_the_batching(
    sharp_model: LoadedModel,
    step_impl: str,
    plans: list[Plan],
    config: dict[str, object],
    data: st.DataObject,
) -> None:
    order = data.draw(st.permutations(range(len(plans))), label="order")
    step_impl, draft = with_draft(step_impl, data)

    async def main() -> dict[int, Run]:
        engine = start_engine(sharp_model, step_impl, draft, **config)
        try:
            runs = await serve(engine, plans, order)
            await wait_idle(engine)
            return runs
        finally:
            await engine.close()

    runs = asyncio.run(main())
    for i, plan in enumerate(plans):
        outcome = runs[i].outcome
        expected = reference(sharp_model, plan.emb_seed, plan.params, step_impl)
        if plan.cancel_after is not None and isinstance(outcome, ServeError):
            assert outcome.kind is ErrorKind.CANCELLED, outcome.message
            continue
        assert isinstance(outcome, SequenceResult), (i, outcome)
        assert list(outcome.token_ids) == expected.token_ids, (i, plan)
        assert outcome.finish_reason == expected.finish_reason
        assert outcome.text == expected.text


@pytest.mark.parametrize("step_impl", ["eager", "prefix", "prefix+draft"])
@HYPOTHESIS
@given(plans=plans_strategy(sampled=True), config=engine_config(), data=st.data())
def test_seeded_sampling_does_not_depend_on_the_batch_around_it(
    sharp_model: LoadedModel,
    step_impl: str,
    plans: list[Plan],
    config: dict[str, object],
    data: st.DataObject,
) -> None:
    order = data.draw(st.permutations(range(len(plans))), label="order")
    step_impl, draft = with_draft(step_impl, data)

    async def main() -> tuple[dict[int, Run], dict[int, SequenceResult]]:
        engine = start_engine(sharp_model, step_impl, draft, **config)
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
        expected = reference(sharp_model, plan.emb_seed, plan.params, step_impl)
        assert list(alone[i].token_ids) == expected.token_ids, (i, plan)
        assert list(outcome.token_ids) == expected.token_ids, (i, plan)
        assert outcome.seed == plan.seed
