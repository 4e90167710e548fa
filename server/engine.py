"""One model's engine: the asyncio side that submits sequences and receives their tokens,
and the worker thread that executes the scheduler's decode steps on the model.

The event loop never touches torch and the worker never decides: handlers call
`Engine.submit()` and await the returned `SequenceHandle` (server/handles.py); the worker
asks the `Scheduler` for a `Step`, runs it (one token for every row), hands the tokens back
to `Scheduler.update()`, and delivers what it returns with `loop.call_soon_threadsafe`.

`Engine` holds what every kind of model shares (the scheduler, the callers' handles, the
worker thread's locking and delivery); `RETEngine` (server/ret_engine.py) runs RET's decode
steps, and `PhraseBankEngine` (server/phrase_bank_engine.py) answers a whole step with one
search.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from retd.model.decoding import OutputBuffer, SamplingParams
from retd.model.tokenizer import BYTES, Tokenizer
from retd.server.config import DecodeDefaults
from retd.server.errors import ErrorKind, ServeError
from retd.server.handles import Event, SequenceHandle, TokenDelta
from retd.server.memory import sample_memory
from retd.server.placement import pin_thread
from retd.server.requests import SearchParams, SequenceRequest
from retd.server.scheduler import (
    Aborted,
    AbortReason,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    Step,
)
from retd.server.validation import DecodeOptions, ModelLimits
from retd.v1 import decoder_pb2 as pb

if TYPE_CHECKING:  # the front end never imports torch: an engine process's parent has none
    import torch

log = logging.getLogger(__name__)


ABORT_KINDS = {
    AbortReason.CANCELLED: ErrorKind.CANCELLED,
    AbortReason.DEADLINE: ErrorKind.DEADLINE,
    AbortReason.FAILED: ErrorKind.INTERNAL,
}


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


class ServingEngine(Protocol):
    """What the servicer, the registry and telemetry use of a loaded model: an `Engine`
    (its worker a thread of this process) or an `EngineProcess` (server/engine_process.py)."""

    name: str
    kind: ClassVar[str]
    description: ModelDescription

    @property
    def device(self) -> object:
        """A torch.device, or its name (str() of either names it)."""

    @property
    def dtype(self) -> object:
        """A torch.dtype, or its name."""

    scheduler_config: SchedulerConfig

    def warm_up(self) -> None: ...
    def start(self) -> None: ...
    def stats(self) -> EngineStats: ...
    def device_memory(self) -> int | None: ...
    def limits(self, max_new_tokens_limit: int = 0) -> ModelLimits: ...
    def submit(self, request: SequenceRequest) -> SequenceHandle: ...
    def cancel(self, seq_id: int) -> None: ...
    async def close(self) -> None: ...

    def build_request(
        self,
        embedding: pb.Embedding,
        field: str,
        options: DecodeOptions,
        defaults: DecodeDefaults,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """A Decode (or an item of a batch or stream) for this model, checked; errors name
        `field`."""

    def build_generate_request(
        self,
        request: pb.GenerateRequest,
        stream: bool,
        deadline: float | None,
        max_new_tokens_limit: int = 0,
    ) -> SequenceRequest:
        """A Generate (or a GenerateStream) for this model, checked."""


def model_limits(name: str, model: ModelDescription, max_new_tokens_limit: int = 0) -> ModelLimits:
    """What model `name` accepts; `max_new_tokens_limit` (the server's, 0: none) caps its
    max_length."""
    encoder = model.encoder or "sentence encoder"
    if 0 < max_new_tokens_limit < model.max_length:
        return ModelLimits(
            name,
            model.embedding_dim,
            max_new_tokens_limit,
            encoder,
            "the server's max_new_tokens_limit",
        )
    return ModelLimits(name, model.embedding_dim, model.max_length, encoder)


class Engine(abc.ABC):
    """Serves one loaded model: a scheduler in front of one worker thread (`_work`, the same
    for every kind). Subclasses serve one kind of model (`kind`): they run a step on it in
    `_run_step` (outside the lock), apply its outcome to the scheduler in `_apply` (under the
    lock), warm it up in `warm_up`, and build its requests as `ServingEngine` says
    (`build_request`, `build_generate_request`)."""

    kind: ClassVar[str]
    params_type: ClassVar[type[SamplingParams | SearchParams]]  # what its requests carry

    def __init__(
        self,
        name: str,
        description: ModelDescription,
        device: torch.device,
        dtype: torch.dtype,
        scheduler_config: SchedulerConfig | None = None,
        eos_id: int = 0,
        tokenizer: Tokenizer = BYTES,
    ) -> None:
        self.name = name
        self.description = description
        self.device, self.dtype = device, dtype
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self._scheduler = Scheduler(self.scheduler_config)
        self._eos_id = eos_id
        self._tokenizer = tokenizer  # turns each generated token into its bytes
        self._handles: dict[int, SequenceHandle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._thread = threading.Thread(target=self._work, name=f"retd-worker-{name}", daemon=True)
        self.worker_cpus: frozenset[int] = frozenset()  # where `_work` runs (empty: anywhere)
        # Set in an engine process (server/engine_process.py): events go to it, not to handles.
        self._sink: Callable[[list[tuple[int, Event]], EngineStats], None] | None = None

    # ---- the event-loop side -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats()

    def _stats(self) -> EngineStats:
        s = self._scheduler
        return EngineStats(s.num_waiting, s.num_running, s.free_slots)

    def device_memory(self) -> int | None:
        """Bytes of device memory allocated now (None on the CPU)."""
        return sample_memory(self.device).device_allocated_bytes

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        """Queue a sequence; raises ServeError (EXHAUSTED when the queue is full, UNAVAILABLE
        when shutting down)."""
        handle = SequenceHandle(asyncio.get_running_loop(), self.cancel)
        with self._lock:
            handle.seq_id = next(self._ids)
            self._enqueue(handle.seq_id, request)
            self._handles[handle.seq_id] = handle
        return handle

    def enqueue(self, seq_id: int, request: SequenceRequest) -> None:
        """`submit` for a caller that keeps its own handles (an engine process's parent):
        the sequence's events go to the sink under `seq_id`."""
        with self._lock:
            self._enqueue(seq_id, request)

    def _enqueue(self, seq_id: int, request: SequenceRequest) -> None:
        """Under the lock: hand a sequence to the scheduler and wake the worker."""
        params = request.params
        if not isinstance(params, self.params_type):
            raise TypeError(f"a {self.kind} takes {self.params_type.__name__}, not {params!r}")
        if self._closing:
            raise ServeError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        output = (
            None
            if isinstance(params, SearchParams)
            else OutputBuffer(params, self._eos_id, self._tokenizer)
        )
        state = SequenceState(seq_id, request, output, arrival=time.monotonic())
        try:
            self._scheduler.add(state)
        except QueueFullError as exc:
            raise ServeError(ErrorKind.EXHAUSTED, f"model {self.name!r}: {exc}") from None
        self._wakeup.notify()

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._scheduler.cancel(seq_id)
            self._wakeup.notify()

    async def close(self) -> None:
        """Finish every sequence already accepted, then stop the worker."""
        await asyncio.to_thread(self.close_and_join)

    def close_and_join(self) -> None:
        """`close`, blocking (an engine process's main thread)."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    # ---- requests ------------------------------------------------------------------------

    def limits(self, max_new_tokens_limit: int = 0) -> ModelLimits:
        """What this model accepts; `max_new_tokens_limit` (the server's, 0: none) caps its
        max_length."""
        return model_limits(self.name, self.description, max_new_tokens_limit)

    # ---- the worker thread -------------------------------------------------------------

    @abc.abstractmethod
    def warm_up(self) -> None:
        """Run the model once so the first caller pays no start-up cost; call it before
        `start()`."""

    def _work(self) -> None:
        """The worker thread, until closing and drained: take a step under the lock, run it
        outside the lock (a failure fails only its rows; the worker never dies), then under
        the lock apply its outcome to the scheduler and hand the events to their callers."""
        import torch

        torch.set_grad_enabled(False)
        pin_thread(self.worker_cpus)  # its torch threads, started from it, inherit the CPUs
        while True:
            with self._lock:
                step = self._next_step()
                if step is None:
                    return
            try:
                outcome, failures = self._run_step(step)
            except Exception as exc:
                log.exception("model %s: step failed", self.name)
                outcome, failures = None, {r.seq_id: str(exc) for r in step.rows}
            now = time.monotonic()
            with self._lock:
                events: list[tuple[int, Event]] = []
                for seq_id, message in failures.items():
                    events += self._abort_events(self._scheduler.fail([seq_id], message))
                done = replace(step, rows=tuple(r for r in step.rows if r.seq_id not in failures))
                events += self._apply(done, outcome, now)
                self._deliver(events)

    @abc.abstractmethod
    def _run_step(self, step: Step) -> tuple[Any, dict[int, str]]:
        """Outside the lock: run `step` on the model (its joiners' requests come with it, in
        `step.new`); its outcome for `_apply`, and the messages of the rows that failed."""

    @abc.abstractmethod
    def _apply(self, step: Step, outcome: Any, now: float) -> list[tuple[int, Event]]:
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
            events.append((a.seq_id, ServeError(ABORT_KINDS[a.reason], message)))
        return events

    def _deliver(self, events: Sequence[tuple[int, Event]]) -> None:
        """Under the lock: hand events to their callers (or to the sink); a sequence's last
        event forgets it."""
        if self._sink is not None:
            for seq_id, event in events:
                if not isinstance(event, TokenDelta):
                    self._forget(seq_id)
            if events:
                self._sink(list(events), self._stats())
            return
        handed: list[tuple[SequenceHandle, Event]] = []
        for seq_id, event in events:
            handle = self._handles.get(seq_id)
            if handle is None:
                continue
            if not isinstance(event, TokenDelta):
                del self._handles[seq_id]
                self._forget(seq_id)
            handed.append((handle, event))
        if handed:
            SequenceHandle.deliver_all(handed)

    def _forget(self, seq_id: int) -> None:  # noqa: B027 (a hook; most kinds keep nothing)
        """Under the lock: drop what the worker kept of a sequence that is over."""
