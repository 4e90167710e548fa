"""One model's engine: the asyncio side that submits sequences and receives their tokens,
and the worker thread that executes the scheduler's decode steps on the model.

The event loop never touches torch and the worker never decides: handlers call
`Engine.submit()` and await the returned `SequenceHandle`; the worker asks the `Scheduler`
for a `Step`, runs it (one token for every row), hands the tokens back to
`Scheduler.update()`, and delivers what it returns with `loop.call_soon_threadsafe`.

`Engine` holds what every kind of model shares (the scheduler, the callers' handles, the
worker thread's locking and delivery); `RETEngine` runs RET's decode steps, and
`PhraseBankEngine` (server/phrase_bank_engine.py) answers a whole step with one search.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import grpc
import numpy as np
import torch

from retd.model.checkpoint import RET_KIND, LoadedModel
from retd.model.generation import (
    FinishReason,
    NGramBlocker,
    OutputBuffer,
    RepetitionTracker,
    SamplingParams,
)
from retd.model.model import KVCache
from retd.model.sampling import Sampler
from retd.server.scheduler import (
    Aborted,
    AbortReason,
    Delta,
    Finished,
    QueueFullError,
    Row,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    Step,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceRequest:
    """One embedding to decode, validated."""

    embedding: np.ndarray  # (embedding_dim,) float32
    params: SamplingParams
    seed: int
    stream: bool = False  # deliver a TokenDelta after every step
    deadline: float | None = None  # time.monotonic() by which it must finish
    priority: int = 0  # higher is served first; FIFO among equals
    candidates: int = 1  # a phrase bank returns this many nearest phrases


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """One of a phrase bank's nearest phrases."""

    text: str
    score: float  # cosine similarity to the query
    index: int  # the phrase's row in the bank


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


@dataclass(frozen=True)
class MemorySample:
    """Memory when a sequence finished: device memory on CUDA (allocated now, and the peak
    since the process started), resident memory of the process on the CPU."""

    device_allocated_bytes: int | None = None
    device_peak_bytes: int | None = None
    rss_bytes: int | None = None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def sample_memory(device: torch.device) -> MemorySample:
    """Cheap: host-side counters only, no device sync."""
    if device.type == "cuda":
        return MemorySample(
            device_allocated_bytes=torch.cuda.memory_allocated(device),
            device_peak_bytes=torch.cuda.max_memory_allocated(device),
        )
    try:
        with open("/proc/self/statm", "rb") as statm:
            return MemorySample(rss_bytes=int(statm.read().split()[1]) * _PAGE_SIZE)
    except OSError:  # not Linux
        return MemorySample()


class SequenceError(Exception):
    """A sequence failed; `code` is the gRPC status its caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Event = TokenDelta | SequenceResult | SequenceError

ABORT_CODES = {
    AbortReason.CANCELLED: grpc.StatusCode.CANCELLED,
    AbortReason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    AbortReason.FAILED: grpc.StatusCode.INTERNAL,
}


class SequenceHandle:
    """The event-loop side of one submitted sequence."""

    def __init__(
        self, request: SequenceRequest, loop: asyncio.AbstractEventLoop, engine: Engine
    ) -> None:
        self.request = request
        self.seq_id = -1
        self._loop = loop
        self._engine = engine
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def cancel(self) -> None:
        """The caller left: the sequence leaves its batch at the next step (no-op once done)."""
        if not self._done:
            self._engine.cancel(self.seq_id)

    def deliver(self, event: Event) -> None:
        """Called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[TokenDelta | SequenceResult]:
        """Deltas (streams only), then the result; a failure raises SequenceError."""
        while not self._done:
            event = await self._events.get()
            if isinstance(event, SequenceError):
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


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    free_slots: int


