"""`--engine process`: the real daemon with its RET engine in a process of its own. Every RPC
form answers what `generate()` gives here; the engine process is a child of the daemon, and
the only process that loads torch; a
killed engine process fails only the calls it had (UNAVAILABLE, never a hang) and is started
again; SIGTERM drains it (accepted calls finish whole) and takes it down; a daemon killed
outright leaves no engine process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.model.checkpoint import load_checkpoint
from retd.model.generation import SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server

RNG = np.random.default_rng(23)
EMBEDDINGS = RNG.standard_normal((10, 768)).astype(np.float32)
MAX_NEW = 24


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent's wait is missing
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def local(checkpoint: Path, params: list[SamplingParams]) -> list[str]:
    loaded = load_checkpoint(checkpoint)
    embeddings = torch.from_numpy(EMBEDDINGS[: len(params)])
    return [r.text for r in generate(loaded.model, embeddings, params, tokenizer=loaded.tokenizer)]


def start(tmp_path: Path, checkpoint: Path, *extra: str) -> RunningServer:
    args = ["--checkpoint", str(checkpoint), "--engine", "process", "--torch-threads", "1"]
    return start_server(tmp_path, [*args, *extra])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    server = start(tmp_path_factory.mktemp("engine-process"), checkpoint)
    yield server
    assert server.stop() == 0, server.log()


def test_the_engine_runs_in_a_child_process(served: RunningServer) -> None:
    (child,) = served.children()
    with open(f"/proc/{child}/cmdline", "rb") as f:
        assert b"retd.server.engine_main" in f.read()


def test_the_front_end_never_loads_torch(served: RunningServer) -> None:
    """Only the engine process maps libtorch, before and after calls of every kind: the
    front end's memory is the server's less torch's (~200 MiB)."""
    (child,) = served.children()
    assert "libtorch" not in Path(f"/proc/{served.process.pid}/maps").read_text()
    with served.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        embedding = as_pb(EMBEDDINGS[0])
        stub.Decode(pb.DecodeRequest(embedding=embedding, max_new_tokens=4))
        stub.DecodeBatch(pb.DecodeBatchRequest(embeddings=[embedding], max_new_tokens=4))
        stub.Generate(pb.GenerateRequest(embedding=embedding, max_new_tokens=4))
        list(stub.GenerateStream(pb.GenerateRequest(embedding=embedding, max_new_tokens=4)))
        stub.GetModelInfo(pb.GetModelInfoRequest())
    assert "libtorch" not in Path(f"/proc/{served.process.pid}/maps").read_text()
    assert "libtorch" in Path(f"/proc/{child}/maps").read_text()


def test_nor_when_it_serves_the_shipped_checkpoint_by_default(tmp_path: Path) -> None:
    """No model named: the config loader finds the shipped checkpoint without torch too."""
    server = start_server(tmp_path, ["--engine", "process", "--torch-threads", "1"])
    try:
        assert "libtorch" not in Path(f"/proc/{server.process.pid}/maps").read_text()
    finally:
        assert server.stop() == 0, server.log()


