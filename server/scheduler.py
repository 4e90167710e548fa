"""The per-model scheduler: a bounded queue in front of a running batch of KV-cache slots.

Plain Python, no tensors (in the spirit of vLLM's v1 `Scheduler`):

- `add()` queues a sequence, or raises `QueueFullError` at once;
- `schedule(now)` decides one decode step: which waiting sequences join (and into which
  slot), which running ones continue, and which leave because their caller cancelled or
  their deadline passed. As in vLLM's scheduler output, a `Step` carries each joiner's
  request once (`Step.new`, cf. `NewRequestData`); a row that continues carries only its
  slot, position and last token (cf. `CachedRequestData`), so the worker keeps what it needs
  of a sequence from the step it joins;
- the worker executes the returned `Step` on the model and samples one token per row;
- `update(step, tokens, logprobs, now)` appends the tokens, applies the stops (EOS, length,
  stop strings), frees the slots of finished sequences and returns what to tell callers;
  `complete(step, now)` ends every row instead, for models that answer in one step (a phrase
  bank's search).

Iteration-level (continuous) batching is the default: waiting sequences join at every step
and finished ones leave at once. `batching="static"` is request-level batching for
comparison: a batch is filled, run until its longest member ends, then the next is taken.
As in request-level batching systems, a member that ends early keeps its row in the batch as
padding (computed, its tokens discarded) until the batch ends; its answer goes out at once.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from retd.model.decoding import NO_TOKEN, OutputBuffer
from retd.server.config import SchedulerConfig
from retd.server.requests import SequenceRequest


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class AbortReason(enum.Enum):
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    FAILED = "failed"


@dataclass
class SequenceState:
    """Everything the scheduler knows of one sequence."""

    seq_id: int
    request: SequenceRequest
    output: OutputBuffer | None  # None for a search: it generates no token
    arrival: float
    slot: int | None = None
    position: int = 0  # the position this sequence's next step writes
    last_token: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    cancelled: bool = False
    # The sizes of the batches this sequence ran in (padding rows included).
    batch_min: int = 0
    batch_max: int = 0
    batch_total: int = 0

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def deadline(self) -> float | None:
        return self.request.deadline

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def batch_mean(self) -> float:
        steps = self.position
        return self.batch_total / steps if steps else 0.0


@dataclass(frozen=True)
class Row:
    """One sequence's part of a decode step."""

    seq_id: int
    slot: int
    position: int  # 0: the first step, whose input is the embedding prefix
    token: int  # the byte generated last (ignored at position 0)
    padding: bool = False  # a static batch's ended member (id -1 - slot): computed, not sampled


@dataclass(frozen=True)
class Joiner:
    """What the worker needs of a sequence whose first step this is (its later steps carry
    only its `Row`)."""

    seq_id: int
    request: SequenceRequest


@dataclass(frozen=True)
class Aborted:
    seq_id: int
    reason: AbortReason
    stage: str  # "queued" or "generating"
    message: str = ""


@dataclass(frozen=True)
class Step:
    """The scheduler's decisions for one decode step."""

    rows: tuple[Row, ...]  # every sequence to step now, joiners included
    new: tuple[Joiner, ...]  # the sequences whose first step this is, with their requests
    aborted: tuple[Aborted, ...]  # left the queue or the batch before this step
    wake_at: float | None = None  # with no rows: nothing to do before this time
    # The most decode steps the worker may run before the next schedule() (multi-step
    # scheduling; `update_steps` takes them): never more than the longest row has left.
    steps: int = 1

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def joined(self) -> tuple[int, ...]:
        """The ids of the sequences whose first step this is."""
        return tuple(j.seq_id for j in self.new)


@dataclass(frozen=True)
class Delta:
    seq_id: int
    text: str
    token: int


@dataclass(frozen=True)
class Finished:
    seq_id: int
    state: SequenceState
    finished_at: float
    tail_text: str  # for streams: the text of the last step, not yet sent as a Delta


Outcome = Delta | Finished