@dataclass(frozen=True)
class ModelDescription:
    """What callers are told of a model (ModelInfo) and what its requests are checked
    against, whatever its kind."""

    architecture: str
    version: str
    card: dict[str, object]
    sha256: str  # of the checkpoint's weights (a bank's embeddings)
    trained: bool
    encoder: str  # the sentence encoder whose embeddings it decodes
    embedding_dim: int
    vocab_size: int
    max_length: int  # the most bytes one answer can have
    parameter_count: int
    phrase_count: int = 0


class Engine(abc.ABC):
    """Serves one loaded model: a scheduler in front of one worker thread (`_work`, the same
    for every kind). Subclasses serve one kind of model (`kind`): they run a step on it in
    `_run_step` (outside the lock), apply its outcome to the scheduler in `_apply` (under the
    lock), and warm it up in `warm_up`."""

    kind: ClassVar[str]

    def __init__(
        self,
        name: str,
        description: ModelDescription,
        device: torch.device,
        dtype: torch.dtype,
        scheduler_config: SchedulerConfig | None = None,
        eos_id: int = 0,
    ) -> None:
        self.name = name
        self.description = description
        self.device, self.dtype = device, dtype
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self._scheduler = Scheduler(self.scheduler_config)
        self._eos_id = eos_id
        self._handles: dict[int, SequenceHandle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=f"retd-worker-{name}", daemon=True)

    # ---- the event-loop side -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._scheduler
            return EngineStats(s.num_waiting, s.num_running, s.free_slots)

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        """Queue a sequence; raises SequenceError (RESOURCE_EXHAUSTED when the queue is full,
        UNAVAILABLE when shutting down)."""
        handle = SequenceHandle(request, asyncio.get_running_loop(), self)
        output = OutputBuffer(request.params, self._eos_id)
        with self._lock:
            if self._closing:
                raise SequenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            handle.seq_id = next(self._ids)
            state = SequenceState(
                handle.seq_id,
                request.params,
                output,
                arrival=time.monotonic(),
                priority=request.priority,
                deadline=request.deadline,
                stream=request.stream,
            )
            try:
                self._scheduler.add(state)
            except QueueFullError as exc:
                raise SequenceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {self.name!r}: {exc}"
                ) from None
            self._handles[handle.seq_id] = handle
            self._wakeup.notify()
        return handle

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._scheduler.cancel(seq_id)
            self._wakeup.notify()

    async def close(self) -> None:
        """Finish every sequence already accepted, then stop the worker."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # ---- the worker thread -------------------------------------------------------------

    @abc.abstractmethod
    def warm_up(self) -> None:
        """Run the model once so the first caller pays no start-up cost; call it before
        `start()`."""

    def _work(self) -> None:
        """The worker thread, until closing and drained: take a step under the lock, run it
        outside the lock (a failure fails only its rows; the worker never dies), then under
        the lock apply its outcome to the scheduler and hand the events to their callers."""
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                step = self._next_step()
                if step is None:
                    return
                # (a static batch's padding rows have answered already: no handle, no request)
                requests = {
                    r.seq_id: handle.request
                    for r in step.rows
                    if (handle := self._handles.get(r.seq_id)) is not None
                }
            try:
                outcome, failures = self._run_step(step, requests)
            except Exception as exc:
                log.exception("model %s: step failed", self.name)
                outcome, failures = None, {r.seq_id: str(exc) for r in step.rows}
            now = time.monotonic()
            with self._lock:
                events: list[tuple[int, Event]] = []
                for seq_id, message in failures.items():
                    events += self._abort_events(self._scheduler.fail([seq_id], message))
                done = replace(step, rows=tuple(r for r in step.rows if r.seq_id not in failures))
                events += self._apply(done, requests, outcome, now)
                self._deliver(events)

    @abc.abstractmethod
    def _run_step(
        self, step: Step, requests: Mapping[int, SequenceRequest]
    ) -> tuple[Any, dict[int, str]]:
        """Outside the lock: run `step` on the model (`requests`: its rows' requests by
        sequence id); its outcome for `_apply`, and the messages of the rows that failed."""

    @abc.abstractmethod
    def _apply(
        self, step: Step, requests: Mapping[int, SequenceRequest], outcome: Any, now: float
    ) -> list[tuple[int, Event]]:
        """Under the lock: the scheduler takes the outcome of `step` (its failed rows
        removed; `outcome` is None when the whole step failed); the events for the callers."""

    def _next_step(self) -> Step | None:
        """Under the lock: the next step with rows, or None once closing and drained."""
        while True:
            step = self._scheduler.schedule(time.monotonic())
            self._deliver(self._abort_events(step.aborted))
            if not step.empty:
                return step
            if self._closing and not self._scheduler.has_work():
                return None
            timeout = None if step.wake_at is None else max(0.0, step.wake_at - time.monotonic())
            self._wakeup.wait(timeout)

    def _abort_events(self, aborted: Sequence[Aborted]) -> list[tuple[int, Event]]:
        events: list[tuple[int, Event]] = []
        for a in aborted:
            if a.reason is AbortReason.FAILED:
                message = a.message
            elif a.reason is AbortReason.DEADLINE:
                message = f"the deadline passed while {a.stage}"
            else:
                message = f"the call was cancelled while {a.stage}"
            events.append((a.seq_id, SequenceError(ABORT_CODES[a.reason], message)))
        return events

    def _deliver(self, events: Sequence[tuple[int, Event]]) -> None:
        """Under the lock: hand events to their callers; a sequence's last event forgets it."""
        for seq_id, event in events:
            handle = self._handles.get(seq_id)
            if handle is None:
                continue
            if not isinstance(event, TokenDelta):
                del self._handles[seq_id]
                self._forget(seq_id)
            handle.deliver(event)

    def _forget(self, seq_id: int) -> None:  # noqa: B027 (a hook; most kinds keep nothing)
        """Under the lock: drop what the worker kept of a sequence that is over."""