def test_every_form_answers_what_generate_gives(served: RunningServer, checkpoint: Path) -> None:
    n = len(EMBEDDINGS)
    greedy = local(checkpoint, [SamplingParams(MAX_NEW)] * n)
    sampled = local(
        checkpoint, [SamplingParams(MAX_NEW, temperature=0.9, seed=s) for s in range(n)]
    )
    with served.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        items = [as_pb(e) for e in EMBEDDINGS]
        decoded = [
            stub.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=MAX_NEW)) for e in items
        ]
        assert [d.text for d in decoded] == greedy
        bad = pb.Embedding(raw=pb.RawTensor(data=b"\0" * 12, shape=[3]))
        batch = stub.DecodeBatch(
            pb.DecodeBatchRequest(embeddings=[*items[:3], bad, *items[3:]], max_new_tokens=MAX_NEW)
        )
        assert batch.results[3].error.code_name == "INVALID_ARGUMENT"
        answers = [r.response.text for i, r in enumerate(batch.results) if i != 3]
        assert answers == greedy
        for i, embedding in enumerate(items):
            request = pb.GenerateRequest(embedding=embedding, max_new_tokens=MAX_NEW, seed=i)
            request.temperature = 0.9
            assert stub.Generate(request).text == sampled[i]
            chunks = list(stub.GenerateStream(request))
            assert "".join(c.text for c in chunks) == sampled[i]
            assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_a_full_queue_is_refused_by_the_front_end(tmp_path: Path, checkpoint: Path) -> None:
    # a step a call, no drafts: the first stream's 250 tokens take 250 round trips
    flags = ("--max-batch-size", "1", "--max-queue-size", "1", "--steps-per-call", "1")
    server = start(tmp_path, checkpoint, *flags, "--draft-tokens", "0")
    (child,) = server.children()
    try:
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            long = pb.GenerateRequest(embedding=as_pb(EMBEDDINGS[0]), max_new_tokens=250)
            long.temperature = 0.0
            first = stub.GenerateStream(long)
            next(first)  # running: the slot is taken
            second = stub.GenerateStream(long)  # waits in the queue

            def waiting() -> int:
                return stub.GetModelInfo(pb.GetModelInfoRequest()).load.waiting

            poll(waiting, what="the second stream waits (ModelInfo.load.waiting)")
            os.kill(child, signal.SIGSTOP)  # nothing finishes now: the front end must refuse
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Decode(pb.DecodeRequest(embedding=as_pb(EMBEDDINGS[1])), timeout=30)
            finally:
                os.kill(child, signal.SIGCONT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_size 1" in str(refused.value.details())
            first.cancel()
            second.cancel()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_the_daemons_gil_switch_interval_holds_in_each_engine(
    tmp_path: Path, checkpoint: Path, engine: str
) -> None:
    """Where the decode worker runs (the daemon, or an engine process of its own), it runs
    with the daemon's switch interval (the model's load line says which)."""
    # 1.1 ms: 1100 us, read back as a float a hair under 0.0011 (a child set to that: 1099)
    server = start(tmp_path, checkpoint, "--engine", engine, "--switch-interval-ms", "1.1")
    try:
        loaded = [line for line in server.log().splitlines() if "model ret_v21 loaded" in line]
        assert loaded and all(line.endswith("GIL switch interval 1.1 ms") for line in loaded)
    finally:
        assert server.stop() == 0, server.log()


def test_a_killed_engine_fails_its_calls_and_is_started_again(
    tmp_path: Path, checkpoint: Path
) -> None:
    server = start(tmp_path, checkpoint, "--max-batch-size", "4")
    try:
        (child,) = server.children()
        with server.channel() as channel:
            stub = pb_grpc.DecoderStub(channel)
            long = pb.GenerateRequest(embedding=as_pb(EMBEDDINGS[0]), max_new_tokens=250)
            long.temperature = 0.0
            stream = stub.GenerateStream(long, timeout=60)
            next(stream)  # its sequence is running in the engine process
            os.kill(child, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failed:
                list(stream)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine process" in str(failed.value.details())
            # Calls made while it restarts wait for the new one, then are served right.
            request = pb.DecodeRequest(embedding=as_pb(EMBEDDINGS[1]), max_new_tokens=MAX_NEW)
            answer = stub.Decode(request, timeout=60)
            assert answer.text == local(checkpoint, [SamplingParams(MAX_NEW)] * 2)[1]
            (again,) = server.children()
            assert again != child
        assert "restarting it" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_drains_the_engine_process_and_takes_it_down(
    tmp_path: Path, checkpoint: Path
) -> None:
    server = start(tmp_path, checkpoint)
    (child,) = server.children()
    expected = local(checkpoint, [SamplingParams(200)])[0]
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        long = pb.GenerateRequest(embedding=as_pb(EMBEDDINGS[0]), max_new_tokens=200)
        long.temperature = 0.0
        stream = stub.GenerateStream(long, timeout=60)
        first = next(stream)
        server.process.send_signal(signal.SIGTERM)
        rest = list(stream)  # accepted before the signal: finishes whole
        assert first.text + "".join(c.text for c in rest) == expected
    assert server.process.wait(timeout=60) == 0, server.log()
    poll(lambda: not alive(child), what="the engine process is gone")


def test_a_killed_daemon_leaves_no_engine_process(tmp_path: Path, checkpoint: Path) -> None:
    server = start(tmp_path, checkpoint)
    (child,) = server.children()
    server.process.kill()
    server.process.wait(timeout=60)
    poll(lambda: not alive(child), what="the orphaned engine process exits")


def test_a_bad_engine_setting_is_named(tmp_path: Path, checkpoint: Path) -> None:
    command = [sys.executable, "-m", "retd.server", "--checkpoint", str(checkpoint)]
    done = subprocess.run(
        [*command, "--engine", "fork"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "engine: expected 'thread' or 'process', got 'fork'" in done.stderr
