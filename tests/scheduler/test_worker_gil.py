"""The worker's C++ decode call on the CPU hands the GIL to the event loop's thread once: in
the C++ call itself (milliseconds of arithmetic). Every torch op called from Python releases
the GIL too, and under load the event loop's thread takes it and the worker waits to get it
back (~60 us a time at 64 callers on 2 cores, ~17 times a call before this was tested): so
around the call, Python only makes tensors from lists and reads them back into lists."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from retd.model.checkpoint import LoadedModel
from retd.model.generation import SamplingParams
from retd.server import memory as memory_module
from retd.server.engine import SequenceRequest
from retd.server.handles import Event, SequenceHandle, TokenDelta
from retd.server.ret_engine import RETEngine
from retd.server.scheduler import Step
from tests.scheduler._engine import RUN_LIMIT_S, embedding, reference, start_engine

# torch calls that keep the GIL: a tensor made from a Python list, a tensor read into one
KEEPS_GIL = {"tensor", "tolist"}

PARAMS = [
    SamplingParams(30, repetition_penalty=1.5, repetition_ngram_size=2),  # Decode's default
    SamplingParams(30),  # plain greedy: drafts
    SamplingParams(30, no_repeat_ngram_size=3, eos_bias=-3.0),
    SamplingParams(30, temperature=0.9, top_k=40, top_p=0.9, seed=5),
    SamplingParams(30, temperature=1.1, seed=6),
]


class TorchCalls(TorchFunctionMode):
    """The torch functions called from Python (not from C++) while inside, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_an_op() -> None:
    with TorchCalls() as calls:
        torch.tensor([1, 2]).tolist()
        torch.zeros(3)[torch.tensor([0])]
    assert calls.names == ["tensor", "tolist", "zeros", "tensor", "__getitem__"]


def test_a_decode_call_makes_no_torch_op_from_python(
    sharp_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    joined: list[int] = []
    original = RETEngine._decode

    def recording(self: RETEngine, step: Step, joining: Mapping[int, Any]) -> Any:
        with TorchCalls() as mode:
            outcome = original(self, step, joining)
        calls.append(mode.names)
        joined.append(len(joining))
        return outcome

    monkeypatch.setattr(RETEngine, "_decode", recording)

    async def main() -> list[list[int]]:
        # 5 sequences on 3 slots: rows join a running batch as others leave it
        engine = start_engine(sharp_model, "prefix", max_batch_size=3)
        try:
            handles = [
                engine.submit(SequenceRequest(embedding(i), p)) for i, p in enumerate(PARAMS)
            ]
            results = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in handles)), RUN_LIMIT_S
            )
            return [list(r.token_ids) for r in results]
        finally:
            await engine.close()

    tokens = asyncio.run(main())
    for i, (p, got) in enumerate(zip(PARAMS, tokens, strict=True)):
        assert got == reference(sharp_model, i, p, "prefix").token_ids, i
    assert len(calls) > 2 and sum(j > 0 for j in joined) >= 2  # joiners in later calls too
    made = {name for names in calls for name in names}
    assert made <= KEEPS_GIL, f"torch ops from Python around the C++ call: {made - KEEPS_GIL}"


def test_a_steps_events_reach_their_loop_in_one_wake_up() -> None:
    """`SequenceHandle.deliver_all` from the worker thread: each handle gets its events in
    order, and the loop is woken once (each wake-up writes to its socket, a GIL handoff)."""
    loop = asyncio.new_event_loop()
    wakeups: list[threading.Thread] = []  # the thread of each call_soon_threadsafe
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        wakeups.append(threading.current_thread())
        return original(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        handles = [SequenceHandle(loop, lambda seq_id: None) for _ in range(3)]
        sent: list[tuple[SequenceHandle, Event]] = [
            (handles[i % 3], TokenDelta(f"{i}", (i,))) for i in range(10)
        ]

        async def first(handle: SequenceHandle, n: int) -> list[Event]:
            got: list[Event] = []
            async for event in handle.events():
                got.append(event)
                if len(got) == n:
                    break
            return got

        worker = threading.Thread(target=SequenceHandle.deliver_all, args=(sent,))

        async def main() -> list[list[Event]]:
            worker.start()
            counts = [sum(1 for h, _ in sent if h is handle) for handle in handles]
            got = [
                await asyncio.wait_for(first(handle, n), RUN_LIMIT_S)
                for handle, n in zip(handles, counts, strict=True)
            ]
            worker.join()
            return got

        got = loop.run_until_complete(main())
    finally:
        loop.close()
    for i, handle in enumerate(handles):
        assert got[i] == [event for h, event in sent if h is handle]
    assert wakeups.count(worker) == 1


def test_resident_memory_is_read_at_most_every_rss_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading /proc is three system calls, each a GIL handoff: a result carries the figure
    read within the last RSS_MAX_AGE_S."""
    cpu = torch.device("cpu")
    now = time.monotonic()
    monkeypatch.setattr(memory_module, "_rss_read", (now, 12345))
    assert memory_module.sample_memory(cpu).rss_bytes == 12345  # recent: not read again
    monkeypatch.setattr(memory_module, "_rss_read", (now - memory_module.RSS_MAX_AGE_S, 12345))
    fresh = memory_module.sample_memory(cpu).rss_bytes
    assert fresh is not None and fresh > 12345 * 100  # read: a Python process's own RSS
    assert memory_module._rss_read[0] >= now
