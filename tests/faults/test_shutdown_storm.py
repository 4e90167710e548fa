"""SIGTERM / SIGINT under load: a real daemon (a `python -m retd.server` subprocess on
127.0.0.1) gets the signal while 64 callers on a real channel keep sending Decodes. The
shutdown gate's hold of its last refusals is also tested alone. (The other storms:
test_storms.py.)"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from retd.server.gate import CallGate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server
from tests.faults.conftest import (
    EMBEDDING_COUNT,
    Reference,
    embedding,
)

# ---- SIGTERM / SIGINT under load -------------------------------------------------------

CALLERS = 64
ACCEPTED_BEFORE_SIGNAL = 200
GRACE_PERIOD_S = 10.0
SHUTDOWN_TOKENS = 64
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Call:
    caller: int
    index: int
    issued: float
    ended: float
    code: grpc.StatusCode
    text: str | None
    details: str


@dataclass(frozen=True)
class ShutdownRun:
    signal_name: str
    calls: list[Call]
    signalled_at: float
    exited_at: float
    exit_code: int
    expected: dict[int, str]
    log: str

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for call in self.calls:
            codes[call.code.name] = codes.get(call.code.name, 0) + 1
        in_flight = [c for c in self.calls if c.issued < self.signalled_at < c.ended]
        return (
            f"{self.signal_name}: calls {codes}, {len(in_flight)} in flight at the signal, "
            f"exit {self.exit_code} {self.exited_at - self.signalled_at:.2f}s after it"
        )


@pytest.fixture(scope="module", params=[signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def shutdown_run(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    checkpoint: Path,
    reference: Reference,
) -> ShutdownRun:
    """64 callers on one channel send Decodes; after 200 answers the daemon gets the signal;
    the callers keep calling through the drain until they are refused after its exit."""
    signum = request.param
    server = start_server(
        tmp_path_factory.mktemp("shutdown"),
        ["--checkpoint", str(checkpoint), "--grace-period", str(GRACE_PERIOD_S)],
    )
    expected = {i: reference(i, SHUTDOWN_TOKENS) for i in range(EMBEDDING_COUNT)}
    requests = {
        i: pb.DecodeRequest(embedding=embedding(i), max_new_tokens=SHUTDOWN_TOKENS)
        for i in range(EMBEDDING_COUNT)
    }
    calls: list[Call] = []
    lock = threading.Lock()
    accepted = 0
    enough = threading.Event()
    exited = threading.Event()
    give_up = time.monotonic() + 90  # every caller stops by itself

    def caller(number: int, stub: pb_grpc.DecoderStub) -> None:
        nonlocal accepted
        index = number % EMBEDDING_COUNT
        refused_after_exit = 0
        while refused_after_exit < 2 and time.monotonic() < give_up:
            after_exit = exited.is_set()
            issued = time.monotonic()
            try:
                text: str | None = stub.Decode(requests[index], timeout=30).text
                code, details = OK, ""
            except grpc.RpcError as error:
                text, code, details = None, error.code(), error.details() or ""
            call = Call(number, index, issued, time.monotonic(), code, text, details)
            with lock:
                calls.append(call)
                if code == OK:
                    accepted += 1
                    if accepted >= ACCEPTED_BEFORE_SIGNAL:
                        enough.set()
            if after_exit:
                refused_after_exit += 1

    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            threads = [
                threading.Thread(target=caller, args=(n, stub), daemon=True) for n in range(CALLERS)
            ]
            for thread in threads:
                thread.start()
            assert enough.wait(60), f"only {accepted} calls completed in 60s"
            signalled_at = time.monotonic()
            server.process.send_signal(signum)
            try:
                exit_code = server.process.wait(timeout=GRACE_PERIOD_S)
            finally:
                exited_at = time.monotonic()
                exited.set()
            for thread in threads:
                thread.join(timeout=max(1.0, give_up - time.monotonic()))
            assert not any(t.is_alive() for t in threads), "a caller did not finish"
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)
    with lock:
        recorded = list(calls)
    name = signal.Signals(signum).name
    return ShutdownRun(name, recorded, signalled_at, exited_at, exit_code, expected, server.log())


def test_signal_drains_accepted_calls_and_exits_0(shutdown_run: ShutdownRun) -> None:
    run = shutdown_run
    print(run.summary())
    assert run.exit_code == 0, run.log[-5000:]
    assert run.exited_at - run.signalled_at < GRACE_PERIOD_S
    ok = [c for c in run.calls if c.code == OK]
    wrong = [c for c in ok if c.text != run.expected[c.index]]
    assert not wrong, wrong[:5]
    assert len(ok) >= ACCEPTED_BEFORE_SIGNAL
    # Calls in flight when the signal came finished with their full, correct text.
    drained = [c for c in ok if c.issued < run.signalled_at < c.ended]
    assert drained, "no call was in flight at the signal: nothing was drained"
    # Once a call was refused, the daemon accepts nothing any more.
    refused = [c for c in run.calls if c.code == UNAVAILABLE]
    assert refused, "no call was refused after the signal"
    assert all(c.ended >= run.signalled_at for c in refused), "refused before the signal"
    first_refusal = min(c.ended for c in refused)
    accepted_later = [c for c in ok if c.issued > first_refusal]
    assert not accepted_later, accepted_later[:5]
    # The gate itself refused calls during the drain (not only the closed port afterwards).
    assert any("shutting down" in c.details for c in refused), run.summary()
    # Every caller ended refused: none was stuck or still being served.
    last = {c.caller: c for c in sorted(run.calls, key=lambda c: c.ended)}
    assert len(last) == CALLERS
    assert all(c.code == UNAVAILABLE for c in last.values())


def test_signal_loses_no_call_every_call_is_answered_or_refused(
    shutdown_run: ShutdownRun,
) -> None:
    """Not one CANCELLED: stopping grpc cancels the calls it accepted but had not handed to
    a handler, so the daemon holds its last refusals until every caller waits on one (see
    `CallGate.quiesce`); before that, each caller lost about one call here."""
    run = shutdown_run
    lost = [c for c in run.calls if c.code not in (OK, UNAVAILABLE)]
    assert not lost, [
        (c.code.name, c.details, f"issued {c.issued - run.signalled_at:+.4f}s after the signal")
        for c in lost[:5]
    ] + [run.summary()]


def test_the_gate_holds_its_last_refusals_until_released() -> None:
    """The hold alone, on one event loop (its timers fire in order: no race with a clock)."""

    async def scenario() -> None:
        gate = CallGate()
        assert gate.enter()
        draining = asyncio.create_task(gate.close(timeout=5))
        await asyncio.sleep(0)
        assert not gate.enter()
        await gate.refuse(None)  # while draining, a refusal is answered at once
        gate.exit()
        assert await draining
        quiet = asyncio.create_task(gate.quiesce(limit=5, quiet=0.05))
        await asyncio.sleep(0)
        assert not gate.enter()
        held = asyncio.create_task(gate.refuse(None))
        near_deadline = asyncio.create_task(gate.refuse(0.06))  # answered 50 ms before it
        # Its 10 ms timer fires before the quiet period's 50 ms one, and the held refusal
        # waits for release(): the first of the three to end must be near_deadline.
        first, _ = await asyncio.wait(
            {near_deadline, held, quiet}, timeout=5, return_when=asyncio.FIRST_COMPLETED
        )
        assert first == {near_deadline} and not held.done()
        assert await quiet  # no call for 50 ms
        assert not held.done() and gate.held == 1
        gate.release()
        await asyncio.wait_for(held, 5)
        assert gate.held == 0
        assert not gate.enter()
        await asyncio.wait_for(gate.refuse(None), 5)  # after the release: at once again

    asyncio.run(scenario())


def test_the_gate_stops_holding_at_its_limit_when_calls_keep_coming() -> None:
    async def scenario() -> None:
        gate = CallGate()
        assert await gate.close(timeout=5)
        calling = True

        async def caller() -> None:
            while calling:
                gate.enter()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(caller())
        await asyncio.sleep(0)  # the first call arrives
        assert not await gate.quiesce(limit=0.2, quiet=0.05)
        calling = False
        await task
        gate.release()

    asyncio.run(scenario())
