"""Storms against a real daemon: clients killed mid-call, deadlines shorter than the work,
SIGTERM / SIGINT under load, identical concurrent requests.

Every daemon is a `python -m retd.server` subprocess on 127.0.0.1; every client is a real
channel (and, for the disconnect storm, a real client process killed with SIGKILL). The
shutdown gate's hold of its last refusals is also tested alone."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from retd.server.gate import CallGate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import REPO, RunningServer, start_server
from tests.faults.conftest import (
    EMBEDDING_COUNT,
    Reference,
    assert_serving_correctly,
    embedding,
    embedding_values,
    load,
    wait_idle,
)

# ---- disconnect storm ------------------------------------------------------------------

# A client process: the stock generated stub, a unary Generate pair, a GenerateStream and a
# DecodeStream whose request side stays open; prints "started" (at once, or after the first
# chunk of each stream), then waits to be killed. Everything in it is bounded by timeouts,
# so a client nobody kills still ends by itself.
CLIENT = """
import json, sys, threading
import grpc
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

address, path, seed, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(path) as f:
    emb = pb.Embedding(vector=pb.FloatVector(values=json.load(f)))
channel = grpc.insecure_channel(address)
grpc.channel_ready_future(channel).result(timeout=30)
stub = pb_grpc.DecoderStub(channel)
hold = threading.Event()
unary = [
    stub.Generate.future(
        pb.GenerateRequest(embedding=emb, max_new_tokens=256, seed=seed + i), timeout=60
    )
    for i in range(2)
]
stream = stub.GenerateStream(
    pb.GenerateRequest(embedding=emb, max_new_tokens=256, seed=seed), timeout=60
)

def items():
    yield pb.DecodeStreamRequest(id="short", embedding=emb, max_new_tokens=8)
    yield pb.DecodeStreamRequest(id="long", embedding=emb, max_new_tokens=256)
    hold.wait(60)  # the request side stays open until the kill (bounded)

decode_stream = stub.DecodeStream(items(), timeout=60)
if mode == "chunk":
    next(stream)
    next(decode_stream)