class RETEngine(Engine):
    """Serves a RET model: continuous batching of decode steps over KV-cache slots."""

    kind = RET_KIND

    def __init__(
        self, name: str, loaded: LoadedModel, scheduler_config: SchedulerConfig | None = None
    ) -> None:
        parameter = next(loaded.model.parameters())
        config = loaded.config
        description = ModelDescription(
            architecture=loaded.architecture,
            version=loaded.version,
            card=loaded.card,
            sha256=loaded.sha256,
            trained=loaded.trained,
            encoder=str(loaded.card.get("encoder", {}).get("name", "")),
            embedding_dim=config.embedding_dim,
            vocab_size=config.vocab_size,
            max_length=config.max_length,
            parameter_count=sum(p.numel() for p in loaded.model.parameters()),  # tied once
        )
        super().__init__(
            name, description, parameter.device, parameter.dtype, scheduler_config, config.eos_id
        )
        self.loaded = loaded
        slots = self.scheduler_config.max_batch_size
        self._cache = KVCache(config, slots, self.device, self.dtype)
        self._cond = torch.zeros(slots, config.n_embd, device=self.device, dtype=self.dtype)
        # Worker thread only: the sampling tensors of the last step's rows. A sampled row's
        # draws hash its seed and position, so no generator state is kept per sequence.
        self._sampler = Sampler()
        self._blockers: dict[int, NGramBlocker] = {}  # worker thread only: no-repeat n-grams
        # Worker thread only: the bytes each slot's repetition penalty applies to.
        self._repeats = RepetitionTracker(slots, config.vocab_size, self.device)
        self._penalized: set[int] = set()  # seq_ids whose repetition penalty is on

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        """`Engine.submit`; a sampled sequence draws with its request's seed."""
        params = request.params
        if not params.greedy and params.seed != request.seed:
            request = replace(request, params=replace(params, seed=request.seed))
        return super().submit(request)

    def warm_up(self, steps: int = 4) -> None:
        """Run a few decode steps so the first caller pays no start-up cost; call it before
        `start()`."""
        config = self.loaded.config
        params = SamplingParams(max_new_tokens=steps)
        request = SequenceRequest(np.zeros(config.embedding_dim, dtype=np.float32), params, 0)
        for position in range(steps):
            step = Step((Row(-1, 0, position, 0, params),), (-1,) if position == 0 else (), ())
            _, _, failures = self._execute_isolating_faults(
                step, {-1: request} if position == 0 else {}
            )
            if failures:
                raise RuntimeError(f"model {self.name}: warm-up failed: {failures[-1]}")
        self._blockers.clear()
        self._penalized.clear()

    def _run_step(
        self, step: Step, requests: Mapping[int, SequenceRequest]
    ) -> tuple[tuple[list[int], list[float]], dict[int, str]]:
        joining = {i: requests[i] for i in step.joined}
        tokens, logprobs, failures = self._execute_isolating_faults(step, joining)
        return (tokens, logprobs), failures

    def _apply(
        self,
        step: Step,
        requests: Mapping[int, SequenceRequest],
        outcome: tuple[list[int], list[float]] | None,
        now: float,
    ) -> list[tuple[int, Event]]:
        tokens, logprobs = outcome or ([], [])
        events: list[tuple[int, Event]] = []
        memory = None
        for done in self._scheduler.update(step, tokens, logprobs, now):
            if isinstance(done, Delta):
                events.append((done.seq_id, TokenDelta(done.text, (done.token,))))
            else:
                memory = memory or sample_memory(self.device)  # once per step at most
                events.append((done.seq_id, self._result(done, memory)))
        return events

    def _execute_isolating_faults(
        self, step: Step, joining: Mapping[int, SequenceRequest]
    ) -> tuple[list[int], list[float], dict[int, str]]:
        """Run the step: a token and its log-probability for every row that did not fail,
        and the failed rows' messages, so one bad sequence (or an out-of-memory batch)
        never fails the rest."""
        for seq_id, request in joining.items():
            if request.params.no_repeat_ngram_size:
                self._blockers[seq_id] = NGramBlocker(request.params.no_repeat_ngram_size)
            if request.params.penalizes:
                self._penalized.add(seq_id)
        pushed: list[Row] = []
        for row in step.rows:  # each row's last byte, seen once per step
            if row.seq_id in joining and row.seq_id in self._penalized:
                self._repeats.reset(row.slot, row.params)
            if row.position == 0 or row.padding:
                continue
            blocker = self._blockers.get(row.seq_id)
            if blocker is not None:
                blocker.push(row.token)
            if row.seq_id in self._penalized:
                pushed.append(row)
        if pushed:
            self._repeats.push([r.slot for r in pushed], [r.token for r in pushed])
        rows, logits, failures = self._forward_isolating_faults(step.rows, joining)
        if not rows:
            return [], [], failures
        params = [r.params for r in rows]
        positions = [r.position for r in rows]  # each row's draw counter
        banned = [b.banned() if (b := self._blockers.get(r.seq_id)) else () for r in rows]
        repeated = None
        if any(r.seq_id in self._penalized for r in rows):
            repeated = self._repeats.repeated([r.slot for r in rows])
        try:
            sampled, logprob_tensor = self._sampler(logits, params, positions, banned, repeated)
            drawn, drawn_logprobs = sampled.tolist(), logprob_tensor.tolist()
        except Exception as exc:  # draws depend on (seed, position) only: retry row by row
            log.warning(
                "model %s: sampling %d rows failed (%r); row by row", self.name, len(rows), exc
            )
            drawn, drawn_logprobs = [], []
            for i, row in enumerate(rows):
                try:
                    token, logprob = self._sampler(
                        logits[i : i + 1],
                        [row.params],
                        positions[i : i + 1],
                        [banned[i]],
                        None if repeated is None else repeated[i : i + 1],
                    )
                    drawn.append(int(token[0]))
                    drawn_logprobs.append(float(logprob[0]))
                except Exception as row_exc:
                    failures[row.seq_id] = f"sampling failed: {row_exc}"
                    drawn.append(-1)
                    drawn_logprobs.append(float("nan"))
        tokens: list[int] = []
        logprobs: list[float] = []
        for row, token, logprob in zip(rows, drawn, drawn_logprobs, strict=True):
            if token >= 0:
                tokens.append(token)
                logprobs.append(logprob)
            elif row.seq_id not in failures:
                failures[row.seq_id] = (
                    "sampling failed: no token can be drawn (NaN logits or every token banned)"
                )
        return tokens, logprobs, failures

    def _forward_isolating_faults(
        self, rows: tuple[Row, ...], joining: Mapping[int, SequenceRequest]
    ) -> tuple[tuple[Row, ...], torch.Tensor, dict[int, str]]:
        """The model's logits for `rows`; if the step raises, its halves are run to find the
        rows that fail. Returns the rows that succeeded, their logits, and the failures."""
        try:
            return rows, self._forward(rows, joining), {}
        except Exception as exc:
            if len(rows) == 1:
                log.warning("model %s: sequence %d failed: %r", self.name, rows[0].seq_id, exc)
                return (), torch.empty(0), {rows[0].seq_id: f"model step failed: {exc}"}
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            log.warning(
                "model %s: a step of %d failed (%r); retrying in halves", self.name, len(rows), exc
            )
        half = len(rows) // 2
        ok_rows: tuple[Row, ...] = ()
        parts: list[torch.Tensor] = []
        failures: dict[int, str] = {}
        for part in (rows[:half], rows[half:]):
            part_rows, logits, part_failures = self._forward_isolating_faults(part, joining)
            ok_rows += part_rows
            if part_rows:
                parts.append(logits)
            failures.update(part_failures)
        return ok_rows, torch.cat(parts) if parts else torch.empty(0), failures

    def _forward(
        self, rows: tuple[Row, ...], joining: Mapping[int, SequenceRequest]
    ) -> torch.Tensor:
        """One decode step on the model: next-byte logits (len(rows), V). `joining` holds the
        requests of the sequences whose first step this is (their input is the prefix)."""
        model, device = self.loaded.model, self.device
        joined = [r for r in rows if r.seq_id in joining]
        if joined:
            batch = np.stack([joining[r.seq_id].embedding for r in joined])
            joined_slots = torch.tensor([r.slot for r in joined], device=device)
            self._cond[joined_slots] = model.condition(
                torch.from_numpy(batch).to(device, self.dtype)
            )
        slots = torch.tensor([r.slot for r in rows], device=device)
        positions = torch.tensor([r.position for r in rows], device=device)
        tokens = torch.tensor([r.token for r in rows], device=device)
        length = max(r.position for r in rows) + 1
        span = max(r.slot for r in rows) + 1
        return model.step(self._cond[slots], tokens, positions, self._cache, slots, length, span)

    def _result(self, finished: Finished, memory: MemorySample) -> SequenceResult:
        state = finished.state
        output = state.output
        assert output.finish_reason is not None and state.admitted_at is not None
        assert state.first_token_at is not None
        request = self._handles[state.seq_id].request
        return SequenceResult(
            text=output.text(),
            token_ids=tuple(output.token_ids),
            finish_reason=output.finish_reason,
            mean_logprob=output.mean_logprob,
            seed=request.seed,
            queue_s=state.admitted_at - state.arrival,
            compute_s=finished.finished_at - state.admitted_at,
            tail_text=finished.tail_text,
            tail_token_ids=(output.token_ids[-1],) if state.stream else (),
            submitted_at=state.arrival,
            first_token_s=state.first_token_at - state.arrival,
            batch_min=state.batch_min,
            batch_max=state.batch_max,
            batch_mean=state.batch_mean,
            memory=memory,
        )

    def _forget(self, seq_id: int) -> None:
        self._blockers.pop(seq_id, None)
        self._penalized.discard(seq_id)
