"""What the RETEngine's tests share: embeddings, references computed alone, engines,
and plans of concurrent calls to serve."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from retd.model.checkpoint import LoadedModel
from retd.model.cpp_step import Draft, step_function
from retd.model.generation import GenerationResult, SamplingParams, generate
from retd.model.model import RET
from retd.server.engine import SequenceRequest
from retd.server.errors import ServeError
from retd.server.handles import SequenceHandle, SequenceResult, TokenDelta
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


def run_alone(
    model: RET, emb: np.ndarray, params: SamplingParams, step_impl: str = "eager"
) -> GenerationResult:
    step = step_function(model, step_impl)
    return generate(model, torch.from_numpy(emb)[None], [params], step=step)[0]


_REFERENCES: dict[int, object] = {}


def reference(
    loaded: LoadedModel, emb_seed: int, params: SamplingParams, step_impl: str = "eager"
) -> GenerationResult:
    """generate() alone with the step `step_impl` names, memoised per model, embedding,
    params and step."""
    cached = _REFERENCES.setdefault(id(loaded.model), {})
    assert isinstance(cached, dict)
    key = (emb_seed, params, step_impl)
    if key not in cached:
        cached[key] = run_alone(loaded.model, embedding(emb_seed), params, step_impl)
    return cached[key]


def start_engine(
    loaded: LoadedModel, step_impl: str = "eager", draft: Draft | None = None, **config: object
) -> RETEngine:
    """A started engine on `loaded` whose decode steps are `step_impl`'s (model/cpp_step.py):
    the eager step, or the C++ prefix step, whose all-greedy batches run several steps a call
    (speculating on `draft`s if given)."""
    step = step_function(loaded.model, step_impl)
    scheduler = SchedulerConfig(**config)  # type: ignore[arg-type]
    engine = RETEngine("test", loaded, scheduler, step, draft)
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
                    no_repeat_ngram_size=draw(st.sampled_from([0, 0, 3])),
                    repetition_penalty=draw(st.sampled_from([1.0, 1.0, 1.3])),
                )
            else:  # greedy, with any of the loop breakers Decode's defaults and cards use
                seed, params = (
                    0,
                    SamplingParams(
                        max_new_tokens=draw(st.integers(1, 40)),
                        no_repeat_ngram_size=draw(st.sampled_from([0, 0, 2, 3])),
                        repetition_penalty=draw(st.sampled_from([1.0, 1.5])),
                        repetition_ngram_size=draw(st.sampled_from([1, 2, 4])),
                        eos_bias=draw(st.sampled_from([0.0, 0.0, -2.0])),
                        # bytes the sharp model writes: a stop ends some sequences mid-call
                        stop=draw(st.sampled_from([(), ("\x07",), ("a", "1", "<", "q")])),
                    ),
                )
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
            "steps_per_call": st.sampled_from([1, 2, 4, 8]),
        }
    )
