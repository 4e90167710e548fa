"""One model's engine: a worker thread that owns the model and runs decode steps over a
batch of sequences, and the asyncio side that submits sequences and receives their tokens.

The event loop never touches torch: handlers call `ModelEngine.submit()` and await the
returned `SequenceHandle`; the worker thread delivers deltas and results back with
`loop.call_soon_threadsafe`. Cancellation and deadlines are checked by the worker at every
step, so a sequence whose caller went away leaves its batch within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from retd.model.checkpoint import LoadedModel
from retd.model.generation import (
    FinishReason,
    OutputBuffer,
    SamplingParams,
    make_generator,
    sample,
)
from retd.model.model import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceRequest:
    """One embedding to decode, validated."""

    embedding: np.ndarray  # (embedding_dim,) float32
    params: SamplingParams
    seed: int
    stream: bool = False  # deliver a TokenDelta after every step
    deadline: float | None = None  # time.monotonic() by which it must finish


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]


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


class SequenceError(Exception):
    """A sequence failed; `code` is the gRPC status its caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Event = TokenDelta | SequenceResult | SequenceError


class SequenceHandle:
    """The event-loop side of one submitted sequence."""

    def __init__(self, request: SequenceRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to drop this sequence at its next step (no-op once finished)."""
        self._cancelled.set()

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


@dataclass
class _Running:
    """Worker-side state of one sequence in the running batch."""

    handle: SequenceHandle
    output: OutputBuffer
    generator: torch.Generator | None
    started_at: float = field(default_factory=time.monotonic)


_STOP = object()


class ModelEngine:
    """Serves one loaded model: a queue of sequences in front of one worker thread."""

    def __init__(self, name: str, loaded: LoadedModel, *, max_batch_size: int = 32) -> None:
        self.name = name
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self._device = next(loaded.model.parameters()).device
        self._dtype = next(loaded.model.parameters()).dtype
        self._cache = KVCache(loaded.config, max_batch_size, self._device, self._dtype)
        self._inbox: queue.SimpleQueue[SequenceHandle | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"retd-worker-{name}", daemon=True)
        self._closed = False

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def start(self) -> None:
        self._thread.start()

    def warm_up(self) -> None:
        """Run a short greedy generation so the first caller pays no start-up cost.
        Called before the worker starts, from a thread that is not the event loop's."""
        embedding = np.zeros(self.loaded.config.embedding_dim, dtype=np.float32)
        params = SamplingParams(max_new_tokens=4)
        running = [
            _Running(
                _DiscardHandle(SequenceRequest(embedding, params, 0)),
                OutputBuffer(params, self.loaded.config.eos_id),
                None,
            )
        ]
        self._run_batch(running)

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        if self._closed:
            raise SequenceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        handle = SequenceHandle(request, asyncio.get_running_loop())
        self._inbox.put(handle)
        return handle

    async def close(self) -> None:
        """Finish every sequence already submitted, then stop the worker."""
        self._closed = True
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # ---- the worker thread -------------------------------------------------------------

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        stopping = False
        while not stopping:
            item = self._inbox.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self.max_batch_size:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            running = [self._admit(h) for h in batch if isinstance(h, SequenceHandle)]
            admitted = [r for r in running if r is not None]
            if not admitted:
                continue
            try:
                self._run_batch(admitted)
            except Exception as exc:  # a failed step fails its batch, never the daemon
                log.exception("model %s: batch of %d failed", self.name, len(admitted))
                for r in admitted:
                    r.handle.deliver(
                        SequenceError(grpc.StatusCode.INTERNAL, f"model step failed: {exc}")
                    )

    def _admit(self, handle: SequenceHandle) -> _Running | None:
        """Drop a sequence whose caller left or whose deadline passed while it was queued."""
        failure = _stop_check(handle, time.monotonic(), "queued")
        if failure is not None:
            handle.deliver(failure)
            return None
        request = handle.request
        generator = None if request.params.greedy else make_generator(request.seed, self._device)
        return _Running(handle, OutputBuffer(request.params, self.loaded.config.eos_id), generator)

    def _run_batch(self, batch: list[_Running]) -> None:
        """Decode every sequence of `batch` to its end, one step (one byte each) at a time;
        a sequence leaves the batch as soon as it finishes, fails or is cancelled."""
        model = self.loaded.model
        size = len(batch)
        embeddings = np.stack([r.handle.request.embedding for r in batch])
        cond = model.condition(torch.from_numpy(embeddings).to(self._device, self._dtype))
        slots = torch.arange(size, device=self._device)
        positions = torch.zeros(size, dtype=torch.long, device=self._device)
        tokens = torch.zeros(size, dtype=torch.long, device=self._device)
        started_at = time.monotonic()
        for r in batch:
            r.started_at = started_at
        while batch:
            logits = model.step(cond, tokens, positions, self._cache, slots)
            new_tokens, logprobs = sample(
                logits, [r.handle.request.params for r in batch], [r.generator for r in batch]
            )
            token_list, logprob_list = new_tokens.tolist(), logprobs.tolist()
            now = time.monotonic()
            keep: list[int] = []
            for row, r in enumerate(batch):
                reason = r.output.append(token_list[row], logprob_list[row])
                if reason is not None:
                    r.handle.deliver(self._result(r, now, token_list[row]))
                    continue
                failure = _stop_check(r.handle, now, "generating")
                if failure is not None:
                    r.handle.deliver(failure)
                    continue
                if r.handle.request.stream:
                    r.handle.deliver(TokenDelta(r.output.take_delta(), (token_list[row],)))
                keep.append(row)
            if len(keep) < len(batch):
                index = torch.tensor(keep, dtype=torch.long, device=self._device)
                cond, slots = cond[index], slots[index]
                positions, new_tokens = positions[index], new_tokens[index]
                batch = [batch[row] for row in keep]
            tokens = new_tokens
            positions = positions + 1

    def _result(self, r: _Running, now: float, last_token: int) -> SequenceResult:
        output = r.output
        assert output.finish_reason is not None
        stream = r.handle.request.stream
        return SequenceResult(
            text=output.text(),
            token_ids=tuple(output.token_ids),
            finish_reason=output.finish_reason,
            mean_logprob=output.mean_logprob,
            seed=r.handle.request.seed,
            queue_s=r.started_at - r.handle.submitted_at,
            compute_s=now - r.started_at,
            tail_text=output.take_delta() if stream else "",
            tail_token_ids=(last_token,) if stream else (),
        )


def _stop_check(handle: SequenceHandle, now: float, stage: str) -> SequenceError | None:
    if handle.cancelled:
        return SequenceError(grpc.StatusCode.CANCELLED, f"the call was cancelled while {stage}")
    deadline = handle.request.deadline
    if deadline is not None and now >= deadline:
        return SequenceError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed while {stage}"
        )
    return None


class _DiscardHandle(SequenceHandle):
    """A handle for the warm-up run, which has no caller and no event loop."""

    def __init__(self, request: SequenceRequest) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self._cancelled = threading.Event()
        self._done = False

    def deliver(self, event: Event) -> None:
        pass
