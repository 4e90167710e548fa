"""Storms against a real daemon: clients killed mid-call, deadlines shorter than the work,
identical concurrent requests. (SIGTERM / SIGINT under load: test_shutdown_storm.py.)

Every daemon is a `python -m retd.server` subprocess on 127.0.0.1; every client is a real
channel (and, for the disconnect storm, a real client process killed with SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

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