@dataclass
class Scheduler:
    config: SchedulerConfig
    _waiting: list[tuple[int, int, int]] = field(default_factory=list)  # (-priority, n, id)
    _states: dict[int, SequenceState] = field(default_factory=dict)
    _running: dict[int, SequenceState] = field(default_factory=dict)  # slot -> sequence
    _free_slots: list[int] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _num_waiting: int = 0
    _cancelled_waiting: list[Aborted] = field(default_factory=list)
    _padding: dict[int, int] = field(default_factory=dict)  # slot -> next position (static)

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.config.max_batch_size))
        heapq.heapify(self._free_slots)

    # ---- what callers see --------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_padding(self) -> int:
        """Slots of a static batch whose sequence ended before the batch did."""
        return len(self._padding)

    def has_work(self) -> bool:
        """Anything for `schedule()` to do or report: waiting, running, or cancelled waiting
        sequences whose Aborted is not out yet."""
        return self._num_waiting > 0 or bool(self._running) or bool(self._cancelled_waiting)

    def add(self, state: SequenceState) -> None:
        """Queue a sequence; raises QueueFullError when the queue is at its bound."""
        if self._num_waiting >= self.config.max_queue_size:
            raise QueueFullError(
                f"the queue of waiting requests is full ({self._num_waiting} of "
                f"max_queue_size {self.config.max_queue_size}); retry later"
            )
        if state.seq_id in self._states:
            raise ValueError(f"sequence {state.seq_id} is already scheduled")
        self._states[state.seq_id] = state
        heapq.heappush(self._waiting, (-state.priority, next(self._order), state.seq_id))
        self._num_waiting += 1

    def cancel(self, seq_id: int) -> None:
        """The caller left. A waiting sequence leaves the queue now (its place is free at
        once); a running one leaves the batch at the next `schedule()`. Either way its
        Aborted comes out of that `schedule()`."""
        state = self._states.get(seq_id)
        if state is None:
            return
        state.cancelled = True
        if state.slot is None:
            self._release(state)
            self._cancelled_waiting.append(Aborted(seq_id, AbortReason.CANCELLED, "queued"))

    # ---- one decode step ---------------------------------------------------------------

    def schedule(self, now: float) -> Step:
        aborted = self._cancelled_waiting + self._drop_departed(now)
        self._cancelled_waiting = []
        joined = self._admit(now)
        rows = tuple(
            Row(s.seq_id, slot, s.position, s.last_token)
            for slot, s in sorted(self._running.items())
        ) + tuple(
            Row(-1 - slot, slot, position, 0, padding=True)
            for slot, position in sorted(self._padding.items())
        )
        wake_at = None
        if not rows and self._num_waiting:  # held back by max_wait_ms, or by a deadline
            waiting = [s for s in self._states.values() if s.slot is None]
            wake_at = min(
                [min(s.arrival for s in waiting) + self.config.max_wait_ms / 1e3]
                + [s.deadline for s in waiting if s.deadline is not None]
            )
        new = tuple(Joiner(s.seq_id, s.request) for s in joined)
        return Step(rows, new, tuple(aborted), wake_at, self._steps())

    def _steps(self) -> int:
        """How many steps the worker may run before the next decision: up to steps_per_call,
        no more than the longest running sequence has left (1 for a static batch)."""
        if self.config.steps_per_call == 1 or self._padding or self.config.batching == "static":
            return 1
        left = max(
            (
                s.output.params.max_new_tokens - s.position
                for s in self._running.values()
                if s.output
            ),
            default=1,
        )
        return max(1, min(self.config.steps_per_call, left))

    def update(
        self, step: Step, tokens: Sequence[int], logprobs: Sequence[float], now: float
    ) -> list[Outcome]:
        """Apply one step's sampled tokens (aligned with `step.rows`)."""
        outcomes: list[Outcome] = []
        size = len(step.rows)
        for row, token, logprob in zip(step.rows, tokens, logprobs, strict=True):
            if row.padding:
                if row.slot in self._padding:
                    self._padding[row.slot] += 1
                continue
            state = self._running[row.slot]
            assert state.output is not None, "a search ends with complete(), not update()"
            reason = state.output.append(token, logprob)
            if state.position == 0:
                state.first_token_at = now
                state.batch_min = size
            state.position += 1
            state.last_token = token
            state.batch_min = min(state.batch_min, size)
            state.batch_max = max(state.batch_max, size)
            state.batch_total += size
            if reason is not None:
                self._release(state)
                tail = state.output.take_delta() if state.stream else ""
                outcomes.append(Finished(state.seq_id, state, now, tail))
            elif state.stream:
                outcomes.append(Delta(state.seq_id, state.output.take_delta(), token))
        return outcomes

    def update_steps(
        self,
        step: Step,
        steps: Sequence[tuple[Sequence[int], Sequence[float]]],
        now: float,
    ) -> list[Outcome]:
        """Apply several steps' tokens, each (tokens, logprobs) aligned with `step.rows`, in
        order: a row whose sequence ended at an earlier one takes no more (its later tokens,
        computed past its end, are dropped), nor does a row whose token is NO_TOKEN (it had
        no more: rows that speculate give different numbers of tokens)."""
        outcomes: list[Outcome] = []
        rows = step.rows
        for j, (tokens, logprobs) in enumerate(steps):
            if j or NO_TOKEN in tokens:
                keep = [
                    i
                    for i, r in enumerate(step.rows)
                    if tokens[i] != NO_TOKEN and (j == 0 or self._runs(r))
                ]
                rows = tuple(step.rows[i] for i in keep)
                tokens = [tokens[i] for i in keep]
                logprobs = [logprobs[i] for i in keep]
            if rows:
                outcomes += self.update(replace(step, rows=rows), tokens, logprobs, now)
        return outcomes

    def _runs(self, row: Row) -> bool:
        """Whether `row`'s sequence still holds its slot (a padding row: its slot still pads)."""
        if row.padding:
            return row.slot in self._padding
        state = self._running.get(row.slot)
        return state is not None and state.seq_id == row.seq_id

    def complete(self, step: Step, now: float) -> list[Finished]:
        """End every row of `step` now: for models that answer a sequence in one step and
        generate no token (a phrase bank's search). Their slots are free at once."""
        finished = []
        size = len(step.rows)
        for row in step.rows:
            if row.padding:
                continue
            state = self._running[row.slot]
            state.first_token_at = now
            state.position += 1
            state.batch_min = state.batch_max = state.batch_total = size
            self._release(state)
            finished.append(Finished(state.seq_id, state, now, ""))
        return finished

    def fail(self, seq_ids: Sequence[int], message: str) -> list[Aborted]:
        """The worker could not run these sequences: they leave, their slots are freed."""
        failed = []
        for seq_id in seq_ids:
            state = self._states.get(seq_id)
            if state is None:
                continue
            stage = "generating" if state.slot is not None else "queued"
            self._release(state)
            failed.append(Aborted(seq_id, AbortReason.FAILED, stage, message))
        return failed

    # ---- bookkeeping -------------------------------------------------------------------

    def _release(self, state: SequenceState) -> None:
        del self._states[state.seq_id]
        if state.slot is not None:
            del self._running[state.slot]
            if self.config.batching == "static" and self._running:
                self._padding[state.slot] = state.position  # the batch runs on without it
            else:
                heapq.heappush(self._free_slots, state.slot)
            state.slot = None
            if not self._running:  # the (static) batch is over: its padding slots are free
                for slot in self._padding:
                    heapq.heappush(self._free_slots, slot)
                self._padding.clear()
        # a waiting entry is removed lazily: its id is no longer in _states
        elif state.admitted_at is None:
            self._num_waiting -= 1

    def _departed(self, state: SequenceState, now: float) -> AbortReason | None:
        if state.cancelled:
            return AbortReason.CANCELLED
        if state.deadline is not None and now >= state.deadline:
            return AbortReason.DEADLINE
        return None

    def _drop_departed(self, now: float) -> list[Aborted]:
        aborted = []
        for state in list(self._running.values()):
            reason = self._departed(state, now)
            if reason is not None:
                self._release(state)
                aborted.append(Aborted(state.seq_id, reason, "generating"))
        if self._num_waiting:
            for state in [s for s in self._states.values() if s.slot is None]:
                reason = self._departed(state, now)
                if reason is not None:
                    self._release(state)
                    aborted.append(Aborted(state.seq_id, reason, "queued"))
        return aborted

    def _pop_waiting(self) -> SequenceState | None:
        while self._waiting:
            _, _, seq_id = heapq.heappop(self._waiting)
            state = self._states.get(seq_id)
            if state is not None and state.slot is None:
                return state
        return None

    def _oldest_arrival(self) -> float:
        return min(s.arrival for s in self._states.values() if s.slot is None)

    def _admit(self, now: float) -> list[SequenceState]:
        if not self._num_waiting or not self._free_slots:
            return []
        if self.config.batching == "static" and self._running:
            return []  # request-level batching: the batch runs to its longest member's end
        if (
            not self._running
            and self.config.max_wait_ms > 0
            and self._num_waiting < len(self._free_slots)
            and now < self._oldest_arrival() + self.config.max_wait_ms / 1e3
        ):
            return []  # an idle model may wait a little for a fuller first batch
        joined = []
        while self._free_slots:
            state = self._pop_waiting()
            if state is None:
                break
            state.slot = heapq.heappop(self._free_slots)
            state.admitted_at = now
            self._running[state.slot] = state
            self._num_waiting -= 1
            joined.append(state)
        return joined
