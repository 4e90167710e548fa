"""What an engine hands back to a caller: a stream's `TokenDelta`s, then the
`SequenceResult` (or a `ServeError`), through the caller's `SequenceHandle`, which the
worker thread delivers to on the caller's event loop (one wake-up a step)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from retd.model.decoding import FinishReason
from retd.server.errors import ServeError
from retd.server.memory import MemorySample


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """One of a phrase bank's nearest phrases."""

    text: str
    score: float  # cosine similarity to the query (an edit's: of its re-encoding)
    index: int  # the phrase's row in the bank (an edit's: of the phrase it edits)
    edited: bool = False  # the bank's editor rewrote the phrase (a Decode's answer only)


@dataclass(frozen=True)
class SequenceResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    mean_logprob: float
    seed: int
    queue_s: float
    compute_s: float
    # For streams: the text and tokens of the last step, not yet sent as a delta.
    tail_text: str = ""
    tail_token_ids: tuple[int, ...] = ()
    # Where the time and memory went, for telemetry.
    submitted_at: float = 0.0  # time.monotonic()
    first_token_s: float = 0.0  # from submission to the first token
    batch_min: int = 0
    batch_max: int = 0
    batch_mean: float = 0.0
    memory: MemorySample | None = None
    # A phrase bank's nearest phrases, best first (text is the first one's); empty for RET.
    candidates: tuple[Candidate, ...] = field(default=())


Event: TypeAlias = TokenDelta | SequenceResult | ServeError


def _deliver_in_loop(pairs: Sequence[tuple[SequenceHandle, Event]]) -> None:
    for handle, event in pairs:
        handle.deliver_in_loop(event)


class SequenceHandle:
    """The event-loop side of one submitted sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel: Callable[[int], None]) -> None:
        """`cancel(seq_id)`: its engine's, called when the caller leaves."""
        self.seq_id = -1
        self._loop = loop
        self._cancel = cancel
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def cancel(self) -> None:
        """The caller left: the sequence leaves its batch at the next step (no-op once done)."""
        if not self._done:
            self._cancel(self.seq_id)

    @staticmethod
    def deliver_all(handed: Sequence[tuple[SequenceHandle, Event]]) -> None:
        """Called from the worker thread: each event to its handle, in one wake-up of their
        event loop (a wake-up writes to the loop's socket, which hands the GIL to the loop's
        thread and waits to get it back: one a step, not one an event)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceHandle, Event]]] = {}
        for handle, event in handed:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver_in_loop, pairs)

    def deliver_in_loop(self, event: Event) -> None:
        """Called on the event loop's own thread (an engine process's reader)."""
        self._events.put_nowait(event)

    async def events(self) -> AsyncIterator[TokenDelta | SequenceResult]:
        """Deltas (streams only), then the result; a failure raises ServeError."""
        while not self._done:
            event = await self._events.get()
            if isinstance(event, ServeError):
                self._done = True
                raise event
            if isinstance(event, SequenceResult):
                self._done = True
            yield event

    async def result(self) -> SequenceResult:
        async for event in self.events():
            if isinstance(event, SequenceResult):
                return event
        raise AssertionError("a sequence's events end with its result")
