"""What the Scheduler's tests share: sequences with fake tokens, a scheduler, one step."""

from __future__ import annotations

import numpy as np

from retd.model.generation import OutputBuffer, SamplingParams
from retd.server.requests import SequenceRequest
from retd.server.scheduler import (
    Delta,
    Finished,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    Step,
)

BYTE = 65  # "A": a token that never ends a sequence by itself (EOS is 0)
EMBEDDING = np.zeros(4, dtype=np.float32)  # the scheduler never reads it


def state(
    seq_id: int,
    max_new_tokens: int = 5,
    *,
    priority: int = 0,
    deadline: float | None = None,
    arrival: float = 0.0,
    stop: tuple[str, ...] = (),
    stream: bool = False,
) -> SequenceState:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop)
    request = SequenceRequest(EMBEDDING, params, stream, deadline, priority)
    return SequenceState(seq_id, request, OutputBuffer(params, eos_id=0), arrival=arrival)


def scheduler(**config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config))  # type: ignore[arg-type]


def run_step(
    s: Scheduler, now: float, token: int | dict[int, int] = BYTE
) -> tuple[Step, list[Delta | Finished]]:
    """schedule() then update() with `token` for every row (or per sequence id)."""
    step = s.schedule(now)
    tokens = [token.get(r.seq_id, BYTE) if isinstance(token, dict) else token for r in step.rows]
    return step, s.update(step, tokens, [-1.0] * len(tokens), now)


def ids(step: Step) -> list[int]:
    return [r.seq_id for r in step.rows]


def finished_ids(outcomes: list[Delta | Finished]) -> list[int]:
    return [o.seq_id for o in outcomes if isinstance(o, Finished)]