print("started", flush=True)
hold.wait(60)
"""

STORM_PROCESSES = 24
STORM_PARALLEL = 8


@dataclass
class Kill:
    printed: str
    load_at_kill: pb.ModelLoad | None
    returncode: int | None
    stderr: str


def _run_and_kill(server: RunningServer, inputs: Path, index: int, tmp_path: Path) -> Kill:
    mode = "chunk" if index % 2 else "early"
    stderr_path = tmp_path / f"client-{index}.err"
    with stderr_path.open("wb") as stderr:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, server.address, str(inputs), str(index), mode],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
        )
    assert client.stdout is not None
    printed = client.stdout.readline().decode().strip()  # bounded: the client times out
    snapshot = None
    if printed == "started":
        snapshot = load(server.address)
    client.send_signal(signal.SIGKILL)
    returncode = client.wait(timeout=30)
    client.stdout.close()
    return Kill(printed, snapshot, returncode, stderr_path.read_text(errors="replace"))


def test_disconnect_storm_leaves_the_daemon_idle_and_correct(
    tmp_path: Path, checkpoint: Path, reference: Reference
) -> None:
    # Few slots, so the killed clients' sequences are both queued and running.
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--max-batch-size", "4", "--grace-period", "10",
         "--access-log", "on"],
    )  # fmt: skip
    try:
        inputs = tmp_path / "embedding.json"
        inputs.write_text(json.dumps(embedding_values(1)))
        with ThreadPoolExecutor(STORM_PARALLEL) as pool:
            kills = list(
                pool.map(
                    lambda i: _run_and_kill(server, inputs, i, tmp_path), range(STORM_PROCESSES)
                )
            )
        for kill in kills:
            assert kill.printed == "started", kill.stderr
            assert kill.returncode == -signal.SIGKILL, kill.stderr
        busy = [k for k in kills if k.load_at_kill and k.load_at_kill.running]
        assert busy, "no client was killed while the daemon had work: the storm tested nothing"
        assert server.process.poll() is None, server.log()[-5000:]
        idle = wait_idle(server.address)
        assert (idle.waiting, idle.running) == (0, 0)
        # The daemon noticed the departures (access log lines of cancelled calls).
        assert " CANCELLED " in server.log(), server.log()[-5000:]
        assert_serving_correctly(server, reference)
        with server.channel() as channel:
            request = pb.DecodeRequest(embedding=embedding(1), max_new_tokens=256)
            text = pb_grpc.DecoderStub(channel).Decode(request, timeout=30).text
        assert text == reference(1, 256)
    finally:
        stopping = time.monotonic()
        code = server.stop()
        stop_s = time.monotonic() - stopping
    assert code == 0, server.log()[-5000:]
    # A call the killed clients left counted in flight would hold the drain for the whole
    # 10 s grace period.
    assert stop_s < 5, f"SIGTERM took {stop_s:.1f}s on an idle daemon"


# ---- deadline storm --------------------------------------------------------------------

DEADLINE_CALLS = 40


def test_deadline_storm_ends_every_call_and_frees_every_slot(
    daemon: RunningServer, reference: Reference
) -> None:
    outcomes: list[tuple[str, grpc.StatusCode, str | None, int]] = []

    def stream_call(stub: pb_grpc.DecoderStub, index: int, timeout: float) -> tuple:
        request = pb.GenerateRequest(
            embedding=embedding(index), max_new_tokens=256, temperature=0.0
        )
        parts: list[str] = []
        try:
            for chunk in stub.GenerateStream(request, timeout=timeout):
                parts.append(chunk.text)
        except grpc.RpcError as error:
            return error.code(), None
        return grpc.StatusCode.OK, "".join(parts)

    with daemon.channel() as channel, ThreadPoolExecutor(4) as pool:
        stub = pb_grpc.DecoderStub(channel)
        pending = []
        for i in range(DEADLINE_CALLS):
            index = i % EMBEDDING_COUNT
            timeout = 0.01 + 0.04 * i / (DEADLINE_CALLS - 1)
            kind = ("Decode", "Generate", "GenerateStream")[i % 3]
            if kind == "Decode":
                request = pb.DecodeRequest(embedding=embedding(index), max_new_tokens=256)
                pending.append((kind, index, stub.Decode.future(request, timeout=timeout)))
            elif kind == "Generate":
                request = pb.GenerateRequest(
                    embedding=embedding(index), max_new_tokens=256, temperature=0.0
                )
                pending.append((kind, index, stub.Generate.future(request, timeout=timeout)))
            else:
                pending.append((kind, index, pool.submit(stream_call, stub, index, timeout)))
        for kind, index, future in pending:
            if kind == "GenerateStream":
                code, text = future.result(timeout=30)
            else:
                try:
                    code, text = grpc.StatusCode.OK, future.result(timeout=30).text
                except grpc.RpcError as error:
                    code, text = error.code(), None
            outcomes.append((kind, code, text, index))

    for kind, code, text, index in outcomes:
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK), (kind, code)
        if code == grpc.StatusCode.OK:
            assert text == reference(index, 256), (kind, index)
    expired = sum(code == grpc.StatusCode.DEADLINE_EXCEEDED for _, code, _, _ in outcomes)
    assert expired >= DEADLINE_CALLS // 2, f"only {expired} calls expired: deadlines too long"
    assert_serving_correctly(daemon, reference)


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


# ---- identical concurrent requests -----------------------------------------------------

IDENTICAL = 32


def test_identical_concurrent_decodes_give_one_text(
    daemon: RunningServer, reference: Reference
) -> None:
    request = pb.DecodeRequest(embedding=embedding(5), max_new_tokens=64)
    with daemon.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        futures = [stub.Decode.future(request, timeout=60) for _ in range(IDENTICAL)]
        texts = [future.result().text for future in futures]
    assert set(texts) == {reference(5, 64)}
    assert_serving_correctly(daemon, reference)
